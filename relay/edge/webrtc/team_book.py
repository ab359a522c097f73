"""A bounded book of entries that each belong to a team. Pure.

Full, it forgets the oldest entry of the team that holds the most, not the oldest entry of
all: one team minting secrets or placing calls by the hundred thousand evicts its own, never
another team's live secret or call (which would then be refused as unknown).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(slots=True)
class TeamBook(Generic[K, V]):
    max_entries: int
    team_of: Callable[[V], str]
    # Every entry, oldest first; and each team's keys, oldest first.
    _entries: OrderedDict[K, V] = field(default_factory=OrderedDict)
    _teams: dict[str, OrderedDict[K, None]] = field(default_factory=dict)

    def put(self, key: K, value: V) -> None:
        self.discard(key)
        self._entries[key] = value
        self._teams.setdefault(self.team_of(value), OrderedDict())[key] = None
        if len(self._entries) > self.max_entries:
            largest = max(self._teams.values(), key=len)
            self.discard(next(iter(largest)))

    def get(self, key: K) -> V | None:
        return self._entries.get(key)

    def discard(self, key: K) -> None:
        value = self._entries.pop(key, None)
        if value is None:
            return
        team = self.team_of(value)
        keys = self._teams[team]
        del keys[key]
        if not keys:
            del self._teams[team]

    def drop_oldest_while(self, expired: Callable[[V], bool]) -> None:
        """Forget entries from the oldest on while ``expired`` says so (lifetimes are
        capped, so the expired gather at the front)."""
        while self._entries:
            key, value = next(iter(self._entries.items()))
            if not expired(value):
                return
            self.discard(key)

    def __len__(self) -> int:
        return len(self._entries)
