"""Reference cycles in a session's objects: what the cycle collector would have to free.

A closed session should be freed by reference counting alone. Under set-up churn, each one
left in a cycle adds to passes of the collector that froze the loop for tens of
milliseconds (docs/performance.md, "The last reference cycles per session")."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from relay.session.pump import Bridge


@contextmanager
def collector_off() -> Iterator[Callable[[], list[Any]]]:
    """The cycle collector off for the block; what it yields collects once and returns what
    was unreachable (everything in a cycle since the block began)."""
    gc.collect()
    gc.disable()
    try:
        yield _unreachable
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _unreachable() -> list[Any]:
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    return list(gc.garbage)


def watch_sessions(monkeypatch: pytest.MonkeyPatch) -> set[tuple[int, type]]:
    """Each session's bridge, sockets, protocols and renewal, as it starts: identities, not
    references (aiohttp's protocols take no weak references)."""
    watched: set[tuple[int, type]] = set()
    run = Bridge.run

    async def watch(self: Bridge) -> Any:
        for one in (self, self.client, self.upstream, self.client._writer.protocol,
                    self.upstream._writer.protocol, self.renewal):  # fmt: skip
            if one is not None:
                watched.add((id(one), type(one)))
        return await run(self)

    monkeypatch.setattr(Bridge, "run", watch)
    return watched


def in_cycles(found: list[Any], watched: set[tuple[int, type]]) -> list[str]:
    """The watched objects among those ``found`` unreachable, by type name."""
    return [type(o).__name__ for o in found if (id(o), type(o)) in watched]
