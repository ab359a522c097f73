"""Admission: who may open a session now. Caps on concurrent sessions and on new sessions per
second, globally and per team, and a brake on addresses that keep failing authentication.

Decisions are made before the upgrade and answered as HTTP: a team over its own limits gets
429, a relay that is itself full gets 503, both with Retry-After. The in-memory store here
serves one process; `admission_redis.RedisAdmission` shares the state between processes.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from relay.errors import ClientRefused
from relay.ops.config import LimitsConfig, TeamLimits

Clock = Callable[[], float]


class Lease(Protocol):
    async def release(self) -> None:
        """Give the session's slot back; safe to call more than once."""
        ...


class AdmissionStore(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def update_limits(self, limits: LimitsConfig, team_limits: Mapping[str, TeamLimits]) -> None:
        """New limits (a reload), for sessions from now on; open sessions keep their slots."""
        ...

    async def acquire(self, team: str) -> Lease:
        """A slot for a new session of ``team``, or ClientRefused (429/503, Retry-After)."""
        ...

    async def take_client_secret(self, team: str) -> None:
        """Count a WebRTC client secret minted for ``team``; ClientRefused over its rate."""
        ...

    async def take_call(self, team: str) -> None:
        """Count a WebRTC call as a session start; ClientRefused over the rates."""
        ...


@dataclass(slots=True)
class TokenBucket:
    """`rate` tokens a second, up to `burst`; one token per new session."""

    rate: float
    burst: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, now: float) -> TokenBucket:
        burst = max(1.0, rate)
        return cls(rate, burst, burst, now)

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one is there."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


def _retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


@dataclass(slots=True)
class MemoryLease:
    store: MemoryAdmission
    team: str
    released: bool = False

    async def release(self) -> None:
        if not self.released:
            self.released = True
            self.store.active -= 1
            self.store.team_active[self.team] -= 1


@dataclass(slots=True)
class MemoryAdmission:
    """Admission state of one process."""

    limits: LimitsConfig
    team_limits: Mapping[str, TeamLimits]
    clock: Clock = time.monotonic
    active: int = 0
    team_active: dict[str, int] = field(default_factory=dict)
    _buckets: dict[str, TokenBucket] = field(default_factory=dict)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def update_limits(self, limits: LimitsConfig, team_limits: Mapping[str, TeamLimits]) -> None:
        self.limits, self.team_limits = limits, team_limits
        self._buckets.clear()  # rates may have changed; a bucket starts full

    async def acquire(self, team: str) -> Lease:
        now = self.clock()
        own = self.team_limits.get(team, TeamLimits())
        if own.max_sessions is not None and self.team_active.get(team, 0) >= own.max_sessions:
            raise ClientRefused(
                429,
                "team_session_limit",
                f"The team has {own.max_sessions} sessions open, its limit; retry later.",
                retry_after="1",
            )
        if self.limits.max_sessions is not None and self.active >= self.limits.max_sessions:
            raise ClientRefused(
                503,
                "relay_full",
                "The relay is at its session limit; retry later.",
                retry_after="1",
            )
        self._take(f"team:{team}", own.max_new_sessions_per_second, now, 429, "team_rate_limit")
        self._take("", self.limits.max_new_sessions_per_second, now, 503, "relay_rate_limit")
        self.active += 1
        self.team_active[team] = self.team_active.get(team, 0) + 1
        return MemoryLease(self, team)

    async def take_client_secret(self, team: str) -> None:
        """Count a client secret minted for ``team``; ClientRefused (429) over its rate."""
        per_minute = self.team_limits.get(team, TeamLimits()).max_client_secrets_per_minute
        if per_minute is None:
            return
        now, key = self.clock(), f"secrets:{team}"
        bucket = self._buckets.get(key)
        if bucket is None:
            burst = max(1.0, per_minute)
            bucket = self._buckets[key] = TokenBucket(per_minute / 60, burst, burst, now)
        wait = bucket.take(now)
        if wait:
            raise ClientRefused(
                429,
                "team_secret_rate_limit",
                f"The team is minting client secrets faster than its limit of {per_minute:g} "
                "a minute.",
                retry_after=_retry_after(wait),
            )

    async def take_call(self, team: str) -> None:
        """Count a WebRTC call as a new session (rates only: its end is never seen here)."""
        now = self.clock()
        own = self.team_limits.get(team, TeamLimits())
        self._take(f"team:{team}", own.max_new_sessions_per_second, now, 429, "team_rate_limit")
        self._take("", self.limits.max_new_sessions_per_second, now, 503, "relay_rate_limit")

    def _take(self, key: str, rate: float | None, now: float, status: int, code: str) -> None:
        if rate is None:
            return
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket.full(rate, now)
        wait = bucket.take(now)
        if wait:
            who = "The team" if status == 429 else "The relay"
            raise ClientRefused(
                status,
                code,
                f"{who} is starting sessions faster than its limit of {rate:g} a second.",
                retry_after=_retry_after(wait),
            )


class AuthBrake(Protocol):
    """Refuses, for a while, addresses that failed authentication too often. A success
    does not clear the count: a team's valid key must not buy its holder more guesses.

    Asked after the key is judged (`check` on a success, `failed` on a failure), each in
    one step: a guess in flight when an address is blocked gets the block, right or wrong,
    so an address gets exactly ``auth_failures_allowed`` answers, however many it sends at
    once."""

    def update(self, limits: LimitsConfig) -> None:
        """Take the limits of a reloaded config."""
        ...

    async def check(self, address: str) -> None:
        """Raise ClientRefused (429, Retry-After) while ``address`` is blocked."""
        ...

    async def failed(self, address: str) -> None:
        """Count a failed authentication from ``address``; ClientRefused (429), not
        counted, when it is blocked already."""
        ...


@dataclass(slots=True)
class AuthThrottle:
    """The brake of one process (an `AuthBrake`).

    Remembers at most `max_addresses` addresses (least recently seen forgotten first), so a
    flood from many addresses costs bounded memory.
    """

    failures_allowed: int
    window_seconds: float
    block_seconds: float
    clock: Clock = time.monotonic
    max_addresses: int = 10_000
    # address -> (failures in the current window, window start, blocked until)
    _seen: OrderedDict[str, tuple[int, float, float]] = field(default_factory=OrderedDict)

    def update(self, limits: LimitsConfig) -> None:
        self.failures_allowed = limits.auth_failures_allowed
        self.window_seconds = limits.auth_failure_window_seconds
        self.block_seconds = limits.auth_block_seconds

    async def check(self, address: str) -> None:
        entry = self._seen.get(address)
        if entry is not None and entry[2] > self.clock():
            raise auth_blocked(entry[2] - self.clock())

    async def failed(self, address: str) -> None:
        await self.check(address)
        now = self.clock()
        count, start, blocked_until = self._seen.pop(address, (0, now, 0.0))
        if now - start > self.window_seconds:
            count, start = 0, now
        count += 1
        if count >= self.failures_allowed:
            blocked_until, count, start = now + self.block_seconds, 0, now
        self._seen[address] = (count, start, blocked_until)
        while len(self._seen) > self.max_addresses:
            self._seen.popitem(last=False)


def auth_blocked(seconds: float) -> ClientRefused:
    return ClientRefused(
        429,
        "too_many_auth_failures",
        "Too many failed authentication attempts from this address; retry later.",
        retry_after=_retry_after(seconds),
    )
