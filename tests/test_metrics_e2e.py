"""Metrics end to end: a session through relay and simulator, then what /metrics says."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import aiohttp
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from relay.app import create_metrics_app
from relay.edge.auth import hash_key
from relay.state import STATE
from tests.helpers import ALPHA_KEY, ENVIRON, UPGRADE, b64, relay_config, tone_pcm
from tests.processes import free_port, relay_process


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[s.name, frozenset(s.labels.items())] = s.value
    return found


def value(found, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


async def voice_turn(port: int) -> dict[str, Any]:
    """One turn with the SDK: 1 s of audio in 20 ms frames, a response; returns what came back."""
    client = AsyncOpenAI(websocket_base_url=f"ws://127.0.0.1:{port}/openai/v1", api_key=ALPHA_KEY)
    out_bytes = 0
    deltas = 0
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await conn.session.update(
            session={"type": "realtime", "audio": {"input": {"turn_detection": None}}}
        )
        frame = b64(tone_pcm(20))
        for _ in range(50):
            await conn.input_audio_buffer.append(audio=frame)
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        async for event in conn:
            if event.type == "response.output_audio.delta":
                out_bytes += len(base64.b64decode(event.delta))
                deltas += 1
            if event.type == "response.done":
                return {"usage": event.response.usage, "out_bytes": out_bytes, "deltas": deltas}
    raise AssertionError("no response.done")


async def test_metrics_count_what_happened(simulator, start_relay, aiohttp_server):
    relay = await start_relay(relay_config(simulator.url))
    state = relay.app[STATE]
    turn = await voice_turn(relay.port)
    await state.idle.wait()  # the session has ended and flushed its meter

    listener = await aiohttp_server(create_metrics_app(state.metrics.registry))
    async with aiohttp.ClientSession() as http:
        async with http.get(listener.make_url("/metrics")) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            found = samples(await response.text())
        # Not on the public port unless asked for.
        async with http.get(relay.make_url("/metrics")) as response:
            assert response.status == 404

    td = {"team": "alpha", "deployment": "gpt-realtime"}
    assert value(found, "relay_sessions_total", outcome="client_closed", **td) == 1
    assert value(found, "relay_sessions_active", **td) == 0
    assert value(found, "relay_audio_chunk_bytes_count", direction="in") == 50
    assert value(found, "relay_audio_chunk_bytes_sum", direction="in") == 50 * 960
    assert abs(value(found, "relay_audio_seconds_total", direction="in", **td) - 1.0) < 0.001
    out_seconds = turn["out_bytes"] / 48000
    assert (
        abs(value(found, "relay_audio_seconds_total", direction="out", **td) - out_seconds) < 0.001
    )
    assert value(found, "relay_audio_chunk_bytes_count", direction="out") == turn["deltas"]
    assert (
        value(found, "relay_events_total", direction="in", type="input_audio_buffer.append") == 50
    )
    assert value(found, "relay_time_to_first_audio_seconds_count", backend="default", **td) == 1
    assert value(found, "relay_response_duration_seconds_count", **td) == 1
    assert value(found, "relay_responses_total", status="completed", **td) == 1
    usage = turn["usage"]
    for kind, expected in [
        ("input_text", usage.input_token_details.text_tokens),
        ("input_audio", usage.input_token_details.audio_tokens),
        ("output_text", usage.output_token_details.text_tokens),
        ("output_audio", usage.output_token_details.audio_tokens),
    ]:
        assert value(found, "relay_tokens_total", kind=kind, **td) == expected, kind
    handshake = {"deployment": "gpt-realtime", "backend": "default"}
    assert value(found, "relay_upstream_handshake_seconds_count", **handshake) == 1
    assert value(found, "relay_session_setup_seconds_count", **td) == 1
    assert value(found, "relay_forward_delay_seconds_count", direction="in") >= 53
    assert value(found, "relay_frame_bytes_total", direction="out") > turn["out_bytes"]
    # The loop's lag is exported from the start (tests/unit/test_loop_lag.py: what it measures).
    assert ("relay_event_loop_lag_seconds_count", frozenset()) in found


async def test_refusals_and_connect_failures_are_counted(start_relay, aiohttp_server):
    relay = await start_relay(relay_config("http://127.0.0.1:9"))  # discard port: refused
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"api-key": ALPHA_KEY}):
            url = relay.make_url("/openai/v1/realtime?model=gpt-realtime")
            async with http.get(url, headers={**UPGRADE, **headers}) as r:
                assert r.status in (401, 502)
        async with http.get(relay.make_url("/metrics")) as response:
            assert response.status == 404
    found = samples(await _scrape(relay.app[STATE].metrics.registry, aiohttp_server))
    refusals = "relay_session_refusals_total"
    assert value(found, refusals, team="unknown", status="401", code="missing_api_key") == 1
    # Refused after authentication: the team is known.
    assert value(found, refusals, team="alpha", status="502", code="upstream_unavailable") == 1
    assert (
        value(
            found,
            "relay_upstream_connect_failures_total",
            deployment="gpt-realtime",
            backend="default",
            reason="upstream_unavailable",
        )
        == 1
    )


async def test_metrics_on_the_main_port_need_their_token(simulator, start_relay):
    config = relay_config(
        simulator.url, metrics={"on_main_port": True, "token_env": "METRICS_TOKEN"}
    )
    relay = await start_relay(config, environ={**ENVIRON, "METRICS_TOKEN": "scrape-s3cret"})
    async with aiohttp.ClientSession() as http:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Bearer {ALPHA_KEY}"},
        ):
            async with http.get(relay.make_url("/metrics"), headers=headers) as response:
                assert response.status == 401
                assert "scrape-s3cret" not in await response.text()
        headers = {"Authorization": "Bearer scrape-s3cret"}
        async with http.get(relay.make_url("/metrics"), headers=headers) as response:
            assert response.status == 200
            assert "relay_sessions_active" in await response.text()


async def test_metrics_token_guesses_meet_the_brake(simulator, start_relay):
    """Guessed like a key (31 wrong tokens all got 401): the same brake, the same count."""
    config = relay_config(
        simulator.url,
        metrics={"on_main_port": True, "token_env": "METRICS_TOKEN"},
        limits={"auth_failures_allowed": 3},
    )
    relay = await start_relay(config, environ={**ENVIRON, "METRICS_TOKEN": "scrape-s3cret"})
    async with aiohttp.ClientSession() as http:
        statuses = []
        for token in ("a", "b", "c", "d", "scrape-s3cret"):
            headers = {"Authorization": f"Bearer {token}"}
            async with http.get(relay.make_url("/metrics"), headers=headers) as response:
                statuses.append(response.status)
    assert statuses == [401, 401, 401, 429, 429]


async def _scrape(registry, aiohttp_server) -> str:
    listener = await aiohttp_server(create_metrics_app(registry))
    async with aiohttp.ClientSession() as http:
        async with http.get(listener.make_url("/metrics")) as response:
            return await response.text()


PROCESS_CONFIG = """
[server]
port = 0
[metrics]
port = {metrics_port}
[logging]
format = "json"
[simulator]
speed = 0
[deployments.gpt-realtime]
endpoint = "simulator"
credential = {{ env = "RELAY_SIMULATOR_KEY" }}
[teams.alpha]
keys = ["{key}"]
deployments = ["gpt-realtime"]
"""


async def scrape_until(port: int, done) -> dict[tuple[str, frozenset], float]:
    """Scrape a relay process's metrics listener until ``done(found)``."""
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                found = samples(await response.text())
            if done(found):
                return found
            await asyncio.sleep(0.05)  # another process's session end: no event to await here
    raise AssertionError("the scrape never showed what was awaited")


