"""Node clients, unchanged, through the relay: the `openai` npm package
(`OpenAIRealtimeWS.azure`) and `@openai/agents-realtime` over its WebSocket transport.

Their packages come from tests/compat/node/package-lock.json (`npm ci`, run by `make test`
and .ci/run). Each script prints one JSON line with what it saw; this file judges it against
config/local.toml's policy. Without node on the machine the tests skip and say so, except in
CI (CI=true), where they fail.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.compat.conftest import (
    INSTRUCTIONS,
    LOCKED_TRANSCRIPTION,
    POLICY,
    TOKEN_CAP,
    VOICE,
    expected_instructions,
    require,
    run_reporting,
)

NODE_DIR = Path(__file__).parent / "node"
NODE = shutil.which("node")
ALLOWED_VOICES = POLICY["allowed_values"]["audio.output.voice"]


def _unavailable() -> str | None:
    if NODE is None:
        return "node is not installed: the Node compat clients cannot run here"
    if not (NODE_DIR / "node_modules" / ".package-lock.json").exists():
        return "tests/compat/node has no node_modules: run `make node-deps` (npm ci)"
    return None


@pytest.fixture(autouse=True)
def _node_clients_installed() -> None:
    require(_unavailable(), "the Node compat clients")


async def run_script(script: str, **env: str) -> dict[str, Any]:
    assert NODE is not None
    return await run_reporting(NODE, script, cwd=NODE_DIR, seconds=45, **env)


async def test_openai_npm_realtime_ws_azure(tls_relay, test_ca, tmp_path):
    ca = tmp_path / "ca.pem"
    test_ca.cert_pem.write_to_path(str(ca))
    result = await run_script(
        "openai_ws.mjs",
        RELAY_URL=f"https://127.0.0.1:{tls_relay.port}",
        RELAY_DEPLOYMENT="gpt-realtime",
        NODE_EXTRA_CA_CERTS=str(ca),
    )
    assert result["errors"] == [] and "error" not in result["seen"]
    session = result["session"]
    assert session["instructions"] == expected_instructions()
    assert session["audio"]["output"]["voice"] == VOICE
    assert session["audio"]["input"]["turn_detection"] is None
    # Rewritten by the policy: the locked model, the capped token limit.
    assert session["audio"]["input"]["transcription"]["model"] == LOCKED_TRANSCRIPTION
    assert session["max_output_tokens"] == TOKEN_CAP
    assert result["status"] == "completed"
    assert result["audioChars"] > 0 and result["transcript"]
    assert "response.output_audio.delta" in result["seen"]


async def test_agents_realtime_session_over_websocket(relay):
    result = await run_script(
        "agents_realtime.mjs",
        RELAY_WS_URL=f"ws://127.0.0.1:{relay.port}/openai/v1/realtime?model=gpt-realtime",
        RELAY_DEPLOYMENT="gpt-realtime",
    )
    assert result["errors"] == [] and "error" not in result["seen"]
    assert len(result["calls"]) == 1  # the simulated model fills in the arguments itself
    session = result["session"]
    assert session["instructions"] == expected_instructions(INSTRUCTIONS)
    assert [tool["name"] for tool in session["tools"]] == ["get_weather"]
    assert session["audio"]["input"]["turn_detection"]["type"] == "semantic_vad"
    assert session["audio"]["input"]["transcription"]["model"] == LOCKED_TRANSCRIPTION
    assert session["audio"]["output"]["voice"] in ALLOWED_VOICES
    assert result["audioBytes"] > 0
    assert result["said"] and "sunny" in result["said"][-1]
