"""The event loop's lag: the pure reading with fake clocks, then a real loop held up."""

from __future__ import annotations

import asyncio
import time

import pytest
import structlog

from relay.ops.loop_lag import LoopLag


class Recorded:
    def __init__(self, over: float = 0.0) -> None:
        self.values: list[float] = []
        self.over = over
        self.seen: asyncio.Future[float] | None = None

    def observe(self, amount: float) -> None:
        self.values.append(amount)
        if self.seen is not None and amount > self.over and not self.seen.done():
            self.seen.set_result(amount)


def test_a_run_on_time_is_observed_and_not_logged():
    recorded = Recorded()
    lag = LoopLag(recorded, tick=0.1, lagging=0.25)
    lag._due, lag._cpu_at = 10.0, 1.0
    assert lag.observe(10.002, 1.0005) is None
    assert recorded.values == [pytest.approx(0.002)]


def test_a_late_run_says_how_much_of_the_wait_was_on_a_cpu():
    lag = LoopLag(Recorded(), tick=0.1, lagging=0.25)
    lag._due, lag._cpu_at = 10.0, 1.0
    # 0.9 s late, 1 s since the tick was set, 0.95 s of it on a CPU: the relay was busy.
    assert lag.observe(10.9, 1.95) == {"lag_seconds": 0.9, "cpu_share": 0.95}
    # Same lag, 0.05 s of CPU: the process waited for a core or in a system call.
    assert lag.observe(10.9, 1.05) == {"lag_seconds": 0.9, "cpu_share": 0.05}


def test_a_run_a_little_early_counts_as_no_lag():
    recorded = Recorded()
    lag = LoopLag(recorded)
    lag._due = 10.0
    lag.observe(9.9995, 0.0)  # uvloop rounds timers to whole milliseconds
    assert recorded.values == [0.0]


async def _held_up(hold: object) -> tuple[float, list[dict]]:
    recorded = Recorded(over=0.05)
    recorded.seen = asyncio.get_running_loop().create_future()
    lag = LoopLag(recorded, tick=0.01, lagging=0.05)
    lag.start()
    try:
        with structlog.testing.capture_logs() as logs:
            await asyncio.sleep(0)  # the tick is scheduled from here on
            hold()  # type: ignore[operator]
            seen = await asyncio.wait_for(recorded.seen, 5)
    finally:
        lag.stop()
    return seen, [e for e in logs if e["event"] == "event_loop_lagging"]


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def test_a_loop_held_by_work_is_logged_as_busy():
    seen, logged = await _held_up(lambda: _busy(0.2))
    assert seen >= 0.1
    assert logged and logged[0]["log_level"] == "warning"
    # Not 1.0: on a machine whose cores are shared (a test run beside other work), the
    # busy loop gets part of a core; a blocked loop (below) gets next to none.
    assert logged[0]["cpu_share"] >= 0.3


async def test_a_loop_held_off_a_cpu_is_logged_as_waiting():
    # The loop blocked without using a CPU: what a descheduled process looks like.
    seen, logged = await _held_up(lambda: time.sleep(0.2))  # blocks the loop: under test
    assert seen >= 0.1
    assert logged and logged[0]["cpu_share"] <= 0.2
