"""The openai-agents Python realtime runner (`agents.realtime`), unchanged, through the relay.

It sends its whole default session on connect (voice `ash`, `gpt-4o-mini-transcribe`,
semantic VAD) plus the agent's instructions and tools, as it does against Azure (its docs:
the GA URL with an `api-key` header). The policy rewrites what it does not allow; the rest,
the agent's instructions and tool included, must be in force.
"""

from __future__ import annotations

from typing import Any

from agents import function_tool
from agents.realtime import RealtimeAgent, RealtimeRunner

from tests.compat.conftest import (
    INSTRUCTIONS,
    LOCAL,
    LOCKED_TRANSCRIPTION,
    expected_instructions,
)
from tests.helpers import ALPHA_KEY

# The agent SDK's default voice, outside config/local.toml's allow-list: the value in force
# (the deployment's default voice) is put back.
DEFAULT_VOICE = LOCAL["deployments"]["gpt-realtime"]["session"]["audio"]["output"]["voice"]
calls: list[str] = []


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    calls.append(city)
    return f"It is sunny in {city}."


async def test_realtime_runner_with_its_default_session_and_a_tool(relay):
    calls.clear()
    agent = RealtimeAgent(name="Assistant", instructions=INSTRUCTIONS, tools=[get_weather])
    runner = RealtimeRunner(agent)
    url = f"ws://127.0.0.1:{relay.port}/openai/v1/realtime?model=gpt-realtime"
    session = await runner.run(
        model_config={
            "url": url,
            "headers": {"api-key": ALPHA_KEY},
        }
    )
    updates: list[dict[str, Any]] = []
    errors: list[Any] = []
    audio_bytes = 0
    history: list[Any] = []
    async with session:
        await session.send_message("What is the weather in Paris? Use get_weather.")
        async for event in session:
            if event.type == "error":
                errors.append(event.error)
                break  # fail at once rather than wait for a reply
            elif event.type == "raw_model_event" and event.data.type == "raw_server_event":
                raw = event.data.data
                if raw.get("type") == "error":
                    errors.append(raw)
                    break
                elif raw.get("type") == "session.updated":
                    updates.append(raw["session"])
                elif raw.get("type") == "response.done" and calls:
                    # The reply after the tool's output.
                    break
            elif event.type == "audio":
                audio_bytes += len(event.audio.data)
            elif event.type == "history_updated":
                history = event.history
    assert not errors, errors
    assert len(calls) == 1  # the simulated model fills in the arguments itself
    in_force = updates[-1]
    assert in_force["instructions"] == expected_instructions()
    assert [tool["name"] for tool in in_force["tools"]] == ["get_weather"]
    assert in_force["audio"]["input"]["turn_detection"]["type"] == "semantic_vad"
    assert in_force["audio"]["input"]["transcription"]["model"] == LOCKED_TRANSCRIPTION
    assert in_force["audio"]["output"]["voice"] == DEFAULT_VOICE
    assert audio_bytes > 0
    said = [
        part.transcript
        for item in history
        if item.type == "message" and item.role == "assistant"
        for part in item.content
        if getattr(part, "transcript", None)
    ]
    assert said and "sunny" in said[-1]
