"""process_* of every relay process for the supervisor's scrape under `--workers`.

prometheus-client's multiprocess mode sums the workers' own metric files, and custom
collectors such as `ProcessCollector` have no file: each worker's CPU, memory and file
descriptors would be missing. The supervisor reads them from /proc for each live worker (and
itself), labelled by `pid` like the multiprocess gauges.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import ProcessCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector


class WorkerProcesses(Collector):
    def __init__(self, pids: Callable[[], Iterable[int]]) -> None:
        self._pids = pids
        self._collectors: dict[int, ProcessCollector] = {}

    def collect(self) -> Iterator[Metric]:
        pids = [os.getpid(), *self._pids()]
        self._collectors = {pid: self._collector(pid) for pid in pids}
        families: dict[str, Metric] = {}
        for pid, collector in self._collectors.items():
            for family in collector.collect():
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "pid": str(pid)}, sample.value)
        yield from families.values()

    def _collector(self, pid: int) -> ProcessCollector:
        known = self._collectors.get(pid)
        if known is not None:
            return known
        return ProcessCollector(pid=lambda: pid, registry=None)
