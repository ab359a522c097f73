"""Admission state in Redis, shared by every relay process and host.

How it works:
- Each open session holds a slot: a member of a sorted set per team (and one relay-wide),
  scored with its expiry time on Redis's clock. One Lua script drops expired slots, checks
  the caps and the per-window start counts, and adds the slot, atomically.
- A process refreshes its live slots every third of `slot_ttl_seconds`. A process that dies
  stops refreshing, so its slots expire within the TTL: no slot leaks past it.
- New sessions per second are counted in fixed windows (a key per window, expiring with it).
- If Redis cannot be reached, each team's `on_redis_error` decides: "open" admits (the team
  is unlimited meanwhile), "closed" refuses with 503. Either way it is logged and counted,
  and other teams are served as their own settings say.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from relay.errors import ClientRefused, RelayUnavailable
from relay.ops.config import AdmissionConfig, LimitsConfig, TeamLimits

_log = structlog.get_logger("relay.edge.admission")

# KEYS: team slots, relay slots, team window counter, relay window counter
# ARGV: slot id, ttl ms, team max, relay max, team budget, relay budget, team window ms,
# relay window ms (-1 = no limit). Returns {0, 0} when admitted, else {reason, retry ms}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local team_max, relay_max = tonumber(ARGV[3]), tonumber(ARGV[4])
if team_max >= 0 and redis.call('ZCARD', KEYS[1]) >= team_max then return {1, 1000} end
if relay_max >= 0 and redis.call('ZCARD', KEYS[2]) >= relay_max then return {2, 1000} end
local team_budget, relay_budget = tonumber(ARGV[5]), tonumber(ARGV[6])
if team_budget >= 0 and tonumber(redis.call('GET', KEYS[3]) or '0') >= team_budget then
  return {3, redis.call('PTTL', KEYS[3])}
end
if relay_budget >= 0 and tonumber(redis.call('GET', KEYS[4]) or '0') >= relay_budget then
  return {4, redis.call('PTTL', KEYS[4])}
end
for i = 3, 4 do
  if redis.call('INCR', KEYS[i]) == 1 then redis.call('PEXPIRE', KEYS[i], ARGV[i + 4]) end
end
local ttl = tonumber(ARGV[2])
for i = 1, 2 do
  redis.call('ZADD', KEYS[i], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[i], ttl * 2)
end
return {0, 0}
"""
# KEYS: the slot sets; ARGV: ttl ms, then slot ids. Extends the live slots, and puts back
# any Redis lost (flushed, restarted, or down when the session was let in): every session
# this process serves counts again (a released slot left `live` before its ZREM).
_REFRESH = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], expiry, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[1]) * 2)
end
return #KEYS
"""

# KEYS: window counters; ARGV: budgets (-1 = none), then the window ms of each. Counts one
# start in every window if all have room; else returns {index of the full one, retry ms}.
_COUNT = """
for i = 1, #KEYS do
  local budget = tonumber(ARGV[i])
  if budget >= 0 and tonumber(redis.call('GET', KEYS[i]) or '0') >= budget then
    return {i, redis.call('PTTL', KEYS[i])}
  end
