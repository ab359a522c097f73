"""The official openai SDK, unchanged, through the relay to the simulated Azure upstream."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
import trustme
from openai import AsyncAzureOpenAI, AsyncOpenAI

from tests.helpers import ALPHA_KEY, b64, relay_config, tone_pcm
from tests.simulator import sdk_types


async def converse(conn: Any) -> list[Any]:
    """Update the session, send audio, commit, ask for a response; return every event."""
    events: list[Any] = []

    async def until(wanted: str) -> Any:
        async for event in conn:
            events.append(event)
            if event.type == "error":
                raise AssertionError(f"error event: {event}")
            if event.type == wanted:
                return event
        raise AssertionError(f"connection ended before {wanted}")

    await until("session.created")
    await conn.session.update(
        session={"type": "realtime", "audio": {"input": {"turn_detection": None}}}
    )
    updated = await until("session.updated")
    assert updated.session.audio.input.turn_detection is None
    await conn.input_audio_buffer.append(audio=b64(tone_pcm(600)))
    await conn.input_audio_buffer.commit()
    await until("input_audio_buffer.committed")
    await conn.response.create()
    done = await until("response.done")
    assert done.response.status == "completed"
    assert done.response.usage.output_token_details.audio_tokens > 0
    assert any(e.type == "response.output_audio.delta" for e in events)
    return events


async def test_azure_client_over_plain_ws(simulator, start_relay):
    relay = await start_relay(relay_config(simulator.url))
    client = AsyncAzureOpenAI(
        azure_endpoint=f"http://127.0.0.1:{relay.port}",
        websocket_base_url=f"ws://127.0.0.1:{relay.port}/openai",
        api_key=ALPHA_KEY,
        api_version="2025-08-28",
    )
    # The SDK's Azure client always uses the preview path while speaking GA events:
    # the relay still reaches the deployment's GA upstream.
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await converse(conn)


@pytest.fixture(scope="module")
def test_ca() -> trustme.CA:
    return trustme.CA()


async def test_azure_client_with_azure_endpoint_over_tls(simulator, start_relay, test_ca):
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    test_ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    test_ca.configure_trust(client_ctx)
    relay = await start_relay(relay_config(simulator.url), ssl=server_ctx)
    client = AsyncAzureOpenAI(
        azure_endpoint=f"https://127.0.0.1:{relay.port}",
        api_key=ALPHA_KEY,
        api_version="2025-08-28",
    )
    async with client.realtime.connect(
        model="gpt-realtime", websocket_connection_options={"ssl": client_ctx}
    ) as conn:
        await converse(conn)


async def test_openai_client_on_the_ga_path_with_bearer_key(simulator, start_relay):
    relay = await start_relay(relay_config(simulator.url))
    client = AsyncOpenAI(
        websocket_base_url=f"ws://127.0.0.1:{relay.port}/openai/v1", api_key=ALPHA_KEY
    )
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await converse(conn)


async def test_every_relayed_event_validates_against_the_sdk_types(simulator, start_relay):
    relay = await start_relay(relay_config(simulator.url))
    client = AsyncOpenAI(websocket_base_url=f"ws://127.0.0.1:{relay.port}/v1", api_key=ALPHA_KEY)
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await conn.session.update(
            session={"type": "realtime", "audio": {"input": {"turn_detection": None}}}
        )
        await conn.input_audio_buffer.append(audio=b64(tone_pcm(300)))
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        seen = []
        while True:
            raw = await conn.recv_bytes()
            event = sdk_types.check("ga", raw)
            seen.append(event["type"])
            if event["type"] == "response.done":
                break
    assert seen[0] == "session.created"
    assert "response.output_audio.delta" in seen


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
