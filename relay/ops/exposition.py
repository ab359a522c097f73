"""The metrics scrape, collected and written a slice at a time: frames keep flowing meanwhile.

`prometheus_client.generate_latest` collects and formats every sample in one go, on the event
loop: 8 us a sample warm, more in a busy relay. The bench's relay (one team, one deployment:
202 samples) held every session's frames for 3 ms a scrape, and the series grow with teams,
deployments and backends: 12,600 samples (100 teams, 3 deployments) held the loop for 98 ms,
a gap every caller hears, at every scrape. Here a family is collected from its children and
formatted `SLICE_SAMPLES` samples at a time, and the loop serves what is ready between
slices. The bytes are `generate_latest`'s (`tests/unit/test_exposition.py` holds them to it);
a family cut into slices keeps its one `# HELP` and `# TYPE` header, as the text format
requires.

The samples are read as they are formatted, not all at one instant: a scrape was never
atomic across series (each child has its own lock), and Prometheus takes each as it comes.

prometheus_client internals used (pinned below 0.27; the test fails CI when they move): the
registry's `_lock`, `_collector_to_names`, `_target_info` and `_target_info_metric()`, what
its `collect()` walks; and a metric's `_get_metric()`, `_samples()` and `_name`, what its own
`collect()` is made of. Other collectors (process, platform, GC) are collected whole.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric

# Samples collected and formatted between two passes of the loop: under 1 ms of work.
SLICE_SAMPLES = 50
# Samples `generate_latest` moves out of their family, into gauge families of their own
# after it, in this order (none of the relay's: `_created` is disabled).
_MOVED_SUFFIXES = ("_created", "_gcount", "_gsum")


class _Families:
    """What `generate_latest` takes: anything with `collect()`."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


async def exposition(registry: CollectorRegistry, slice_samples: int = SLICE_SAMPLES) -> bytes:
    """``generate_latest(registry)``, with the loop served every ``slice_samples`` samples."""
    parts: list[bytes] = []
    budget = slice_samples  # samples before the next pass of the loop
    for family, samples in _families(registry):
        if family is None:  # a collector collected whole (its own slice: /proc reads) is next
            if budget < slice_samples:
                budget = slice_samples
                await asyncio.sleep(0)
            continue
        moved_names = {family.name + suffix: suffix for suffix in _MOVED_SUFFIXES}
        moved: dict[str, list[Any]] = {}
        chunk: list[Any] = []
        header = True  # `# HELP` and `# TYPE` once a family, before its first slice
        for sample in samples:
            suffix = moved_names.get(sample.name)
            if suffix is None:
                chunk.append(sample)
            else:
                moved.setdefault(suffix, []).append(sample)
            budget -= 1
            if budget == 0:
                parts.append(_format(family, chunk, header))
                chunk, header, budget = [], False, slice_samples
                await asyncio.sleep(0)
        if chunk or header:
            parts.append(_format(family, chunk, header))
        for suffix in _MOVED_SUFFIXES:
            if suffix in moved:
                gauge = Metric(family.name + suffix, family.documentation, "gauge")
                parts.append(_format(gauge, moved[suffix], header=True))
    return b"".join(parts)


def _format(family: Metric, samples: list[Any], header: bool) -> bytes:
    part = copy.copy(family)
    part.samples = samples
    text = generate_latest(_Families((part,)))
    return text if header else text.split(b"\n", 2)[2]


def _families(
    registry: CollectorRegistry,
) -> Iterator[tuple[Metric | None, Iterable[Any]]]:
    """The registry's families in `collect()`'s order, each with its samples: a metric's
    collected lazily (each read as it is consumed), any other collector's collected whole,
    between two marks (no family) where the loop may be served."""
    internals: Any = registry
    with internals._lock:
        collectors = list(internals._collector_to_names)
        target_info = internals._target_info_metric() if internals._target_info else None
    if target_info is not None:
        yield target_info, target_info.samples
    for collector in collectors:
        if isinstance(collector, MetricWrapperBase):
            metric: Any = collector
            yield metric._get_metric(), _as_samples(metric)
        else:
            yield None, ()
            for family in collector.collect():
                yield family, family.samples
            yield None, ()


def _as_samples(metric: Any) -> Iterator[Any]:
    """A metric's samples, as its `collect()` adds them to its family, one at a time."""
    family = metric._get_metric()
    name = metric._name
    for suffix, *rest in metric._samples():
        family.add_sample(name + suffix, *rest)
        yield family.samples.pop()
