"""The set-up gate: at most `per_pass` callers go on in one pass of the event loop, in the
order they came; the rest in the passes after."""

from __future__ import annotations

import asyncio

from relay.edge.pass_gate import PassGate


class PassCounter:
    """Counts the loop's passes: a callback that schedules itself again, once a pass."""

    def __init__(self) -> None:
        self.passes = 0
        self.running = True
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        self.passes += 1
        if self.running:
            asyncio.get_running_loop().call_soon(self._tick)


async def test_a_burst_goes_on_a_few_a_pass_in_order():
    gate = PassGate(per_pass=4)
    counter = PassCounter()
    went_on: list[tuple[int, int]] = []

    async def set_up(n: int) -> None:
        await gate.turn()
        went_on.append((n, counter.passes))

    await asyncio.gather(*(set_up(n) for n in range(10)))
    counter.running = False
    assert [n for n, _ in went_on] == list(range(10))  # in the order they came
    per_pass: dict[int, int] = {}
    for _, at in went_on:
        per_pass[at] = per_pass.get(at, 0) + 1
    assert sorted(per_pass.values(), reverse=True) == [4, 4, 2]  # three passes, four at most


async def test_a_lone_caller_does_not_wait():
    gate = PassGate(per_pass=4)
    for _ in range(4):
        # Each goes on at once: nothing to wait for while the pass has room.
        task = asyncio.ensure_future(gate.turn())
        await asyncio.sleep(0)  # one pass: the task's first step
        assert task.done()


async def test_a_cancelled_caller_takes_no_place():
    gate = PassGate(per_pass=1)
    counter = PassCounter()
    first, second, third = (asyncio.ensure_future(gate.turn()) for _ in range(3))
    await asyncio.sleep(0)  # all three ask in one pass: the first goes on, two wait
    assert first.done() and not second.done() and not third.done()
    asked_at = counter.passes
    second.cancel()
    await third  # in the next pass's place, which the cancelled one does not take
    counter.running = False
    assert second.cancelled()
    assert counter.passes - asked_at <= 3  # one pass later than had it taken a place
