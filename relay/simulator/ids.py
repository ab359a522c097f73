"""Server-side identifiers that look like the service's (``event_…``, ``item_…``, ``resp_…``)."""

from __future__ import annotations

import itertools

# Connections get distinct seeds so ids never repeat within one process.
_connection_seeds = itertools.count(1)


def next_seed() -> int:
    """Return a fresh per-connection seed."""
    return next(_connection_seeds)


class IdFactory:
    """Deterministic ids: prefix, 5 hex digits of the seed, 16 of a per-connection counter.

    The suffix is 21 characters long like the service's ids, and sorts in creation order,
    which makes traces easy to read.
    """

    __slots__ = ("_counter", "_seed")

    def __init__(self, seed: int = 0) -> None:
        self._seed = seed % 0x100000
        self._counter = itertools.count(1)

    def new(self, prefix: str) -> str:
        """Return a new id such as ``item_0000100000000000000A3``."""
        return f"{prefix}_{self._seed:05X}{next(self._counter):016X}"

    def event(self) -> str:
        return self.new("event")

    def item(self) -> str:
        return self.new("item")

    def response(self) -> str:
        return self.new("resp")
