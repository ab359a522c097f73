"""Spreading a burst of set-ups over passes of the event loop.

asyncio runs every callback that is ready in one pass. When 1,000 clients arrive at once (a
replica restarted, its clients reconnecting here), 1,000 set-ups take their first steps in
the same pass, and every live session's frames wait for all of them: about 100 ms. The gate
lets at most `per_pass` set-ups on in one pass and the rest in the passes after, in order;
live sessions' frames run between. It holds no set-up back for longer than the burst takes.
"""

from __future__ import annotations

import asyncio
from collections import deque


class PassGate:
    """At most ``per_pass`` callers of `turn` go on in one pass of the loop."""

    __slots__ = ("per_pass", "_used", "_waiting", "_scheduled")

    def __init__(self, per_pass: int = 32) -> None:
        self.per_pass = per_pass
        self._used = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._scheduled = False

    async def turn(self) -> None:
        if self._used < self.per_pass and not self._waiting:
            self._used += 1
            self._next_pass_soon()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        self._next_pass_soon()
        await waiter

    def _next_pass_soon(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._next_pass)

    def _next_pass(self) -> None:
        # Runs in the pass after the one that scheduled it: a new pass's allowance.
        self._scheduled = False
        self._used = 0
        waiting = self._waiting
        while waiting and self._used < self.per_pass:
            waiter = waiting.popleft()
            if not waiter.done():  # a caller cancelled meanwhile takes no place
                waiter.set_result(None)
                self._used += 1
        if waiting or self._used:
            self._next_pass_soon()
