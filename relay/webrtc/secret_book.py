"""The client secrets this process minted, kept by SHA-256 (never the secret itself) so a
call bearing one goes to the backend that minted it."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class MintedSecret:
    team: str
    deployment: str
    backend: str
    expires_at: float


@dataclass(slots=True)
class SecretBook:
    """Secrets this process minted, by SHA-256, until they expire; at most `max_entries`
    (the oldest forgotten first). `clock` is wall time, like the service's ``expires_at``."""

    max_entries: int = 100_000
    clock: Callable[[], float] = time.time
    _entries: OrderedDict[bytes, MintedSecret] = field(default_factory=OrderedDict)

    def remember(self, secret: str, minted: MintedSecret) -> None:
        now = self.clock()
        # Lifetimes are capped, so expired entries gather at the front.
        while self._entries and next(iter(self._entries.values())).expires_at <= now:
            self._entries.popitem(last=False)
        self._entries[_digest(secret)] = minted
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def find(self, secret: str) -> MintedSecret | None:
        """The record of a secret this process minted, expired or not; None if unknown."""
        return self._entries.get(_digest(secret))

    def __len__(self) -> int:
        return len(self._entries)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()
