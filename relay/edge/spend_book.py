"""Spend books: where each team's spend per UTC day and month is summed.

`MemorySpend` serves one process. `RedisSpend` shares the sums between every relay process
and host, as admission in Redis does:
- spend is counted locally at once (`add` never waits on the network) and pushed once a
  second: one Lua script sets this replica's cumulative spend in each current window (a
  field of a hash per team and window: idempotent, so a push sent again after a timeout
  counts once, and Redis losing its data is repaired by the next push of every live
  replica) and reads every team's totals back (each hash summed);
- a replica's view is those totals plus what it has not pushed yet, at most a second old;
- if Redis cannot be reached the spend is pushed with the next sync, and the view stays
  what it was (logged and counted).
`changed` is set whenever a team's spend grows, so live sessions can be checked at once.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from relay.edge.budget import Spend, utc_now, windows

_log = structlog.get_logger("relay.edge.budget")
_MICRO = 1_000_000
_DAY_TTL_SECONDS = 3 * 86400
_MONTH_TTL_SECONDS = 35 * 86400
SYNC_INTERVAL_SECONDS = 1.0

# KEYS: the n keys this replica sets, then the keys to read. ARGV: n, this replica's id,
# then each set key's value (this replica's cumulative micro-dollars in that window) and ttl.
# A key is a hash of replicas' cumulative spends: setting is idempotent (a push whose answer
# timed out, sent again, counts once) and a replica that pushes again after Redis lost its
# data (a flush, a restart) puts its share back. A read sums a key's replicas.
_SYNC = """
local n = tonumber(ARGV[1])
for i = 1, n do
  redis.call('HSET', KEYS[i], ARGV[2], ARGV[1 + 2 * i])
  redis.call('EXPIRE', KEYS[i], ARGV[2 + 2 * i])
end
local totals = {}
for i = n + 1, #KEYS do
  local sum = 0
  for _, value in ipairs(redis.call('HVALS', KEYS[i])) do sum = sum + tonumber(value) end
  totals[#totals + 1] = sum
end
return totals
"""


@dataclass(slots=True)
class _Sums:
    """One team's spend in the windows named."""

    day: str = ""
    month: str = ""
    day_usd: float = 0.0
    month_usd: float = 0.0

    def add(self, day: str, month: str, usd: float) -> None:
        if day != self.day:
            self.day, self.day_usd = day, 0.0
        if month != self.month:
            self.month, self.month_usd = month, 0.0
        self.day_usd += usd
        self.month_usd += usd

    def in_windows(self, day: str, month: str) -> Spend:
        return Spend(
            self.day_usd if day == self.day else 0.0,
            self.month_usd if month == self.month else 0.0,
        )


@dataclass(slots=True)
class MemorySpend:
    """Spend of this process only."""

    clock: Callable[[], datetime] = utc_now
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _sums: dict[str, _Sums] = field(default_factory=dict)

    def add(self, team: str, usd: float) -> None:
        if usd <= 0:
            return
        now = windows(self.clock())
        self._sums.setdefault(team, _Sums()).add(now.day, now.month, usd)
        self.changed.set()

    def spent(self, team: str) -> Spend:
        sums = self._sums.get(team)
        if sums is None:
            return Spend()
        now = windows(self.clock())
        return sums.in_windows(now.day, now.month)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


@dataclass(slots=True)
class RedisSpend:
    """Spend shared by every process using the same Redis and key prefix."""

    client: aioredis.Redis
    key_prefix: str
    timeout_seconds: float
    teams: tuple[str, ...]
    on_redis_error: Callable[[], None] = lambda: None
    clock: Callable[[], datetime] = utc_now
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    replica: str = field(default_factory=lambda: secrets.token_hex(8))
    # This process's own spend, in USD, by (team, "day:<d>" or "month:<m>"): cumulative, and
    # as last pushed (what the shared totals already hold of it).
    _mine: dict[tuple[str, str], float] = field(default_factory=dict)
    _pushed: dict[tuple[str, str], float] = field(default_factory=dict)
    # Every team's totals as last read from Redis.
    _shared: dict[str, Spend] = field(default_factory=dict)
    _shared_windows: tuple[str, str] = ("", "")
    _syncer: asyncio.Task[None] | None = None

    def add(self, team: str, usd: float) -> None:
        if usd <= 0:
            return
        now = windows(self.clock())
        for window in (f"day:{now.day}", f"month:{now.month}"):
            self._mine[(team, window)] = self._mine.get((team, window), 0.0) + usd
        self.changed.set()

    def spent(self, team: str) -> Spend:
        now = windows(self.clock())
        shared = self._shared.get(team, Spend())
        day, month = (
            (shared.day, shared.month)
            if self._shared_windows == (now.day, now.month)
            else (0.0, 0.0)
        )
        day += self._unpushed(team, f"day:{now.day}")
        month += self._unpushed(team, f"month:{now.month}")
        return Spend(day, month)

    def _unpushed(self, team: str, window: str) -> float:
        key = (team, window)
        return self._mine.get(key, 0.0) - self._pushed.get(key, 0.0)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._syncer = loop.create_task(self._sync_forever(), name="spend sync")

    async def close(self) -> None:
        if self._syncer is not None:
            self._syncer.cancel()
            await asyncio.gather(self._syncer, return_exceptions=True)
        if any(self._unpushed(*key) for key in self._mine):
            await self.sync()  # what this process spent last is not lost

    async def _sync_forever(self) -> None:
        while True:
            await self.sync()
            await asyncio.sleep(SYNC_INTERVAL_SECONDS)

    def _key(self, team: str, window: str) -> str:
        return ":".join((self.key_prefix, "spend_by_replica", team, window))

    async def sync(self) -> None:
        """Set this process's spend in the current windows; read every team's totals."""
        now = windows(self.clock())
        current = (f"day:{now.day}", f"month:{now.month}")
        for key in [k for k in self._mine if k[1] not in current]:  # past windows: done
            self._mine.pop(key)
            self._pushed.pop(key, None)
        mine = dict(self._mine)
        keys = [self._key(team, window) for team, window in mine]
        values: list[int] = []
        for (_, window), usd in mine.items():
            values += [
                round(usd * _MICRO),
                _DAY_TTL_SECONDS if window[0] == "d" else _MONTH_TTL_SECONDS,
            ]
        keys += [self._key(t, w) for t in self.teams for w in current]
        try:
            async with asyncio.timeout(self.timeout_seconds):
                totals = await self.client.eval(
                    _SYNC, len(keys), *keys, len(mine), self.replica, *values
                )
        except (RedisError, OSError, TimeoutError) as exc:
            self.on_redis_error()
            unpushed = sum(1 for key in self._mine if self._unpushed(*key))
            _log.warning("spend_sync_failed", error=type(exc).__name__, pending=unpushed)
            return
        self._pushed.update(mine)
        self._read(now.day, now.month, _pairs(totals))

    def _read(self, day: str, month: str, totals: Iterable[tuple[int, int]]) -> None:
        shared = {
            team: Spend(int(d) / _MICRO, int(m) / _MICRO)
            for team, (d, m) in zip(self.teams, totals, strict=True)
        }
        if any(shared[t].month > self._shared.get(t, Spend()).month for t in shared):
            self.changed.set()
        self._shared, self._shared_windows = shared, (day, month)


def _pairs(values: list[int]) -> list[tuple[int, int]]:
    return [(values[i], values[i + 1]) for i in range(0, len(values), 2)]
