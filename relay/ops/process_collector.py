"""process_* of a process, as prometheus-client's `ProcessCollector` exports them, with its
open file descriptors counted without listing them.

The library counts `process_open_fds` with `os.listdir("/proc/<pid>/fd")`: a directory entry
per descriptor, so a relay carrying 1,000 sessions (two sockets each) spent 0.2-2.5 ms of
every scrape on its event loop listing them, longer than anything else a scrape does. Since
Linux 6.2 the size that `stat()` reports for that directory is the number of open
descriptors, read in about a microsecond. On older kernels (or another /proc) it is 0, and
the directory is listed as before. The listed count also included the descriptor the listing
itself held open; `stat()` does not open one, so it counts one fewer, the true figure.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric


class ProcessStats(ProcessCollector):
    """`ProcessCollector` (same families, names, help and values) with `open_fds` by stat."""

    def collect(self) -> Iterable[Metric]:
        if not self._btime:
            return []
        proc = os.path.join(self._proc, str(self._pid()).strip())
        prefix = self._prefix
        result: list[Metric] = []
        try:
            with open(os.path.join(proc, "stat"), "rb") as stat:
                # After the command name, which may hold spaces and parentheses.
                parts = stat.read().rsplit(b")", 1)[-1].split()
            ticks = self._ticks
            result += [
                GaugeMetricFamily(
                    prefix + "virtual_memory_bytes",
                    "Virtual memory size in bytes.",
                    value=float(parts[20]),
                ),
                GaugeMetricFamily(
                    prefix + "resident_memory_bytes",
                    "Resident memory size in bytes.",
                    value=float(parts[21]) * self._pagesize,
                ),
                GaugeMetricFamily(
                    prefix + "start_time_seconds",
                    "Start time of the process since unix epoch in seconds.",
                    value=float(parts[19]) / ticks + self._btime,
                ),
                CounterMetricFamily(
                    prefix + "cpu_seconds_total",
                    "Total user and system CPU time spent in seconds.",
                    value=(float(parts[11]) + float(parts[12])) / ticks,
                ),
            ]
        except OSError:
            pass
        try:
            max_fds = _max_open_files(os.path.join(proc, "limits"))
            open_fds = GaugeMetricFamily(
                prefix + "open_fds",
                "Number of open file descriptors.",
                value=open_descriptors(os.path.join(proc, "fd")),
            )
            result += [
                open_fds,
                GaugeMetricFamily(
                    prefix + "max_fds", "Maximum number of open file descriptors.", value=max_fds
                ),
            ]
        except OSError:
            pass
        return result


def open_descriptors(fd_directory: str) -> int:
    """The number of entries in a process's /proc fd directory, in O(1) where the kernel
    gives it as the directory's size (Linux 6.2 and later)."""
    counted = os.stat(fd_directory).st_size
    if counted > 0:
        return counted
    return len(os.listdir(fd_directory))


def _max_open_files(limits_path: str) -> float:
    with open(limits_path, "rb") as limits:
        for line in limits:
            if line.startswith(b"Max open file"):
                return float(line.split()[3])
    raise OSError(f"no open-files limit in {limits_path}")
