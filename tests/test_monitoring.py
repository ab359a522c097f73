"""The monitoring kit: a real Prometheus scrapes the relay; alert rules and dashboard check out."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import orjson
import pytest
from prometheus_client import CollectorRegistry

from relay.app import create_metrics_app
from relay.ops.metrics import Metrics
from relay.state import STATE
from tests.helpers import relay_config
from tests.test_metrics_e2e import voice_turn

DEPLOY = Path(__file__).parent.parent / "deploy"
# Debian's `prometheus` package; .ci/run installs it. Without it these tests cannot run.
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="prometheus/promtool not installed (Debian package `prometheus`; .ci/run installs it)",
)


def metric_names() -> set[str]:
    names = set()
    for metric in Metrics.create(CollectorRegistry()).registry.collect():
        for sample_suffix in ("", "_total", "_bucket", "_sum", "_count"):
            names.add(metric.name + sample_suffix)
    return names


def used_metrics(text: str) -> set[str]:
    """relay_* names in PromQL, leaving label values (in quotes) out."""
    return set(re.findall(r"\brelay_[a-z_]+", re.sub(r'"[^"]*"', "", text)))


def test_dashboard_queries_only_metrics_we_export():
    dashboard = orjson.loads((DEPLOY / "grafana" / "realtime-relay.json").read_bytes())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    used = set().union(*map(used_metrics, exprs))
    assert used <= metric_names(), used - metric_names()


@needs_prometheus
def test_alert_rules_pass_promtool_and_use_our_metrics():
    rules = DEPLOY / "prometheus" / "alerts.yml"
    result = subprocess.run(
        ["promtool", "check", "rules", str(rules)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    used = used_metrics(rules.read_text())
    assert used <= metric_names(), used - metric_names()


@needs_prometheus
def test_alert_rules_pass_their_unit_tests():
    result = subprocess.run(
        ["promtool", "test", "rules", "alerts.test.yml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_staying_silent():
    import yaml

    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alerts = {r["alert"] for group in rules["groups"] for r in group["rules"] if "alert" in r}
    tests = yaml.safe_load((DEPLOY / "prometheus" / "alerts.test.yml").read_text())
    cases = [case for test in tests["tests"] for case in test["alert_rule_test"]]
    fired = {c["alertname"] for c in cases if c.get("exp_alerts")}
    silent = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert alerts - fired == set(), "never seen firing"
    assert alerts - silent == set(), "never seen silent"
    assert len(alerts) >= 12


@needs_prometheus
async def test_a_real_prometheus_scrapes_time_to_first_audio(
    simulator, start_relay, aiohttp_server, tmp_path
):
    relay = await start_relay(relay_config(simulator.url))
    state = relay.app[STATE]
    listener = await aiohttp_server(create_metrics_app(state.metrics.registry))
    await voice_turn(relay.port)
    await state.idle.wait()

    web_port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: relay\n    static_configs: [{{targets: ['127.0.0.1:{listener.port}']}}]\n"
    )
    process = await asyncio.create_subprocess_exec(
        "prometheus",
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{web_port}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        query = "sum by (le) (relay_time_to_first_audio_seconds_bucket)"
        result = await _query_until_answered(web_port, query)
        buckets = {r["metric"]["le"]: float(r["value"][1]) for r in result}
        assert buckets["+Inf"] == 1.0
        assert len(buckets) > 10
    finally:
        process.terminate()
        await process.wait()


async def _query_until_answered(port: int, query: str) -> list[dict]:
    """Poll Prometheus's HTTP API until the query has data (a scrape and an ingest)."""
    url = f"http://127.0.0.1:{port}/api/v1/query"
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            try:
                async with http.get(url, params={"query": query}) as response:
                    if response.status == 200:
                        data = await response.json()
                        if data["data"]["result"]:
                            return data["data"]["result"]
            except aiohttp.ClientConnectionError:
                pass  # not listening yet
            # An external process's scrape interval: there is no event to await.
            await asyncio.sleep(0.1)
    raise AssertionError("Prometheus never returned the series")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
