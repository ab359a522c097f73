"""The official `openai` Python SDK, unchanged, through the relay (tests/compat/conftest.py)."""

from __future__ import annotations

import ssl
from typing import Any

from openai import AsyncAzureOpenAI, AsyncOpenAI

from tests.compat.conftest import (
    CLIENT_TRANSCRIPTION,
    INSTRUCTIONS,
    LOCKED_TRANSCRIPTION,
    TOKEN_CAP,
    VOICE,
    expected_instructions,
)
from tests.helpers import ALPHA_KEY, b64, relay_config, tone_pcm
from tests.simulator import sdk_types

GA_SESSION = {
    "type": "realtime",
    "instructions": INSTRUCTIONS,
    "output_modalities": ["audio"],
    "audio": {
        "input": {"transcription": {"model": CLIENT_TRANSCRIPTION}, "turn_detection": None},
        "output": {"voice": VOICE},
    },
    "max_output_tokens": "inf",
}
# The same session as a preview-era client writes it.
PREVIEW_SESSION = {
    "instructions": INSTRUCTIONS,
    "modalities": ["text", "audio"],
    "voice": VOICE,
    "input_audio_transcription": {"model": CLIENT_TRANSCRIPTION},
    "turn_detection": None,
    "max_response_output_tokens": "inf",
}


class Recorder:
    """Reads a connection's events, failing on any `error` event."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.events: list[Any] = []

    async def until(self, wanted: str) -> Any:
        async for event in self.conn:
            self.events.append(event)
            assert event.type != "error", f"error event: {event}"
            if event.type == wanted:
                return event
        raise AssertionError(f"the connection ended before {wanted}")

    def types(self) -> list[str]:
        return [event.type for event in self.events]


async def talk_ga(conn: Any) -> Recorder:
    """The client's session, then a spoken turn answered with audio and a transcript."""
    events = Recorder(conn)
    await events.until("session.created")
    await conn.session.update(session=GA_SESSION)
    session = (await events.until("session.updated")).session
    assert session.instructions == expected_instructions()
    assert session.audio.output.voice == VOICE
    assert session.audio.input.turn_detection is None
    # Rewritten by the policy: the locked model, the capped token limit.
    assert session.audio.input.transcription.model == LOCKED_TRANSCRIPTION
    assert session.max_output_tokens == TOKEN_CAP
    await conn.input_audio_buffer.append(audio=b64(tone_pcm(600)))
    await conn.input_audio_buffer.commit()
    await conn.response.create()
    done = await events.until("response.done")
    assert done.response.status == "completed"
    assert done.response.usage.output_token_details.audio_tokens > 0
    assert "response.output_audio.delta" in events.types()
    transcript = next(e for e in events.events if e.type == "response.output_audio_transcript.done")
    assert transcript.transcript
    return events


async def test_azure_client_over_plain_ws(relay):
    client = AsyncAzureOpenAI(
        azure_endpoint=f"http://127.0.0.1:{relay.port}",
        websocket_base_url=f"ws://127.0.0.1:{relay.port}/openai",
        api_key=ALPHA_KEY,
        api_version="2025-08-28",
    )
    # /openai/realtime?api-version=2025-08-28: GA events, on the GA deployment.
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await talk_ga(conn)


async def test_azure_client_with_azure_endpoint_over_tls(tls_relay, test_ca):
    client_ctx = ssl.create_default_context()
    test_ca.configure_trust(client_ctx)
    client = AsyncAzureOpenAI(
        azure_endpoint=f"https://127.0.0.1:{tls_relay.port}",
        api_key=ALPHA_KEY,
        api_version="2025-08-28",
    )
    async with client.realtime.connect(
        model="gpt-realtime", websocket_connection_options={"ssl": client_ctx}
    ) as conn:
        await talk_ga(conn)


async def test_openai_client_on_the_ga_path_with_bearer_key(relay):
    client = AsyncOpenAI(
        websocket_base_url=f"ws://127.0.0.1:{relay.port}/openai/v1", api_key=ALPHA_KEY
    )
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await talk_ga(conn)


