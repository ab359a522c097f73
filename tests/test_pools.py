"""Upstream pools: priority, weight, failover, ejection and recovery; the status page."""

from __future__ import annotations

import random
import socket
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
import structlog
from yarl import URL

from relay.edge.auth import hash_key
from relay.errors import UpstreamRefused
from relay.ops.config import BackendConfig, CredentialConfig, DeploymentConfig
from relay.state import STATE
from relay.upstream.backends import Backend, BackendPool
from relay.upstream.credentials import ApiKeyCredential
from tests.helpers import ALPHA_KEY, AZURE_KEY, UPGRADE, FakeUpstream, read_until, relay_config

ADMIN_KEY = "rk-admin-key-0001"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pool(*specs: tuple[str, int, float], clock: Clock | None = None) -> BackendPool:
    backends = [
        BackendConfig(
            name, "https://r.openai.azure.com", CredentialConfig(), priority=prio, weight=w
        )
        for name, prio, w in specs
    ]
    deployment = DeploymentConfig("d", backends=tuple(backends))
    return BackendPool(
        deployment,
        [Backend(b, URL(b.endpoint), ApiKeyCredential("k")) for b in deployment.backends],
        eject_after_failures=2,
        eject_seconds=30.0,
        clock=clock or Clock(),
        rng=random.Random(7),
    )


REFUSED = UpstreamRefused(502, "upstream_unavailable", "x")


# --- pure ------------------------------------------------------------------------------------


def test_priority_then_weight():
    p = pool(("a", 1, 3.0), ("b", 1, 1.0), ("c", 2, 10.0))
    firsts = Counter(p.candidates()[0].name for _ in range(4000))
    assert firsts["c"] == 0
    assert 0.70 < firsts["a"] / 4000 < 0.80  # 3:1
    assert all(p.candidates()[-1].name == "c" for _ in range(50))  # lower priority last


def test_ejection_cool_down_probe_and_recovery():
    clock = Clock()
    p = pool(("a", 1, 1.0), ("b", 2, 1.0), clock=clock)
    a = p.backends[0]
    p.failed(a, REFUSED)
    assert a.state(clock.now) == "failing" and p.candidates()[0] is a
    p.failed(a, REFUSED)
    assert a.state(clock.now) == "ejected"
    assert [b.name for b in p.candidates()] == ["b"]
    clock.now += 30
    assert p.candidates()[0] is a  # probed again after the cool-down
    p.failed(a, REFUSED)  # the probe fails: ejected again at once
    assert a.state(clock.now) == "ejected"
    clock.now += 30
    p.succeeded(a)
    assert a.state(clock.now) == "healthy" and a.consecutive_failures == 0


def test_retry_after_keeps_sessions_away_then_429_when_all_are_limited():
    clock = Clock()
    p = pool(("a", 1, 1.0), clock=clock)
    p.failed(p.backends[0], UpstreamRefused(429, "upstream_rate_limited", "x", retry_after="12"))
    assert p.candidates() == []
    refusal = p.unavailable_refusal()
    assert (refusal.status, refusal.retry_after) == (429, "12")
    clock.now += 12
    assert p.candidates() == p.backends


def test_no_backend_available_is_503_with_retry_after():
    clock = Clock()
    p = pool(("a", 1, 1.0), clock=clock)
    for _ in range(2):
        p.failed(p.backends[0], REFUSED)
    refusal = p.unavailable_refusal()
    assert (refusal.status, refusal.code, refusal.retry_after) == (
        503,
        "no_backend_available",
        "30",
    )


# --- over sockets ----------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def pooled_config(backends: list[dict], **upstream):
    for backend in backends:
        backend.setdefault("credential", {"env": "TEST_AZURE_KEY"})
    return relay_config(
        "http://unused.invalid",
        deployments={"gpt-realtime": {"backends": backends}},
        upstream=upstream,
        admin={"keys": [hash_key(ADMIN_KEY)]},
    )


def backend_of(fake_or_sim) -> str:
    return str(fake_or_sim.make_url("")) if hasattr(fake_or_sim, "make_url") else fake_or_sim.url


