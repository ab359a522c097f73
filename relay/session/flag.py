"""A flag a task can wait for: asyncio.Event's `set`/`clear`/`is_set`/`wait`, lighter.

An `asyncio.Event` makes a deque for its waiters when it is made (with the Event's own
`__dict__`, about 0.7 KiB), and a session has two that almost nobody ever waits on: the
continuity gate and the drain's "between responses". A Flag makes its waiters' list only
when a task waits.
"""

from __future__ import annotations

import asyncio


class Flag:
    """Set or clear; `wait` returns once it is set (at once if it is)."""

    __slots__ = ("value", "_waiters")

    def __init__(self, value: bool = False) -> None:
        # Read it where a method call per frame counts (`is_set` is the same); set it with
        # `set` and `clear` alone.
        self.value = value
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self.value

    def set(self) -> None:
        if self.value:
            return
        self.value = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self.value = False

    async def wait(self) -> None:
        if self.value:
            return
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
