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
import trustme
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from relay.app import create_metrics_app
from relay.edge.auth import hash_key
from relay.edge.tls import CertificateWatch, server_ssl_context
from relay.ops.config import TlsConfig
from relay.ops.metrics import Metrics
from relay.ops.workers import SUPERVISOR_METRICS
from relay.state import STATE
from tests.helpers import ALPHA_KEY, ENVIRON, read_until, relay_config
from tests.processes import needs_redis, redis_server
from tests.test_entra_relay import identity  # noqa: F401 (a fixture)
from tests.test_metrics_e2e import voice_turn
from tests.test_webrtc import CALLS, OFFER, SDP, SECRETS, post

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
    return names | SUPERVISOR_METRICS


def used_metrics(text: str) -> set[str]:
    """relay_* and process_* names in PromQL, leaving label values (in quotes) out."""
    return set(re.findall(r"\b(?:relay|process)_[a-z_]+", re.sub(r'"[^"]*"', "", text)))


def dashboard() -> dict:
    return orjson.loads((DEPLOY / "grafana" / "realtime-relay.json").read_bytes())


def promql_targets(board: dict) -> list[str]:
    """Every Prometheus query of the dashboard (the logs panel's LogQL aside)."""
    return [
        target["expr"]
        for panel in board["panels"]
        if panel.get("datasource", {}).get("type") == "prometheus"
        for target in panel.get("targets", [])
    ]


def as_run(expr: str) -> str:
    """A dashboard query as Grafana sends it with every variable at All."""
    for variable in ("$cluster", "$namespace", "$team", "$deployment"):
        expr = expr.replace(variable, ".*")
    return expr.replace("$__rate_interval", "1m")


def test_dashboard_has_the_panels_and_variables_an_sre_needs():
    board = dashboard()
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "cluster", "namespace", "team", "deployment"} <= variables
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    for needed in (
        "Pools and ejections", "WebRTC", "Stalls and backpressure", "Usage, spend and budgets",
    ):  # fmt: skip
        assert needed in rows
    for expr in promql_targets(board):
        if "relay_" in expr or "process_" in expr:
            assert 'namespace=~"$namespace"' in expr and 'cluster=~"$cluster"' in expr, expr
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


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


LIVE_KEY_BETA = "rk-beta-live-dashboard"


def live_config(simulator_url: str):
    """Everything the dashboard graphs, in use: two backends (one with Entra), a refused
    deployment, prices and a budget, Redis admission, whisper transcription."""
    return relay_config(
        simulator_url,
        admission={"backend": "redis"},
        deployments={
            "gpt-realtime": {
                "session": {"audio": {"input": {"transcription": {"model": "whisper-1"}}}},
                "prices": {"output_audio": 64, "output_text": 16, "transcription_per_minute": 0.006},
                "backends": [
                    {"name": "primary", "endpoint": simulator_url,
                     "credential": {"env": "TEST_AZURE_KEY"}},
                    {"name": "standby", "endpoint": simulator_url, "priority": 2,
                     "credential": {"type": "entra", "method": "managed-identity"}},
                ],
            },
            "other": {"endpoint": "http://127.0.0.1:9", "credential": {"env": "TEST_AZURE_KEY"}},
        },
        teams={
            "alpha": {
                "keys": [hash_key(ALPHA_KEY)],
                "deployments": ["gpt-realtime"],
                "limits": {"max_usd_per_month": 100.0},
            },
            "beta": {"keys": [hash_key(LIVE_KEY_BETA)], "deployments": ["other"]},
        },
    )  # fmt: skip


