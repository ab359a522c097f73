"""The official ``openai`` SDK against the simulator, as a client would use it."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest
from openai import AsyncAzureOpenAI, AsyncOpenAI
from websockets.exceptions import InvalidStatus

from relay.simulator import RunningSimulator, SimulatorOptions, start_simulator
from relay.simulator.audio import PCM16, reply_duration_ms
from tests.simulator import sdk_types
from tests.simulator.conftest import KEY, TOKEN, b64, speech, speech_then_silence


@pytest.fixture
async def simulator() -> AsyncIterator[RunningSimulator]:
    options = SimulatorOptions(api_keys=frozenset({KEY}), bearer_tokens=frozenset({TOKEN}), speed=0)
    async with await start_simulator(options) as running:
        yield running


def ws_base(simulator: RunningSimulator, path: str) -> str:
    return simulator.url.replace("http://", "ws://") + path


async def receive_until(connection: Any, dialect: str, kind: str) -> list[Any]:
    """SDK-parsed events up to ``kind``; every raw frame is also validated strictly."""
    events = []
    while True:
        raw = await connection.recv_bytes()
        sdk_types.check(dialect, raw)
        event = connection.parse_event(raw)
        events.append(event)
        if event.type == kind:
            return events


async def test_openai_client_full_conversation(simulator: RunningSimulator) -> None:
    client = AsyncOpenAI(websocket_base_url=ws_base(simulator, "/openai/v1"), api_key=KEY)
    async with client.realtime.connect(model="gpt-realtime") as connection:
        created = await connection.recv()
        assert created.type == "session.created"
        await connection.session.update(
            session={
                "type": "realtime",
                "output_modalities": ["audio"],
                "instructions": "Be brief.",
                "audio": {
                    "input": {
                        "turn_detection": None,
                        "transcription": {"model": "gpt-4o-mini-transcribe"},
                    },
                    "output": {"voice": "cedar"},
                },
            }
        )
        [updated] = await receive_until(connection, "ga", "session.updated")
        assert updated.session.audio.output.voice == "cedar"
        await connection.input_audio_buffer.append(audio=b64(speech(1000)))
        await connection.input_audio_buffer.commit()
        committed = await receive_until(
            connection, "ga", "conversation.item.input_audio_transcription.completed"
        )
        assert [e.type for e in committed][:3] == [
            "input_audio_buffer.committed",
            "conversation.item.added",
            "conversation.item.done",
        ]
        await connection.response.create()
        events = await receive_until(connection, "ga", "response.done")
    audio = b"".join(
        base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta"
    )
    transcript = "".join(
        e.delta for e in events if e.type == "response.output_audio_transcript.delta"
    )
    assert transcript == "You said: Hello, this is 1.0 seconds of simulated speech."
    assert PCM16.duration_ms(len(audio)) == reply_duration_ms(transcript)
    done = events[-1].response
    assert done.status == "completed" and done.usage.total_tokens > 0
    assert done.output[0].content[0].transcript == transcript


async def test_openai_client_server_vad(simulator: RunningSimulator) -> None:
    client = AsyncOpenAI(websocket_base_url=ws_base(simulator, "/openai/v1"), api_key=KEY)
    async with client.realtime.connect(model="my-deployment") as connection:
        await receive_until(connection, "ga", "session.created")
        audio = speech_then_silence(700, 700)
        for start in range(0, len(audio), 4800):
            await connection.input_audio_buffer.append(audio=b64(audio[start : start + 4800]))
        events = await receive_until(connection, "ga", "response.done")
    kinds = [e.type for e in events]
    assert kinds[:2] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"]
    assert events[-1].response.status == "completed"


async def test_azure_client_on_the_preview_path_gets_ga_events(simulator: RunningSimulator) -> None:
    # The SDK's Azure client always uses /openai/realtime?api-version=…&deployment=…; with
    # api-version 2025-08-28 Azure serves GA events there (protocol.md §9: the path and
    # api-version decide the dialect), and the SDK's own session.update must be taken.
    client = AsyncAzureOpenAI(
        azure_endpoint=simulator.url,
        websocket_base_url=ws_base(simulator, "/openai"),
        api_key=KEY,
        api_version="2025-08-28",
    )
    async with client.realtime.connect(model="gpt-realtime") as connection:
        event = sdk_types.check("ga", await connection.recv_bytes())
        assert event["type"] == "session.created" and event["session"]["type"] == "realtime"
        await connection.session.update(session={"type": "realtime", "instructions": "Hi."})
        updated = sdk_types.check("ga", await connection.recv_bytes())
        assert updated["type"] == "session.updated"
    preview = AsyncAzureOpenAI(
        azure_endpoint=simulator.url,
        websocket_base_url=ws_base(simulator, "/openai"),
        api_key=KEY,
        api_version="2024-10-01-preview",
    )
    async with preview.beta.realtime.connect(model="gpt-realtime") as connection:
        event = sdk_types.check("beta", await connection.recv_bytes())
        assert event["type"] == "session.created" and "type" not in event["session"]


async def test_azure_client_with_an_entra_token(simulator: RunningSimulator) -> None:
    client = AsyncAzureOpenAI(
        azure_endpoint=simulator.url,
        websocket_base_url=ws_base(simulator, "/openai"),
        azure_ad_token=TOKEN,
        api_version="2025-04-01-preview",
    )
    async with client.beta.realtime.connect(model="gpt-4o-realtime-preview") as connection:
        created = await connection.recv()
        assert created.type == "session.created"
        await connection.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Hi"}],
            }
        )
        await connection.response.create(response={"modalities": ["text"]})
        events = await receive_until(connection, "beta", "response.done")
    assert "response.text.delta" in [e.type for e in events]
    assert events[-1].response.output[0].content[0].text == "You said: Hi"


async def test_wrong_key_fails_the_sdk_handshake(simulator: RunningSimulator) -> None:
    client = AsyncOpenAI(websocket_base_url=ws_base(simulator, "/openai/v1"), api_key="wrong")
    with pytest.raises(InvalidStatus) as caught:
        async with client.realtime.connect(model="gpt-realtime"):
            pass
    assert caught.value.response.status_code == 401