async def test_beta_client_on_a_ga_deployment_through_the_preview_path(relay):
    """A preview-era client: /openai/realtime?api-version=2024-10-01-preview, beta events,
    translated to and from the GA deployment."""
    client = AsyncAzureOpenAI(
        azure_endpoint=f"http://127.0.0.1:{relay.port}",
        websocket_base_url=f"ws://127.0.0.1:{relay.port}/openai",
        api_key=ALPHA_KEY,
        api_version="2024-10-01-preview",
    )
    async with client.beta.realtime.connect(model="gpt-realtime") as conn:
        events = Recorder(conn)
        created = (await events.until("session.created")).session
        assert created.input_audio_format == "pcm16"
        await conn.session.update(session=PREVIEW_SESSION)
        session = (await events.until("session.updated")).session
        assert session.instructions == expected_instructions()
        assert session.voice == VOICE and session.turn_detection is None
        assert session.modalities == ["text", "audio"]
        assert session.input_audio_transcription.model == LOCKED_TRANSCRIPTION
        assert session.max_response_output_tokens == TOKEN_CAP
        await conn.input_audio_buffer.append(audio=b64(tone_pcm(600)))
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        done = await events.until("response.done")
    assert done.response.status == "completed" and done.response.voice == VOICE
    types = events.types()
    assert "response.audio.delta" in types and "conversation.item.created" in types
    transcript = next(e for e in events.events if e.type == "response.audio_transcript.done")
    assert transcript.transcript
    assert not [t for t in types if "output_audio" in t or t == "conversation.item.added"]


async def test_every_relayed_event_validates_against_the_sdk_types(relay):
    client = AsyncOpenAI(websocket_base_url=f"ws://127.0.0.1:{relay.port}/v1", api_key=ALPHA_KEY)
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await conn.session.update(session=GA_SESSION)
        await conn.input_audio_buffer.append(audio=b64(tone_pcm(300)))
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        seen = []
        while True:
            raw = await conn.recv_bytes()
            event = sdk_types.check("ga", raw)
            assert event["type"] != "error", event
            seen.append(event["type"])
            if event["type"] == "response.done":
                break
    assert seen[0] == "session.created"
    assert "response.output_audio.delta" in seen


async def test_every_translated_event_validates_against_the_beta_sdk_types(relay):
    client = AsyncAzureOpenAI(
        azure_endpoint=f"http://127.0.0.1:{relay.port}",
        websocket_base_url=f"ws://127.0.0.1:{relay.port}/openai",
        api_key=ALPHA_KEY,
        api_version="2024-10-01-preview",
    )
    async with client.beta.realtime.connect(model="gpt-realtime") as conn:
        await conn.session.update(session=PREVIEW_SESSION)
        await conn.input_audio_buffer.append(audio=b64(tone_pcm(300)))
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        seen = []
        while True:
            raw = await conn.recv_bytes()
            event = sdk_types.check("beta", raw)
            assert event["type"] != "error", event
            seen.append(event["type"])
            if event["type"] == "response.done":
                break
    assert seen[0] == "session.created"
    assert "response.audio.delta" in seen


async def test_a_tool_using_agent_end_to_end(simulator, start_relay):
    """A function call, its output, then a spoken answer: what tool-using agents do."""
    relay = await start_relay(relay_config(simulator.url))
    client = AsyncOpenAI(
        websocket_base_url=f"ws://127.0.0.1:{relay.port}/openai/v1", api_key=ALPHA_KEY
    )
    tool = {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await conn.session.update(session={"type": "realtime", "tools": [tool]})
        await conn.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "What does get_weather say?"}],
            }
        )
        await conn.response.create()
        async for event in conn:
            assert event.type != "error", event
            if event.type == "response.function_call_arguments.done":
                call = event
            if event.type == "response.done":
                break
        assert (call.name, call.arguments) == ("get_weather", '{"city":"simulated"}')
        await conn.conversation.item.create(
            item={"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}
        )
        await conn.response.create()
        async for event in conn:
            assert event.type != "error", event
            if event.type == "response.done":
                break
        [message] = event.response.output
        assert message.content[0].transcript == "The tool answered: Sunny"
