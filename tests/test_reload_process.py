"""Reloading a real `relay serve` process: by SIGHUP, by a ConfigMap-style file swap, and
under `--workers`, the way an operator does it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from relay.edge.auth import hash_key
from tests.helpers import read_until
from tests.processes import free_port

KEY_A, KEY_B, KEY_C = "rk-reload-a-000", "rk-reload-b-000", "rk-reload-c-000"
CONFIG = """
[server]
port = 0
drain_grace_seconds = 1
{server}
[metrics]
port = 0
[logging]
format = "json"
[simulator]
speed = {speed}
[deployments.gpt-realtime]
endpoint = "simulator"
[teams.demo]
keys = [{keys}]
deployments = ["gpt-realtime"]
"""
# About 5 s of speech at real time: long enough to span two reloads.
LONG_TEXT = "Tell me a story about a relay that reloads its config while it talks, twice."


def config_text(*keys: str, speed: float = 1.0, server: str = "") -> str:
    listed = ", ".join(f'"{hash_key(k)}"' for k in keys)
    return CONFIG.format(keys=listed, speed=speed, server=server)


class Relay:
    """`relay serve` as a child process, its JSON log lines read as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []
        self.new_line = asyncio.Condition()
        self.url = ""

    async def read_log(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            async with self.new_line:
                self.lines.append(orjson.loads(line))
                self.new_line.notify_all()

    async def wait_for(self, event: str, count: int = 1) -> list[dict[str, Any]]:
        """The first ``count`` log lines of ``event``, once there are that many."""
        async with self.new_line:
            await self.new_line.wait_for(
                lambda: len(self.logged(event)) >= count or self.process.returncode is not None
            )
        found = self.logged(event)
        assert len(found) >= count, f"the relay exited; its log: {self.lines}"
        return found[:count]

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == event]


@asynccontextmanager
async def relay_serving(config: Path, *args: str) -> AsyncIterator[Relay]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--config", str(config), *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "RELAY_SIMULATOR_KEY"},
    )  # fmt: skip
    relay = Relay(process)
    reader = asyncio.ensure_future(relay.read_log())
    try:
        listening = await asyncio.wait_for(relay.wait_for("relay_listening"), timeout=30)
        relay.url = listening[0]["url"].replace("ws://", "http://")
        yield relay
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
        reader.cancel()


async def connect(http: aiohttp.ClientSession, relay: Relay, key: str) -> Any:
    ws = await http.ws_connect(
        f"{relay.url}/openai/v1/realtime?model=gpt-realtime", headers={"api-key": key}
    )
    await read_until(ws, "session.created")
    return ws


async def test_a_streaming_session_spans_two_reloads_without_a_gap(tmp_path):
    config = tmp_path / "relay.toml"
    config.write_text(config_text(KEY_A, KEY_B))
    async with relay_serving(config) as relay, aiohttp.ClientSession() as http:
        talking = await connect(http, relay, KEY_A)
        doomed = await connect(http, relay, KEY_B)
        await talking.send_str(
            orjson.dumps(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": LONG_TEXT}],
                    },
                }
            ).decode()
        )
        await talking.send_str('{"type": "response.create"}')
        await read_until(talking, "response.output_audio.delta")
        arrivals = [time.perf_counter()]
        chunks = 1
        reloaded = 0
        while True:
            event = orjson.loads((await talking.receive()).data)
            if event["type"] == "response.output_audio.delta":
                arrivals.append(time.perf_counter())
                chunks += 1
                if chunks == 5:  # first reload: key C added, B kept
                    config.write_text(config_text(KEY_A, KEY_B, KEY_C))
                    relay.process.send_signal(signal.SIGHUP)
                elif chunks == 15:  # second reload: key B removed
                    config.write_text(config_text(KEY_A, KEY_C))
                    relay.process.send_signal(signal.SIGHUP)
                if reloaded < len(relay.logged("config_reloaded")):
                    reloaded = len(relay.logged("config_reloaded"))
                    chunks_at_reload = chunks
            elif event["type"] == "response.done":
                break
        assert event["response"]["status"] == "completed"
        reloads = await relay.wait_for("config_reloaded", 2)
        assert [r["outcome"] for r in reloads] == ["applied", "applied"]
        assert chunks > chunks_at_reload + 5, "the response went on well after both reloads"
        # Deltas come every 100 ms of audio; a reload must not hold any of them up.
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
        assert max(gaps) < 1.0, f"largest gap between audio deltas: {max(gaps):.3f} s"

        revoked = await read_until(doomed, "error")
        assert revoked[-1]["error"]["code"] == "key_revoked"
        closed = await doomed.receive()
        assert (closed.type, closed.data) == (aiohttp.WSMsgType.CLOSE, 1008)
        fresh = await connect(http, relay, KEY_C)
        for ws in (talking, fresh):
            await ws.close()


async def test_a_configmap_update_is_applied_when_watched(tmp_path):
    """A ConfigMap volume: relay.toml -> ..data/relay.toml, ..data -> a versioned folder."""
    for version, keys in (("..v1", (KEY_A,)), ("..v2", (KEY_A, KEY_C))):
        (tmp_path / version).mkdir()
        text = config_text(*keys, speed=0, server="watch_config = true")
        (tmp_path / version / "relay.toml").write_text(text)
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "relay.toml").symlink_to("..data/relay.toml")
    async with relay_serving(tmp_path / "relay.toml") as relay, aiohttp.ClientSession() as http:
        (tmp_path / "..data_tmp").symlink_to("..v2")
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        reloaded = await asyncio.wait_for(relay.wait_for("config_reloaded"), timeout=30)
        assert reloaded[0]["changed"] == ["teams"]
        ws = await connect(http, relay, KEY_C)
        await ws.close()


async def test_the_supervisor_passes_a_reload_to_every_worker(tmp_path):
    config = tmp_path / "relay.toml"
    pid_file = tmp_path / "relay.pid"
    server = f'pid_file = "{pid_file}"'
    config.write_text(config_text(KEY_A, speed=0, server=server))
    args = ("--workers", "2", "--metrics-port", str(free_port()))
    async with relay_serving(config, *args) as relay:
        await relay.wait_for("relay_listening", 3)  # each worker's, then the supervisor's
        assert int(pid_file.read_text()) == relay.process.pid
        config.write_text(config_text(KEY_A, KEY_C, speed=0, server=server))
        reload = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "reload", "--config", str(config),
            stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert await reload.wait() == 0
        reloads = await asyncio.wait_for(relay.wait_for("config_reloaded", 2), timeout=30)
        assert sorted(r["worker"] for r in reloads) == [0, 1]
        assert all(r["outcome"] == "applied" for r in reloads)
        for _ in range(4):  # the kernel spreads new connections across the workers
            own = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
            async with own:
                ws = await connect(own, relay, KEY_C)
                await ws.close()
    assert not pid_file.exists()
