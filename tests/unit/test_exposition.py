"""The sliced scrape writes exactly what `generate_latest` writes, and serves the loop between
slices."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    enable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeHistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from relay.ops.exposition import exposition


class _GaugeHistograms:
    """A collector whose family has samples `generate_latest` moves out (`_gsum`, `_gcount`)."""

    def collect(self):
        family = GaugeHistogramMetricFamily("queue_sizes", "Sizes.", labels=["queue"])
        for n in range(30):
            family.add_metric([f"q{n}"], [("1.0", n), ("+Inf", 2 * n)], gsum_value=3 * n)
        yield family


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    frames = Counter("frames", "Frames.", ["team", "direction"], registry=registry)
    for n in range(120):
        frames.labels(f"team-{n}", "in" if n % 2 else "out").inc(n)
    delay = Histogram("delay_seconds", "Delay,\nper frame \\ all.", ["team"], registry=registry)
    for n in range(12):
        delay.labels(f"team-{n}").observe(n / 1000)
    odd = Gauge("odd", "Label values to escape.", ["value"], registry=registry)
    odd.labels('a "quoted"\nline \\ end').set(1.5)
    Gauge("plain", "No labels.", registry=registry).set(-2)
    Counter("unused", "No children yet.", ["team"], registry=registry)
    Info("build", "Build.", registry=registry).info({"version": "1.2.3"})
    Enum("state", "State.", states=["a", "b"], registry=registry).state("b")
    registry.register(_GaugeHistograms())
    return registry


@pytest.mark.parametrize("created", [False, True])
@pytest.mark.parametrize("slice_samples", [1, 2, 7, 50, 10_000])
async def test_the_bytes_are_generate_latests(slice_samples, created):
    # With `_created` samples (the relay disables them), generate_latest moves each family's
    # into a gauge family after it, as it does `_gsum` and `_gcount`.
    (enable_created_metrics if created else disable_created_metrics)()
    try:
        registry = _registry()
        registry.set_target_info({"service": "relay"})
        assert await exposition(registry, slice_samples) == generate_latest(registry)
    finally:
        disable_created_metrics()  # as relay.ops.metrics leaves it


async def test_the_loop_is_served_between_slices():
    registry = _registry()
    # A gauge histogram is formatted whole (its `_gsum` and `_gcount` leave the family).
    sliced = sum(len(f.samples) for f in registry.collect() if f.type != "gaugehistogram")
    done = False
    passes = 0

    async def other_work() -> None:
        nonlocal passes
        while not done:
            passes += 1
            await asyncio.sleep(0)  # one loop pass, counted

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(other_work())
        await asyncio.sleep(0)  # let it start
        before = passes
        await exposition(registry, 10)
        done = True
    # A pass at least every 10 samples (small families go together up to 10).
    assert passes - before >= sliced // 10 - 1


async def test_series_added_and_removed_during_a_scrape():
    """Between slices the relay goes on: new sessions add label children, a reload removes
    some. The scrape still completes and parses, each family's header once."""
    registry = CollectorRegistry()
    frames = Counter("frames", "Frames.", ["team"], registry=registry)
    for n in range(100):
        frames.labels(f"team-{n}").inc()
    done = False

    async def churn() -> None:
        n = 100
        while not done:
            frames.labels(f"team-{n}").inc()
            frames.remove(f"team-{n - 100}")
            n += 1
            await asyncio.sleep(0)  # one loop pass: a slice of the scrape may run between

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(churn())
        text = (await exposition(registry, 5)).decode()
        done = True
    [family] = text_string_to_metric_families(text)
    assert family.name == "frames" and len(family.samples) >= 100
    assert text.count("# TYPE frames_total counter") == 1