end
for i = 1, #KEYS do
  if redis.call('INCR', KEYS[i]) == 1 then redis.call('PEXPIRE', KEYS[i], ARGV[#KEYS + i]) end
end
return {0, 0}
"""

_REFUSALS = {
    1: (429, "team_session_limit", "The team has reached its limit of open sessions."),
    2: (503, "relay_full", "The relay is at its session limit."),
    3: (429, "team_rate_limit", "The team is starting sessions faster than its limit."),
    4: (503, "relay_rate_limit", "The relay is starting sessions faster than its limit."),
}


def window(rate: float | None) -> tuple[int, int]:
    """(window ms, sessions allowed per window) for a rate in sessions per second."""
    if rate is None:
        return 1000, -1
    seconds = max(1, math.ceil(1 / rate))
    return seconds * 1000, max(1, math.floor(rate * seconds))


@dataclass(slots=True)
class RedisLease:
    store: RedisAdmission
    team: str
    slot: str
    keys: tuple[str, str]
    released: bool = False

    async def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.store.live.pop(self.slot, None)
        try:
            async with asyncio.timeout(self.store.config.redis_timeout_seconds):
                # Plain ZREMs, no MULTI: a Redis out of memory refuses a transaction, even
                # of deletes, and the team's slots would stay taken for the TTL.
                async with self.store.client.pipeline(transaction=False) as pipe:
                    for key in self.keys:
                        pipe.zrem(key, self.slot)
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            # The slot expires by itself within the TTL.
            self.store.on_redis_error(self.team)
            _log.warning("admission_release_failed", team=self.team, error=type(exc).__name__)


# Connections to Redis a process holds at most.
REDIS_CONNECTIONS = 100


@dataclass(slots=True)
class RedisAdmission:
    config: AdmissionConfig
    limits: LimitsConfig
    team_limits: Mapping[str, TeamLimits]
    client: aioredis.Redis
    on_redis_error: Callable[[str], None] = lambda team: None
    # Slots this process holds: slot id -> the sorted sets it is in.
    live: dict[str, tuple[str, str]] = field(default_factory=dict)
    _refresher: asyncio.Task[None] | None = None

    @classmethod
    def connect(
        cls,
        config: AdmissionConfig,
        limits: LimitsConfig,
        team_limits: Mapping[str, TeamLimits],
        url: str,
        on_redis_error: Callable[[str], None] = lambda team: None,
    ) -> RedisAdmission:
        # A burst past the pool's connections waits for one (within each call's deadline):
        # redis-py's default pool raised at once, and Redis was taken for unreachable (a team
        # failing closed refused sessions; the brake counted each process alone).
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_CONNECTIONS,
            timeout=config.redis_timeout_seconds * 4,
            # Each call has its own deadline (asyncio.timeout); the refresh allows itself 4x
            # the timeout, which a socket timeout of 1x cut short (live slots then expired).
            socket_timeout=config.redis_timeout_seconds * 4,
            socket_connect_timeout=config.redis_timeout_seconds,
            retry_on_timeout=False,
        )
        client = aioredis.Redis.from_pool(pool)
        return cls(config, limits, team_limits, client, on_redis_error)

    def _key(self, *parts: str) -> str:
        return ":".join((self.config.key_prefix, *parts))

    def update_limits(self, limits: LimitsConfig, team_limits: Mapping[str, TeamLimits]) -> None:
        self.limits, self.team_limits = limits, team_limits

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._refresher = loop.create_task(self._refresh_forever(), name="admission refresher")

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        await self.client.aclose()

    async def acquire(self, team: str) -> RedisLease:
        own = self.team_limits.get(team, TeamLimits())
        team_window, team_budget = window(own.max_new_sessions_per_second)
        relay_window, relay_budget = window(self.limits.max_new_sessions_per_second)
        now_ms = int(time.time() * 1000)
        slots = (self._key("slots", "team", team), self._key("slots", "relay"))
        counters = (
            self._key("started", "team", team, str(now_ms // team_window)),
            self._key("started", "relay", str(now_ms // relay_window)),
        )
        slot = secrets.token_hex(8)
        try:
            async with asyncio.timeout(self.config.redis_timeout_seconds):
                reason, retry_ms = await self.client.eval(
                    _ACQUIRE,
                    4,
                    *slots,
                    *counters,
                    slot,
                    int(self.config.slot_ttl_seconds * 1000),
                    -1 if own.max_sessions is None else own.max_sessions,
                    -1 if self.limits.max_sessions is None else self.limits.max_sessions,
                    team_budget,
                    relay_budget,
                    team_window,
                    relay_window,
                )
        except (RedisError, OSError, TimeoutError) as exc:
            self._unreachable(team, own, exc)
            # Let in (fail open) with a slot Redis has not got yet: the refresher adds it once
            # Redis answers, so the session counts against the caps for the rest of its life.
            self.live[slot] = slots
            return RedisLease(self, team, slot, slots)
        if int(reason):
            status, code, message = _REFUSALS[int(reason)]
            retry = str(max(1, math.ceil(max(int(retry_ms), 0) / 1000)))
            raise ClientRefused(status, code, f"{message} Retry later.", retry_after=retry)
        self.live[slot] = slots
        return RedisLease(self, team, slot, slots)

    async def take_client_secret(self, team: str) -> None:
        """Count a WebRTC client secret minted for ``team`` against its per-minute limit."""
        own = self.team_limits.get(team, TeamLimits())
        if own.max_client_secrets_per_minute is None:
            return
        budget = max(1, math.floor(own.max_client_secrets_per_minute))
        minute = int(time.time()) // 60
        key = self._key("secrets", "team", team, str(minute))
        refused = await self._count(team, own, [(key, budget, 60_000)])
        if refused:
            raise ClientRefused(
                429,
                "team_secret_rate_limit",
                "The team is minting client secrets faster than its limit; retry later.",
                retry_after=refused[1],
            )

    async def take_call(self, team: str) -> None:
        """Count a WebRTC call as a session start (its end is never seen by the relay)."""
        own = self.team_limits.get(team, TeamLimits())
        team_window, team_budget = window(own.max_new_sessions_per_second)
        relay_window, relay_budget = window(self.limits.max_new_sessions_per_second)
        now_ms = int(time.time() * 1000)
        counters = [
            (
                self._key("started", "team", team, str(now_ms // team_window)),
                team_budget,
                team_window,
            ),
            (
                self._key("started", "relay", str(now_ms // relay_window)),
                relay_budget,
                relay_window,
            ),
        ]
        refused = await self._count(team, own, counters)
        if refused:
            status, code, message = _REFUSALS[3 if refused[0] == "team" else 4]
            raise ClientRefused(status, code, f"{message} Retry later.", retry_after=refused[1])

    async def _count(
        self, team: str, own: TeamLimits, counters: list[tuple[str, int, int]]
    ) -> tuple[str, str] | None:
        """Count one start in each window; None when counted, else (which, retry seconds)."""
        try:
            async with asyncio.timeout(self.config.redis_timeout_seconds):
                full, retry_ms = await self.client.eval(
                    _COUNT,
                    len(counters),
                    *(key for key, _, _ in counters),
                    *(budget for _, budget, _ in counters),
                    *(window_ms for _, _, window_ms in counters),
                )
        except (RedisError, OSError, TimeoutError) as exc:
            self._unreachable(team, own, exc)
            return None
        if not int(full):
            return None
        which = "team" if int(full) == 1 else "relay"
        return which, str(max(1, math.ceil(max(int(retry_ms), 0) / 1000)))

    def _unreachable(self, team: str, own: TeamLimits, exc: BaseException) -> None:
        self.on_redis_error(team)
        _log.error(
            "admission_redis_unreachable",
            team=team,
            error=type(exc).__name__,
            policy=own.on_redis_error,
        )
        if own.on_redis_error == "closed":
            raise RelayUnavailable(
                503,
                "admission_unavailable",
                "The relay cannot check this team's limits right now; retry shortly.",
                retry_after="5",
            )

    async def _refresh_forever(self) -> None:
        interval = self.config.slot_ttl_seconds / 3
        while True:
            await asyncio.sleep(interval)
            await self.refresh()

    async def refresh(self) -> None:
        """Extend this process's live slots by a TTL from now."""
        if not self.live:
            return
        keys: list[str] = []
        members: list[str] = []
        for slot, slot_keys in list(self.live.items()):
            for key in slot_keys:
                keys.append(key)
                members.append(slot)
        try:
            async with asyncio.timeout(self.config.redis_timeout_seconds * 4):
                await self.client.eval(
                    _REFRESH, len(keys), *keys, int(self.config.slot_ttl_seconds * 1000), *members
                )
        except (RedisError, OSError, TimeoutError) as exc:
            _log.warning("admission_refresh_failed", slots=len(self.live), error=type(exc).__name__)