async def use_everything(relay) -> None:
    """A voice turn, a refused event, an upstream error, refusals, WebRTC."""
    await voice_turn(relay.port)
    url = relay.make_url("/openai/v1/realtime?model=gpt-realtime")
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url, headers={"api-key": ALPHA_KEY}) as ws:
            await read_until(ws, "session.created")
            await ws.send_bytes(b"binary")  # a policy violation
            await read_until(ws, "error")
            await ws.send_str('{"type": "input_audio_buffer.commit"}')  # empty: upstream error
            await read_until(ws, "error")
        for key, model in ((LIVE_KEY_BETA, "other"), ("rk-wrong", "gpt-realtime")):
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await http.ws_connect(
                    relay.make_url(f"/openai/v1/realtime?model={model}"), headers={"api-key": key}
                )
        body = {"session": {"type": "realtime", "model": "gpt-realtime"}}
        status, _, minted = await post(http, relay.make_url(SECRETS), json=body)
        assert status == 200, minted
        status, _, _ = await post(
            http, relay.make_url(CALLS), key=minted["value"], data=OFFER, headers=SDP
        )
        assert status == 201
        status, _, _ = await post(
            http, relay.make_url(CALLS), key="rk-wrong", data=OFFER, headers=SDP
        )
        assert status == 401


@needs_prometheus
@needs_redis
@pytest.mark.usefixtures("identity")  # the standby backend's Entra token endpoint
async def test_every_dashboard_query_answers_from_a_live_scrape(
    simulator, start_relay, aiohttp_server, tmp_path
):
    async with redis_server(tmp_path) as redis_url:
        relay = await start_relay(
            live_config(simulator.url), environ={**ENVIRON, "RELAY_REDIS_URL": redis_url}
        )
        state = relay.app[STATE]
        await use_everything(relay)
        await state.idle.wait()
        # The TLS listener's certificate, as `relay serve` watches it with [server.tls].
        tls = TlsConfig(cert_file=tmp_path / "tls.crt", key_file=tmp_path / "tls.key")
        leaf = trustme.CA().issue_cert("relay.test")
        leaf.cert_chain_pems[0].write_to_path(str(tls.cert_file))
        leaf.private_key_pem.write_to_path(str(tls.key_file))
        expiry = state.metrics.tls_certificate_expiry.labels(str(tls.cert_file))
        CertificateWatch(server_ssl_context(tls), tls, expiry.set)
        listener = await aiohttp_server(create_metrics_app(state.metrics.registry))
        async with aiohttp.ClientSession() as http:
            async with http.get(listener.make_url("/metrics")) as response:
                scraped = await response.text()

        # Every metric the dashboard (panels and variables) and the alerts use is in the scrape.
        exported = {s.name for f in text_string_to_metric_families(scraped) for s in f.samples}
        board = dashboard()
        exprs = promql_targets(board)
        variables = [v["query"] for v in board["templating"]["list"] if v["type"] == "query"]
        used = set().union(*map(used_metrics, [*exprs, *variables]))
        used |= used_metrics((DEPLOY / "prometheus" / "alerts.yml").read_text())
        assert len(exprs) >= 30
        # (The supervisor's own series, under --workers: tests/test_workers.py has them.)
        assert used - exported - SUPERVISOR_METRICS == set(), "not in a live scrape"

        # A real Prometheus scrapes it and answers each query with data.
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
            # Two scrapes: enough for rate() and increase().
            await _query_until_answered(web_port, "count_over_time(relay_build_info[1m]) >= 2")
            result = await _query_until_answered(
                web_port, "sum by (le) (relay_time_to_first_audio_seconds_bucket)"
            )
            buckets = {r["metric"]["le"]: float(r["value"][1]) for r in result}
            assert buckets["+Inf"] == 1.0 and len(buckets) > 10
            empty = [expr for expr in exprs if not await _query(web_port, as_run(expr))]
            assert empty == [], "no data"
        finally:
            process.terminate()
            await process.wait()


async def _query(port: int, query: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query"
    async with aiohttp.ClientSession() as http:
        async with http.get(url, params={"query": query}) as response:
            data = await response.json()
            assert data["status"] == "success", (query, data)
            return data["data"]["result"]


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
