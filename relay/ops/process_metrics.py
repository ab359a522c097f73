"""The supervisor's scrape under `--workers`: the workers' metric files, and process_* of
every relay process.

prometheus-client's multiprocess mode sums the workers' own metric files, and custom
collectors such as `ProcessStats` (process_*) have no file: each worker's CPU, memory and file
descriptors would be missing. The supervisor reads them from /proc for each live worker (and
itself), labelled by `pid` like the multiprocess gauges.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from relay.ops.process_collector import ProcessStats

# A metric file starts with its 8-byte header; a shorter one is still being created.
_HEADER_BYTES = 8


class WorkerMetricFiles(MultiProcessCollector):
    """MultiProcessCollector, minus the files a starting worker has created but not yet sized:
    reading one fails the whole scrape (prometheus/client_python#1199), and a worker killed
    in that instant would leave it for good."""

    def __init__(
        self,
        registry: CollectorRegistry | None,
        path: str,
        shape: Callable[[list[Metric]], list[Metric]] | None = None,
    ) -> None:
        """``shape``: the supervisor's last word on the merged families (its own counts
        added, series of what a reload removed left out)."""
        super().__init__(registry, path=path)  # type: ignore[no-untyped-call]
        self._directory = path
        self._shape = shape

    def collect(self) -> Iterable[Metric]:
        files = [
            f for f in glob.glob(os.path.join(self._directory, "*.db")) if _size(f) >= _HEADER_BYTES
        ]
        families: list[Metric] = list(self.merge(files, accumulate=True))  # type: ignore[no-untyped-call]
        return families if self._shape is None else self._shape(families)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:  # gone meanwhile (a dead worker's live gauges)
        return 0


class WorkerProcesses(Collector):
    def __init__(self, pids: Callable[[], Iterable[int]]) -> None:
        self._pids = pids
        self._collectors: dict[int, ProcessStats] = {}

    def collect(self) -> Iterator[Metric]:
        pids = [os.getpid(), *self._pids()]
        self._collectors = {pid: self._collector(pid) for pid in pids}
        families: dict[str, Metric] = {}
        for pid, collector in self._collectors.items():
            try:
                collected = list(collector.collect())
            except Exception:  # an exiting worker's /proc is half gone
                continue
            for family in collected:
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "pid": str(pid)}, sample.value)
        yield from families.values()

    def _collector(self, pid: int) -> ProcessStats:
        known = self._collectors.get(pid)
        if known is not None:
            return known
        return ProcessStats(pid=lambda: pid, registry=None)