async def one_session(http, relay) -> None:
    url = relay.make_url("/openai/v1/realtime?model=gpt-realtime")
    async with http.ws_connect(url, headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")


@pytest.mark.parametrize("status", [401, 429, 503, None])
async def test_sessions_land_on_the_healthy_backend(
    simulator, start_fake, start_relay, http, status
):
    if status is None:
        bad_url = closed_port()
    else:
        bad = FakeUpstream(refuse_status=status, refuse_headers={"Retry-After": "3"})
        bad_url = backend_of(await start_fake(bad.app()))
    config = pooled_config(
        [
            {"name": "bad", "endpoint": bad_url, "priority": 1},
            {"name": "good", "endpoint": simulator.url, "priority": 2},
        ]
    )
    relay = await start_relay(config)
    with structlog.testing.capture_logs() as logs:
        for _ in range(4):
            await one_session(http, relay)
    # Every session was served: only the failure's own line says why the backend failed.
    failed = [e for e in logs if e["event"] == "upstream_connect_failed"]
    assert failed and all(e["backend"] == "bad" for e in failed)
    expected = "ConnectionRefusedError" if status is None else "HandshakeRefused"
    assert all(e["cause"].startswith(expected) for e in failed), failed
    state = relay.app[STATE]
    bad_backend, good_backend = state.live.pools["gpt-realtime"].backends
    assert bad_backend.consecutive_failures >= 1 or bad_backend.state(0) != "healthy"
    failures = state.metrics.registry.get_sample_value(
        "relay_upstream_connect_failures_total",
        {"deployment": "gpt-realtime", "backend": "bad", "reason": _reason(status)},
    )
    assert failures and failures >= 1
    assert good_backend.consecutive_failures == 0


def _reason(status: int | None) -> str:
    return {401: "upstream_auth_failed", 429: "upstream_rate_limited", 503: "upstream_error"}.get(
        status, "upstream_unavailable"
    )


async def test_weight_spreads_sessions(start_fake, start_relay, http):
    heavy, light = FakeUpstream(), FakeUpstream()
    config = pooled_config(
        [
            {"name": "heavy", "endpoint": backend_of(await start_fake(heavy.app())), "weight": 3},
            {"name": "light", "endpoint": backend_of(await start_fake(light.app())), "weight": 1},
        ]
    )
    relay = await start_relay(config)
    relay.app[STATE].live.pools["gpt-realtime"].rng.seed(11)
    for _ in range(80):
        await one_session(http, relay)
    assert len(heavy.requests) + len(light.requests) == 80
    assert 0.6 < len(heavy.requests) / 80 < 0.9, (len(heavy.requests), len(light.requests))
    registry = relay.app[STATE].metrics.registry
    assert (
        registry.get_sample_value(
            "relay_backend_up", {"deployment": "gpt-realtime", "backend": "light"}
        )
        == 1
    )


async def test_ejection_and_recovery_end_to_end(simulator, start_fake, start_relay, http):
    flaky = FakeUpstream(refuse_status=503)
    flaky_server = await start_fake(flaky.app())
    config = pooled_config(
        [
            {"name": "primary", "endpoint": backend_of(flaky_server), "priority": 1},
            {"name": "secondary", "endpoint": simulator.url, "priority": 2},
        ],
        eject_after_failures=2,
        eject_seconds=60,
    )
    relay = await start_relay(config)
    state = relay.app[STATE]
    pool_ = state.live.pools["gpt-realtime"]
    clock = Clock()
    pool_.clock = clock
    for _ in range(5):
        await one_session(http, relay)
    assert len(flaky.requests) == 2  # ejected after two failures: not tried again
    registry = state.metrics.registry
    labels = {"deployment": "gpt-realtime", "backend": "primary"}
    assert registry.get_sample_value("relay_backend_up", labels) == 0
    assert registry.get_sample_value("relay_backend_ejections_total", labels) == 1

    async with http.get(
        relay.make_url("/status"), headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as r:
        assert r.status == 200
        page = await r.json()
    primary = page["deployments"]["gpt-realtime"]["backends"][0]
    assert (primary["name"], primary["state"]) == ("primary", "ejected")
    assert AZURE_KEY not in str(page)

    # The cool-down passes with the backend still down: it stays down until the next
    # session probes it (it went back to 1, and its alerts resolved, with nothing up).
    clock.now += 61
    assert registry.get_sample_value("relay_backend_up", labels) == 0
    # It comes back: the next session probes it.
    flaky.refuse_status = None
    await one_session(http, relay)
    assert len(flaky.requests) == 3
    assert pool_.backends[0].state(clock.now) == "healthy"
    assert registry.get_sample_value("relay_backend_up", labels) == 1


async def test_status_page_needs_the_admin_key(simulator, start_relay, http):
    relay = await start_relay(pooled_config([{"name": "only", "endpoint": simulator.url}]))
    for headers in ({}, {"api-key": ALPHA_KEY}, {"Authorization": "Bearer nope"}):
        async with http.get(relay.make_url("/status"), headers=headers) as response:
            assert response.status == 401


async def test_all_backends_down_is_an_honest_answer(start_relay, http):
    config = pooled_config(
        [{"name": "a", "endpoint": closed_port()}, {"name": "b", "endpoint": closed_port()}],
        eject_after_failures=1,
    )
    relay = await start_relay(config)
    url = relay.make_url("/openai/v1/realtime?model=gpt-realtime")
    upgrade = {**UPGRADE, "api-key": ALPHA_KEY}
    async with http.get(url, headers=upgrade) as response:
        assert response.status == 502
    async with http.get(url, headers=upgrade) as response:  # both ejected now
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "no_backend_available"
        assert int(response.headers["Retry-After"]) >= 1


def test_a_rate_limited_backend_is_never_ejected_for_it():
    """Three 429s in a row ejected the backend: a quota event was answered 503 "no backend"
    (paging as an outage) and kept it out for eject_seconds, not Azure's Retry-After."""
    clock = Clock()
    p = pool(("a", 1, 1.0), clock=clock)
    for _ in range(5):
        p.failed(p.backends[0], UpstreamRefused(429, "upstream_rate_limited", "x", retry_after="3"))
        assert p.backends[0].state(clock.now) == "rate_limited"
        refusal = p.unavailable_refusal()
        assert (refusal.status, refusal.code, refusal.retry_after) == (
            429, "upstream_rate_limited", "3"
        )  # fmt: skip
    clock.now += 3
    assert p.candidates() == p.backends
