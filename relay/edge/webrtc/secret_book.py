"""The client secrets the relay minted, kept by SHA-256 (never the secret itself) so a call
bearing one goes to the backend that minted it: in this process, or in Redis when admission
state lives there (then any process or host can place the call)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as aioredis

from relay.edge.webrtc.redis_records import RedisRecords
from relay.edge.webrtc.team_book import TeamBook


@dataclass(frozen=True, slots=True)
class MintedSecret:
    team: str
    deployment: str
    backend: str
    expires_at: float


@dataclass(slots=True)
class SecretBook:
    """Secrets this process minted, by SHA-256, until they expire; at most `max_entries`
    (full, the oldest of the team holding the most is forgotten: `TeamBook`). `clock` is
    wall time, like the service's ``expires_at``."""

    max_entries: int = 100_000
    clock: Callable[[], float] = time.time
    _entries: TeamBook[bytes, MintedSecret] = field(init=False)

    def __post_init__(self) -> None:
        self._entries = TeamBook(self.max_entries, _team_of)

    def remember(self, secret: str, minted: MintedSecret) -> None:
        now = self.clock()
        self._entries.drop_oldest_while(lambda known: known.expires_at <= now)
        self._entries.put(_digest(secret), minted)

    def find(self, secret: str) -> MintedSecret | None:
        """The record of a secret this process minted, expired or not; None if unknown."""
        return self._entries.get(_digest(secret))

    def __len__(self) -> int:
        return len(self._entries)


def _team_of(minted: MintedSecret) -> str:
    return minted.team


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


class SecretRecords(Protocol):
    """Where minted secrets are remembered: this process, or Redis for every process."""

    @property
    def clock(self) -> Callable[[], float]:
        """Wall time, like the service's ``expires_at``."""
        ...

    async def remember(self, secret: str, minted: MintedSecret) -> None: ...

    async def find(self, secret: str) -> MintedSecret | None: ...


@dataclass(slots=True)
class ProcessSecrets:
    """A `SecretBook` behind the async interface: one process's secrets."""

    book: SecretBook = field(default_factory=SecretBook)

    @property
    def clock(self) -> Callable[[], float]:
        return self.book.clock

    async def remember(self, secret: str, minted: MintedSecret) -> None:
        self.book.remember(secret, minted)

    async def find(self, secret: str) -> MintedSecret | None:
        return self.book.find(secret)


# Expired records are kept this long more, so a late call hears "expired", not "unknown".
_EXPIRED_KEPT_SECONDS = 3600


@dataclass(slots=True)
class RedisSecrets:
    """Minted secrets in Redis (SHA-256 keys, expiring), so any relay process or host can
    route a call bearing a secret another one minted."""

    records: RedisRecords
    clock: Callable[[], float] = time.time

    @classmethod
    def connect(cls, client: aioredis.Redis, prefix: str, timeout: float) -> RedisSecrets:
        return cls(
            RedisRecords(client, f"{prefix}:secret", timeout, "client secrets", "secret_store")
        )

    async def remember(self, secret: str, minted: MintedSecret) -> None:
        ttl = max(1, int(minted.expires_at - self.clock()) + _EXPIRED_KEPT_SECONDS)
        record = [minted.team, minted.deployment, minted.backend, minted.expires_at]
        await self.records.put(_digest(secret).hex(), record, ttl)

    async def find(self, secret: str) -> MintedSecret | None:
        record = await self.records.get(_digest(secret).hex())
        if record is None:
            return None
        team, deployment, backend, expires_at = record
        return MintedSecret(team, deployment, backend, float(expires_at))
