"""The compatibility suite: real clients, unchanged, through the relay to the simulated Azure.

Every client runs against config/local.toml's own deployments and policy (a locked
transcription model, a token cap, a voice allow-list, an instructions prefix), pointed at the
test's simulator, exactly as its docs tell users to point it at Azure. Each must get its own
session in force (minus what the policy rewrote), a reply with audio and a transcript, and no
`error` event.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import tomllib
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme

from relay.edge.auth import hash_key
from relay.ops.config import RelayConfig, parse_config
from relay.session.policy import with_prefix
from tests.helpers import ALPHA_KEY

ROOT = Path(__file__).parents[2]
LOCAL = tomllib.loads((ROOT / "config" / "local.toml").read_text())
POLICY = LOCAL["deployments"]["gpt-realtime"]["policy"]
PREFIX = LOCAL["teams"]["demo"]["policy"]["instructions_prefix"]
# What the policy puts back when a client asks for something else.
LOCKED_TRANSCRIPTION = LOCAL["deployments"]["gpt-realtime"]["session"]["audio"]["input"][
    "transcription"
]["model"]
TOKEN_CAP = POLICY["max_values"]["max_output_tokens"]

# What every client asks for: its own instructions and an allowed voice (kept), and the
# agent SDKs' default transcription model and the API's default token limit (rewritten).
INSTRUCTIONS = "Answer in one short sentence."
VOICE = "marin"
CLIENT_TRANSCRIPTION = "gpt-4o-mini-transcribe"
assert VOICE in POLICY["allowed_values"]["audio.output.voice"]


def expected_instructions(instructions: str = INSTRUCTIONS) -> str:
    return with_prefix(PREFIX, instructions)


def compat_config(simulator_url: str) -> RelayConfig:
    """config/local.toml with its upstream pointed at ``simulator_url`` and a test key."""
    data: dict[str, Any] = tomllib.loads((ROOT / "config" / "local.toml").read_text())
    data.pop("simulator")
    data["server"] = {"close_timeout_seconds": 2.0}
    for deployment in data["deployments"].values():
        deployment["endpoint"] = simulator_url
        deployment["credential"] = {"env": "TEST_AZURE_KEY"}
    data["teams"]["demo"]["keys"] = [hash_key(ALPHA_KEY)]
    return parse_config(data, source="compat")


@pytest.fixture
async def relay(simulator, start_relay):
    return await start_relay(compat_config(simulator.url))


@pytest.fixture(scope="session")
def test_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_relay(simulator, start_relay, test_ca):
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    test_ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    return await start_relay(compat_config(simulator.url), ssl=server_ctx)


def require(reason: str | None, what: str) -> None:
    """Skip, naming what is missing (``reason``), unless in CI (CI=true), where ``what``
    must run: fail."""
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run {what})")
    pytest.skip(reason)


async def run_reporting(
    program: str, script: str, *, cwd: Path, seconds: float, **env: str
) -> dict[str, Any]:
    """Run a client script that prints what it saw as one JSON line last; that line."""
    process = await asyncio.create_subprocess_exec(
        program,
        script,
        cwd=cwd,
        env={"PATH": os.environ.get("PATH", ""), "RELAY_KEY": ALPHA_KEY, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=seconds)
    assert process.returncode == 0, f"{script} failed:\n{err.decode()}"
    lines = out.decode().strip().splitlines()
    assert lines, f"{script} printed nothing:\n{err.decode()}"
    result: dict[str, Any] = orjson.loads(lines[-1])
    return result
