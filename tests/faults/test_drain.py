"""Graceful drain, with a real process and a real SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import orjson
from aiohttp import WSMsgType

from tests.helpers import UPGRADE, read_until
from tests.processes import simulator_config

DEMO_KEY = "rk-drain-demo"


async def start_relay_process(
    tmp_path: Path, grace: float
) -> tuple[asyncio.subprocess.Process, str]:
    config = tmp_path / "relay.toml"
    config.write_text(simulator_config(DEMO_KEY, drain_grace_seconds=grace))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "serve",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "RELAY_SIMULATOR_KEY": "sim-key"},
    )
    assert process.stdout is not None
    while True:
        line = await process.stdout.readline()
        assert line, "the relay exited before listening"
        event = orjson.loads(line)
        if event.get("event") == "relay_listening":
            return process, event["url"].replace("ws://", "http://")


async def test_sigterm_lets_the_response_finish_then_closes_with_1001(tmp_path):
    process, base = await start_relay_process(tmp_path, grace=20)
    headers = {"api-key": DEMO_KEY}
    url = f"{base}/openai/v1/realtime?model=gpt-realtime"
    try:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(url, headers=headers)
            await read_until(ws, "session.created")
            await ws.send_str('{"type":"response.create"}')
            await read_until(ws, "response.created")  # a response is in progress, in real time

            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            # Readiness turns false and new sessions are refused while the response goes on.
            for _ in range(1000):  # round trips until the signal is handled
                async with http.get(f"{base}/readyz") as response:
                    readiness = response.status, await response.json()
                if readiness[0] == 503:
                    break
            assert readiness == (503, {"status": "not ready", "reason": "draining"})
            async with http.get(url, headers={**headers, **UPGRADE}) as response:
                assert response.status == 503
                assert (await response.json())["error"]["code"] == "relay_draining"

            events = await read_until(ws, "response.done")
            assert events[-1]["response"]["status"] == "completed"
            [error] = await read_until(ws, "error")
            assert error["error"]["code"] == "relay_shutting_down"
            msg = await ws.receive()
            assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
        assert time.monotonic() - signalled < 20 + 5
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_grace_period_bounds_the_wait(tmp_path):
    process, base = await start_relay_process(tmp_path, grace=0.5)
    try:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(
                f"{base}/openai/v1/realtime?model=gpt-realtime", headers={"api-key": DEMO_KEY}
            )
            await read_until(ws, "session.created")
            await ws.send_str('{"type":"response.create"}')
            await read_until(ws, "response.created")
            signalled = time.monotonic()
            process.send_signal(signal.SIGINT)
            events = await read_until(ws, "error")  # cut off mid-response, after the grace
            assert events[-1]["error"]["code"] == "relay_shutting_down"
            assert "response.done" not in [e["type"] for e in events]
            msg = await ws.receive()
            assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
        assert time.monotonic() - signalled < 0.5 + 5
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_session_set_up_while_the_drain_begins_is_refused_not_dropped(
    start_fake, start_relay
):
    """The drain ends the sessions it knows; one whose upstream was still being set up was
    upgraded into the shutdown and dropped with 1006, logged as the client's loss. It is
    now refused, 503 `relay_draining`, and its upstream closed."""
    from relay.app import drain
    from relay.state import STATE
    from tests.helpers import ALPHA_KEY, FakeUpstream, echo, relay_config

    draining = asyncio.Event()
    dialled = asyncio.Event()

    async def slow_start(ws, fake: FakeUpstream) -> None:
        dialled.set()
        await draining.wait()  # the upstream starts the session only once the drain began
        await echo(ws, fake)

    fake = FakeUpstream(script=slow_start)
    upstream = await start_fake(fake.app())
    relay = await start_relay(relay_config(f"http://127.0.0.1:{upstream.port}"))
    url = f"http://127.0.0.1:{relay.port}/openai/v1/realtime?model=gpt-realtime"
    async with aiohttp.ClientSession() as http:
        connecting = asyncio.ensure_future(http.get(url, headers={"api-key": ALPHA_KEY, **UPGRADE}))
        await dialled.wait()
        await drain(relay.app[STATE], grace_seconds=0)  # nothing to end yet
        draining.set()
        async with await connecting as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "relay_draining"
    await fake.closed.wait()
    assert fake.close_code == 1001
