"""The event loop's lag: how late a timer runs, checked every `TICK_SECONDS`.

An async gateway is behind exactly when its loop is: every frame waits for the callbacks
ahead of it. The lag is the direct measure (`relay_event_loop_lag_seconds`). A tick later
than `LAGGING_SECONDS` is also logged with the share of that wait the process spent on a
CPU: near 1, the relay itself was busy (a long callback, or more work than one core does);
near 0, it was runnable but waiting for a core, or blocked in a system call (the machine,
not the relay's code). That is the first question of a stall at 3 a.m.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

TICK_SECONDS = 0.1
LAGGING_SECONDS = 0.25
# Seconds; from a timer's own jitter to a loop stopped for seconds.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

_log = structlog.get_logger("relay.loop")


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class LoopLag:
    """Schedules itself every ``tick`` seconds and observes how late each run is."""

    __slots__ = ("_histogram", "_tick", "_lagging", "_clock", "_cpu", "_due", "_cpu_at", "_handle")

    def __init__(
        self,
        histogram: Observer,
        *,
        tick: float = TICK_SECONDS,
        lagging: float = LAGGING_SECONDS,
        clock: Callable[[], float] = time.perf_counter,
        cpu: Callable[[], float] = time.process_time,
    ) -> None:
        self._histogram = histogram
        self._tick = tick
        self._lagging = lagging
        self._clock = clock
        self._cpu = cpu
        self._due = self._cpu_at = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._schedule(asyncio.get_running_loop())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = self._clock() + self._tick
        self._cpu_at = self._cpu()
        self._handle = loop.call_later(self._tick, self._run, loop)

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        lag = self.observe(self._clock(), self._cpu())
        if lag is not None:
            _log.warning("event_loop_lagging", **lag)
        self._schedule(loop)

    def observe(self, now: float, cpu: float) -> dict[str, Any] | None:
        """Record a run at ``now`` (``cpu``: the process's CPU seconds); what to log when it
        ran later than the bound, else None."""
        lag = max(0.0, now - self._due)
        self._histogram.observe(lag)
        if lag <= self._lagging:
            return None
        waited = self._tick + lag
        share = min(1.0, max(0.0, (cpu - self._cpu_at) / waited))
        return {"lag_seconds": round(lag, 3), "cpu_share": round(share, 2)}
