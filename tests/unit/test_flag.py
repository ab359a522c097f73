"""relay.session.flag: asyncio.Event's behaviour, without its per-instance deque."""

from __future__ import annotations

import asyncio

from relay.session.flag import Flag


async def test_wait_returns_at_once_when_set() -> None:
    flag = Flag(True)
    await asyncio.wait_for(flag.wait(), 1.0)
    assert flag.is_set()


async def test_set_wakes_every_waiter_and_clear_holds_the_next() -> None:
    flag = Flag()
    waiters = [asyncio.ensure_future(flag.wait()) for _ in range(3)]
    await asyncio.sleep(0)  # one loop pass: the waiters start waiting
    assert not any(w.done() for w in waiters)
    flag.set()
    await asyncio.wait_for(asyncio.gather(*waiters), 1.0)
    flag.clear()
    held = asyncio.ensure_future(flag.wait())
    await asyncio.sleep(0)  # one loop pass: the waiters start waiting
    assert not held.done()
    flag.set()
    await asyncio.wait_for(held, 1.0)


async def test_a_cancelled_waiter_is_forgotten() -> None:
    flag = Flag()
    waiter = asyncio.ensure_future(flag.wait())
    await asyncio.sleep(0)  # one loop pass: the waiters start waiting
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert not flag._waiters
    flag.set()  # nothing left to wake
    assert flag.is_set()
