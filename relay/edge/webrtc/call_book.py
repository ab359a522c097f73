"""The WebRTC calls the relay placed, by call id (from the service's ``Location``): which team
placed each, on which deployment and backend, so a sideband socket or a call-control request
goes to that backend and only that team's keys reach it. In this process, or in Redis when
admission state lives there (then any relay process or host can serve them)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as aioredis

from relay.edge.webrtc.redis_records import RedisRecords
from relay.edge.webrtc.team_book import TeamBook

# A call lasts at most the service's session limit (60 minutes); its record a while longer.
CALL_KEPT_SECONDS = 2 * 3600


@dataclass(frozen=True, slots=True)
class PlacedCall:
    team: str
    deployment: str
    backend: str
    # The relay observes it (its own sideband socket meters the call).
    observed: bool


def call_id_from_location(location: str | None) -> str | None:
    """The call id at the end of ``…/realtime/calls/{call_id}``; None if there is none."""
    if not location:
        return None
    call_id = location.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    return call_id if call_id and call_id != "calls" else None


class CallRecords(Protocol):
    async def remember(self, call_id: str, call: PlacedCall) -> None: ...

    async def find(self, call_id: str) -> PlacedCall | None: ...


@dataclass(slots=True)
class ProcessCalls:
    """Calls this process placed in the last two hours; at most ``max_entries`` (full, the
    oldest of the team holding the most is forgotten: `TeamBook`)."""

    max_entries: int = 100_000
    clock: Callable[[], float] = time.monotonic
    _entries: TeamBook[str, tuple[float, PlacedCall]] = field(init=False)

    def __post_init__(self) -> None:
        self._entries = TeamBook(self.max_entries, _team_of)

    async def remember(self, call_id: str, call: PlacedCall) -> None:
        now = self.clock()
        self._entries.drop_oldest_while(lambda entry: entry[0] <= now)
        self._entries.put(call_id, (now + CALL_KEPT_SECONDS, call))

    async def find(self, call_id: str) -> PlacedCall | None:
        entry = self._entries.get(call_id)
        return entry[1] if entry is not None and entry[0] > self.clock() else None


def _team_of(entry: tuple[float, PlacedCall]) -> str:
    return entry[1].team


@dataclass(slots=True)
class RedisCalls:
    """Placed calls in Redis, expiring with the longest call."""

    records: RedisRecords

    @classmethod
    def connect(cls, client: aioredis.Redis, prefix: str, timeout: float) -> RedisCalls:
        return cls(RedisRecords(client, f"{prefix}:call", timeout, "calls", "call_store"))

    async def remember(self, call_id: str, call: PlacedCall) -> None:
        record = [call.team, call.deployment, call.backend, call.observed]
        await self.records.put(call_id, record, CALL_KEPT_SECONDS)

    async def find(self, call_id: str) -> PlacedCall | None:
        record = await self.records.get(call_id)
        if record is None:
            return None
        team, deployment, backend, observed = record
        return PlacedCall(team, deployment, backend, bool(observed))
