"""Spend books: where each team's spend per UTC day and month is summed.

`MemorySpend` serves one process. `RedisSpend` shares the sums between every relay process
and host, as admission in Redis does:
- spend is counted locally at once (`add` never waits on the network) and pushed once a
  second: one Lua script adds each team's pending micro-dollars to its day and month keys
  (INCRBY: atomic, so no replica's spend is lost) and reads every team's totals back;
- a replica's view is those totals plus what it has not pushed yet, at most a second old;
- if Redis cannot be reached the pending spend is kept for the next push, and the view
  stays what it was (logged and counted).
`changed` is set whenever a team's spend grows, so live sessions can be checked at once.
"""

from __future__ import annotations

import asyncio
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

# KEYS: (day key, month key) per team with pending spend, then every team's (day, month) keys
# to read. ARGV: number of pending teams, day ttl, month ttl, then each one's micro-dollars.
_SYNC = """
local n = tonumber(ARGV[1])
for i = 1, n do
  local amount = tonumber(ARGV[3 + i])
  redis.call('INCRBY', KEYS[2 * i - 1], amount)
  redis.call('EXPIRE', KEYS[2 * i - 1], ARGV[2])
  redis.call('INCRBY', KEYS[2 * i], amount)
  redis.call('EXPIRE', KEYS[2 * i], ARGV[3])
end
local totals = {}
for i = 2 * n + 1, #KEYS do
  totals[#totals + 1] = redis.call('GET', KEYS[i]) or '0'
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
    # Not pushed yet: (team, day, month) -> USD.
    _pending: dict[tuple[str, str, str], float] = field(default_factory=dict)
    # Every team's totals as last read from Redis.
    _shared: dict[str, Spend] = field(default_factory=dict)
    _shared_windows: tuple[str, str] = ("", "")
    _syncer: asyncio.Task[None] | None = None

    def add(self, team: str, usd: float) -> None:
        if usd <= 0:
            return
        now = windows(self.clock())
        key = (team, now.day, now.month)
        self._pending[key] = self._pending.get(key, 0.0) + usd
        self.changed.set()

    def spent(self, team: str) -> Spend:
        now = windows(self.clock())
        shared = self._shared.get(team, Spend())
        day, month = (
            (shared.day, shared.month)
            if self._shared_windows == (now.day, now.month)
            else (0.0, 0.0)
        )
        for (who, d, m), usd in self._pending.items():
            if who == team:
                day += usd if d == now.day else 0.0
                month += usd if m == now.month else 0.0
        return Spend(day, month)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._syncer = loop.create_task(self._sync_forever(), name="spend sync")

    async def close(self) -> None:
        if self._syncer is not None:
            self._syncer.cancel()
            await asyncio.gather(self._syncer, return_exceptions=True)
        if self._pending:
            await self.sync()  # what this process spent last is not lost

    async def _sync_forever(self) -> None:
        while True:
            await self.sync()
            await asyncio.sleep(SYNC_INTERVAL_SECONDS)

    def _key(self, team: str, window: str) -> str:
        return ":".join((self.key_prefix, "spend", team, window))

    async def sync(self) -> None:
        """Push this process's pending spend; read every team's totals."""
        now = windows(self.clock())
        pushed = {key: round(usd * _MICRO) for key, usd in self._pending.items()}
        pushed = {key: micro for key, micro in pushed.items() if micro > 0}
        keys = [self._key(t, w) for (t, d, m) in pushed for w in (f"day:{d}", f"month:{m}")]
        keys += [
            self._key(t, w) for t in self.teams for w in (f"day:{now.day}", f"month:{now.month}")
        ]
        try:
            async with asyncio.timeout(self.timeout_seconds):
                totals = await self.client.eval(
                    _SYNC, len(keys), *keys, len(pushed), _DAY_TTL_SECONDS, _MONTH_TTL_SECONDS,
                    *pushed.values(),
                )  # fmt: skip
        except (RedisError, OSError, TimeoutError) as exc:
            self.on_redis_error()
            _log.warning("spend_sync_failed", error=type(exc).__name__, pending=len(self._pending))
            return
        for key, micro in pushed.items():
            left = self._pending[key] - micro / _MICRO
            if abs(left) < 0.5 / _MICRO:
                del self._pending[key]
            else:
                self._pending[key] = left
        self._read(now.day, now.month, _pairs(totals))

    def _read(self, day: str, month: str, totals: Iterable[tuple[bytes, bytes]]) -> None:
        shared = {
            team: Spend(int(d) / _MICRO, int(m) / _MICRO)
            for team, (d, m) in zip(self.teams, totals, strict=True)
        }
        if any(shared[t].month > self._shared.get(t, Spend()).month for t in shared):
            self.changed.set()
        self._shared, self._shared_windows = shared, (day, month)


def _pairs(values: list[bytes]) -> list[tuple[bytes, bytes]]:
    return [(values[i], values[i + 1]) for i in range(0, len(values), 2)]
