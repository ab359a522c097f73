"""Python agent frameworks, unchanged, through the relay: LiveKit Agents (its OpenAI plugin's
`RealtimeModel.with_azure`, GA and with the `api_version` its Azure docs show) and Pipecat
(`AzureRealtimeLLMService`).

They run from their own venv (.venv-clients, pinned by tests/compat/python_clients/
requirements.txt; `make client-deps`, run by `make test` and .ci/run), so their dependencies
never meet the relay's. Each script prints one JSON line with what it saw; this file judges it
against config/local.toml's policy. Without that venv the tests skip and say so, except in CI
(CI=true), where they fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.compat.conftest import (
    LOCKED_TRANSCRIPTION,
    TOKEN_CAP,
    VOICE,
    expected_instructions,
    require,
    run_reporting,
)

CLIENTS_DIR = Path(__file__).parent / "python_clients"
ROOT = Path(__file__).parents[2]
CLIENTS_VENV = ROOT / ".venv-clients"
CLIENTS_PYTHON = CLIENTS_VENV / "bin" / "python"


@pytest.fixture(autouse=True)
def _python_clients_installed() -> None:
    installed = (CLIENTS_VENV / ".installed").exists()
    missing = ".venv-clients is not installed: run `make client-deps`"
    require(None if installed else missing, "the Python agent frameworks")


async def run_client(script: str, **env: str) -> dict[str, Any]:
    return await run_reporting(str(CLIENTS_PYTHON), script, cwd=CLIENTS_DIR, seconds=50, **env)


def assert_tool_turn_and_spoken_turn(result: dict[str, Any]) -> None:
    assert result["errors"] == [] and "error" not in result["seen"]
    # The simulated model calls the agent's tool, then speaks its answer.
    assert result["calls"], result
    assert result["said"] and "sunny" in result["said"][-1]
    # The spoken turn: the server's VAD heard it, transcribed it and answered.
    assert result["heard"]
    assert "input_audio_buffer.speech_stopped" in result["seen"]
    assert "response.output_audio.delta" in result["seen"]


@pytest.mark.parametrize("api_version", [None, "2024-10-01-preview"], ids=["ga", "api_version"])
async def test_livekit_agent_session_with_azure(relay, api_version):
    """`RealtimeModel.with_azure` as LiveKit's docs show it: without `api_version` it speaks GA
    on /openai/v1/realtime; with one (deprecated, still in its docs' examples) it dials the
    preview path, which the relay serves from the same GA deployment."""
    result = await run_client(
        "livekit_agent.py",
        RELAY_URL=f"http://127.0.0.1:{relay.port}",
        RELAY_DEPLOYMENT="gpt-realtime",
        **({"RELAY_API_VERSION": api_version} if api_version else {}),
    )
    assert_tool_turn_and_spoken_turn(result)
    session = result["session"]
    assert session["instructions"] == expected_instructions()
    assert [tool["name"] for tool in session["tools"]] == ["get_weather"]
    if api_version is None:
        assert session["audio"]["output"]["voice"] == VOICE
        # Rewritten by the policy: the locked model, the capped token limit.
        assert session["audio"]["input"]["transcription"]["model"] == LOCKED_TRANSCRIPTION
        assert session["max_output_tokens"] == TOKEN_CAP
    else:
        # The preview dialect's names for the same session.
        assert session["voice"] == VOICE
        assert session["input_audio_transcription"]["model"] == LOCKED_TRANSCRIPTION
        assert session["max_response_output_tokens"] == TOKEN_CAP


async def test_livekit_recycles_its_connection_with_the_conversation_replayed(relay):
    """LiveKit's own answer to the service's session limit (`max_session_duration`): a new
    connection, into which it replays the conversation so far as items: the user's message,
    the tool's call and output, the assistant's answer. Each goes through the relay's policy
    and the simulator's checks, and the next turn is answered on the new connection."""
    result = await run_client(
        "livekit_agent.py",
        RELAY_URL=f"http://127.0.0.1:{relay.port}",
        RELAY_DEPLOYMENT="gpt-realtime",
        RELAY_RECYCLE_SECONDS="2",
    )
    assert_tool_turn_and_spoken_turn(result)
    assert result["replayed"] == ["user", "function_call", "function_call_output", "assistant"]


async def test_pipecat_azure_realtime_service(relay):
    """Pipecat's `AzureRealtimeLLMService` in a pipeline with its context aggregators, as its
    docs point it at Azure: a text turn that calls the registered tool, then a spoken turn
    of 20 ms frames paced as an input transport sends them. Pipecat treats any `error`
    event as fatal, so one would end the run."""
    result = await run_client(
        "pipecat_azure.py",
        RELAY_WS_URL=f"ws://127.0.0.1:{relay.port}/openai/v1/realtime",
        RELAY_DEPLOYMENT="gpt-realtime",
    )
    assert result["errors"] == [] and result["status"] == "completed", result
    assert [call["name"] for call in result["calls"]] == ["get_weather"]
    answer, spoken = result["transcript"].splitlines()
    assert "sunny" in answer and spoken.startswith("You said:")
    assert result["audioBytes"] > 0
    assert {"UserStartedSpeakingFrame", "UserStoppedSpeakingFrame"} <= set(result["frames"])
    session = result["session"]
    assert session["instructions"] == expected_instructions()
    assert [tool["name"] for tool in session["tools"]] == ["get_weather"]
    assert session["audio"]["output"]["voice"] == VOICE
    # Rewritten by the policy: the locked model, and Pipecat's "inf" capped.
    assert session["audio"]["input"]["transcription"]["model"] == LOCKED_TRANSCRIPTION
    assert session["max_output_tokens"] == TOKEN_CAP