async def test_forward_delays_are_not_rounded_to_milliseconds(tmp_path):
    """`relay serve` runs on uvloop, whose loop.time() moves in 1 ms steps: timed with it,
    every added delay was exactly 0 or 1 ms and the histogram's sum a whole number of ms."""
    metrics_port = free_port()
    config = tmp_path / "relay.toml"
    config.write_text(PROCESS_CONFIG.format(metrics_port=metrics_port, key=hash_key(ALPHA_KEY)))
    async with relay_process(config, {"RELAY_SIMULATOR_KEY": "sim"}) as (_, base):
        await voice_turn(int(base.rsplit(":", 1)[1]))
        found = await scrape_until(
            metrics_port,
            lambda f: value(
                f,
                "relay_sessions_total",
                team="alpha",
                deployment="gpt-realtime",
                outcome="client_closed",
            ),
        )
    for direction in ("in", "out"):
        count = value(found, "relay_forward_delay_seconds_count", direction=direction)
        total = value(found, "relay_forward_delay_seconds_sum", direction=direction)
        assert count >= 10, direction
        milliseconds = total * 1000
        # Not a whole number of milliseconds (quantised sums are, to float error ~1e-12):
        # the clock resolves well below them.
        assert total > 0 and abs(milliseconds - round(milliseconds)) > 1e-6, (direction, total)
