"""A log reader that stops reading: a real process whose stdout pipe nobody reads for a while.

Logs were written from the event loop. With the pipe full (64 KiB: a stuck log shipper) the
relay froze at about the 44th session, live audio and /healthz with it."""

from __future__ import annotations

import asyncio
import os
import sys

import aiohttp
import orjson

from tests.helpers import read_until
from tests.processes import simulator_config

KEY = "rk-log-output-demo"
SESSIONS = 300  # about 600 lines, 250 KiB: four times what the pipe holds


async def test_a_stuck_log_reader_stops_nothing_and_loses_no_line(tmp_path):
    config = tmp_path / "relay.toml"
    config.write_text(simulator_config(KEY))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "RELAY_SIMULATOR_KEY": "sim-key"},
    )  # fmt: skip
    assert process.stdout is not None
    try:
        log = b""
        while b'"relay_listening"' not in log:
            line = await process.stdout.readline()
            assert line, "the relay exited before listening"
            log += line
        base = orjson.loads(line)["url"].replace("ws://", "http://")
        # From here nobody reads the relay's stdout until every session is done.
        url = f"{base}/openai/v1/realtime?model=gpt-realtime"
        # A bound, not a wait: a frozen relay fails the test instead of hanging it.
        async with asyncio.timeout(30), aiohttp.ClientSession() as http:
            for _ in range(SESSIONS):
                ws = await http.ws_connect(url, headers={"api-key": KEY})
                await read_until(ws, "session.created")
                await ws.close()
            async with http.get(f"{base}/healthz") as health:
                assert health.status == 200
        process.terminate()
        log += await process.stdout.read()  # the rest, once read again
        assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.stdout.read()  # Python 3.11 reports an exit once its pipes are read
            await process.wait()
    lines = [orjson.loads(line) for line in log.splitlines()]  # each line whole
    ended = [line for line in lines if line["event"] == "session_ended"]
    assert len(ended) == SESSIONS
    assert lines[-1]["event"] == "relay_stopped"
    assert not [line for line in lines if line["event"] == "log_lines_dropped"]
