"""A relay out of file descriptors: a real process started with a low open-files limit.

Out of descriptors, libuv accepts each new connection it cannot keep and closes it: clients
saw the server disconnect, /healthz and /metrics too, and nothing was logged. The relay now
keeps a reserve and refuses new sessions with a clear 503 while it is short."""

from __future__ import annotations

import aiohttp
import orjson
from aiohttp import WSMsgType

from relay.ops.descriptors import RESERVED
from tests.helpers import UPGRADE, read_until
from tests.processes import relay_process, simulator_config

KEY = "rk-descriptors-demo"
LIMIT = RESERVED + 96  # soft and hard: the relay cannot raise it


def _lines(log: bytearray) -> list[dict]:
    return [orjson.loads(line) for line in bytes(log).splitlines() if line.startswith(b"{")]


async def test_sessions_past_the_descriptors_are_refused_with_503_and_taken_again_later(tmp_path):
    config = tmp_path / "relay.toml"
    config.write_text(simulator_config(KEY))
    log = bytearray()
    env = {"RELAY_SIMULATOR_KEY": "sim-key"}
    async with (
        relay_process(config, env, stdout=log, descriptors=LIMIT) as (_, base),
        aiohttp.ClientSession() as http,
    ):
        started = {line["event"]: line for line in _lines(log)}
        assert started["descriptor_limit"]["soft"] == LIMIT
        assert started["descriptor_limit_low"]["sessions"] == (LIMIT - RESERVED) // 2
        metrics_url = started["metrics_listening"]["url"]
        url = f"{base}/openai/v1/realtime?model=gpt-realtime"
        sessions = []
        try:
            # Open sessions until one is refused: about 96 / 3 (the client's connection, the
            # upstream's and, with the in-process simulator, the simulator's end of it).
            for _ in range(LIMIT):
                try:
                    ws = await http.ws_connect(url, headers={"api-key": KEY})
                except aiohttp.WSServerHandshakeError as error:
                    assert error.status == 503
                    break
                await read_until(ws, "session.created")
                sessions.append(ws)
            assert 10 <= len(sessions) < LIMIT // 3
            async with http.get(url, headers={"api-key": KEY, **UPGRADE}) as refused:
                assert refused.status == 503
                assert refused.headers["Retry-After"] == "1"
                body = await refused.json()
            assert body["error"]["code"] == "relay_out_of_file_descriptors"

            # A browser (the realtime subprotocol) reads it in band.
            ws = await http.ws_connect(url, headers={"api-key": KEY}, protocols=("realtime",))
            event = orjson.loads((await ws.receive()).data)
            assert event["error"]["code"] == "relay_out_of_file_descriptors"
            closed = await ws.receive()
            assert (closed.type, ws.close_code) == (WSMsgType.CLOSE, 4503)

            # The reserve keeps the relay answering its probes and its scrapes meanwhile.
            async with http.get(f"{base}/healthz") as health:
                assert health.status == 200
            async with http.get(f"{base}/readyz") as ready:
                assert (ready.status, await ready.json()) == (
                    503,
                    {"status": "not ready", "reason": "out of file descriptors"},
                )
            async with http.get(metrics_url) as scrape:
                text = await scrape.text()
            assert "relay_ready 0.0" in text
            assert 'code="relay_out_of_file_descriptors"' in text
            assert f"process_max_fds {float(LIMIT)}" in text
        finally:
            for ws in sessions:
                await ws.close()
        # Sessions closed, descriptors freed: the relay takes sessions again.
        for _ in range(1000):  # round trips until the closes have been handled
            async with http.get(f"{base}/readyz") as ready:
                if ready.status == 200:
                    break
        assert ready.status == 200
        ws = await http.ws_connect(url, headers={"api-key": KEY})
        await read_until(ws, "session.created")
        await ws.close()
    refusals = [line for line in _lines(log) if line["event"] == "session_refused"]
    assert {line["code"] for line in refusals} == {"relay_out_of_file_descriptors"}
    assert all(line["level"] == "warning" for line in refusals)
