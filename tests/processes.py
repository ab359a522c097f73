"""Real relay and Redis processes for tests that need a process boundary."""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def simulator_config(key: str, **server: float) -> str:
    """A config for `relay serve` as a child process: the in-process simulator (its key from
    RELAY_SIMULATOR_KEY), ports the system picks, JSON logs, team demo with ``key``; and the
    given [server] settings."""
    from relay.edge.auth import hash_key

    settings = "".join(f"{name} = {value}\n" for name, value in server.items())
    return f"""
[server]
port = 0
close_timeout_seconds = 2
{settings}[metrics]
port = 0
[logging]
format = "json"
[simulator]
speed = 1.0
[deployments.gpt-realtime]
endpoint = "simulator"
credential = {{ env = "RELAY_SIMULATOR_KEY" }}
[teams.demo]
keys = ["{hash_key(key)}"]
deployments = ["gpt-realtime"]
"""


@asynccontextmanager
async def relay_process(
    config: Path,
    env: dict[str, str],
    *args: str,
    stdout: bytearray | None = None,
    stderr: bytearray | None = None,
    descriptors: int | None = None,
    lines: asyncio.Queue[dict[str, Any]] | None = None,
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`relay serve` as a child process; yields it and its base URL (http://...).

    With ``descriptors``, the process starts with that open-files limit, soft and hard. Given
    ``lines``, each log line the process writes after it listens is put there, parsed.

    Given ``stdout``/``stderr``, every byte the process writes there is collected into them
    (complete once the process has exited and the context is left)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--config", str(config), *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL if stderr is None else asyncio.subprocess.PIPE,
        env={**os.environ, **env},
        preexec_fn=None if descriptors is None else partial(_limit_descriptors, descriptors),
    )  # fmt: skip
    readers = []
    try:
        assert process.stdout is not None
        if process.stderr is not None:
            readers.append(asyncio.ensure_future(_collect(process.stderr, stderr)))
        while True:
            line = await process.stdout.readline()
            assert line, "the relay exited before listening"
            if stdout is not None:
                stdout += line
            event = orjson.loads(line)
            if event.get("event") == "relay_listening":
                break
        # Keep reading its log so the pipe never fills and blocks the relay.
        readers.append(asyncio.ensure_future(_collect(process.stdout, stdout, lines)))
        yield process, event["url"].replace("ws://", "http://")
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        # The pipes end with the process (and any worker it left behind): read them out.
        if readers:
            await asyncio.wait(readers, timeout=10)
        for reader in readers:
            reader.cancel()


def _limit_descriptors(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


async def _collect(
    stream: asyncio.StreamReader,
    into: bytearray | None,
    lines: asyncio.Queue[dict[str, Any]] | None = None,
) -> None:
    while line := await stream.readline():
        if into is not None:
            into += line
        if lines is not None and line.startswith(b"{"):
            lines.put_nowait(orjson.loads(line))


needs_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server not installed (Debian package `redis-server`; .ci/run installs it)",
)


@asynccontextmanager
async def redis_server(tmp_path: Path) -> AsyncIterator[str]:
    """A private redis-server on a free loopback port; yields its URL."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stdout is not None
    while b"Ready to accept connections" not in await process.stdout.readline():
        assert process.returncode is None, "redis-server exited"
    drain = asyncio.ensure_future(_collect(process.stdout, None))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
        drain.cancel()
