"""The simulator's WebRTC calls after the answer (sideband sockets, call control, multipart
offers) and its transcription-only sessions, like Azure and no stricter."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from aiohttp import WSMsgType

from relay.simulator.calls import CALLS_KEY
from tests.simulator.conftest import KEY, RealtimeSocket, b64, speech_then_silence, types
from tests.test_webrtc import OFFER

CALLS = "/openai/v1/realtime/calls"


async def place(client, **kwargs: Any) -> str:
    kwargs.setdefault("data", OFFER)
    headers = {"api-key": KEY, "Content-Type": "application/sdp", **kwargs.pop("headers", {})}
    response = await client.post(CALLS + "?model=gpt-realtime", headers=headers, **kwargs)
    assert response.status == 201, await response.text()
    return response.headers["Location"].rsplit("/", 1)[-1]


async def sideband(client, call_id: str) -> RealtimeSocket:
    ws = await client.ws_connect(f"/openai/v1/realtime?call_id={call_id}", headers={"api-key": KEY})
    return RealtimeSocket(ws, "ga")


async def test_a_sideband_gets_the_calls_events_and_controls_it(client):
    call_id = await place(client)
    call = client.server.app[CALLS_KEY].calls[call_id]
    first, second = await sideband(client, call_id), await sideband(client, call_id)
    await first.send(
        {"type": "session.update", "session": {"type": "realtime", "instructions": "Hi"}}
    )
    for socket in (first, second):  # no session.created on a sideband; both see the update
        assert (await socket.recv())["type"] == "session.updated"
    await call.from_device(
        orjson.dumps({"type": "input_audio_buffer.append", "audio": b64(speech_then_silence())})
    )
    events = await second.recv_until("response.done")
    kinds = types(events)
    # On a call the audio is media: buffer events instead of audio deltas.
    assert "response.output_audio.delta" not in kinds
    started, stopped = (
        kinds.index("output_audio_buffer.started"),
        kinds.index("output_audio_buffer.stopped"),
    )
    assert kinds.index("input_audio_buffer.speech_stopped") < started < stopped
    response = await client.post(f"{CALLS}/{call_id}/hangup", headers={"api-key": KEY})
    assert response.status == 200
    for socket in (first, second):
        while (message := await socket.ws.receive()).type is WSMsgType.TEXT:
            pass
        assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 1000, "call ended")
    assert call_id not in client.server.app[CALLS_KEY].calls


async def test_call_control_refuses_what_azure_refuses(client):
    call_id = await place(client)
    for path, headers, status in [
        (f"{CALLS}/{call_id}/hangup", {}, 401),
        (f"{CALLS}/rtc_unknown/hangup", {"api-key": KEY}, 404),
        (f"{CALLS}/{call_id}/reject", {"api-key": KEY}, 400),  # not an incoming SIP call
        (f"{CALLS}/{call_id}/transfer", {"api-key": KEY}, 404),
    ]:
        response = await client.post(path, headers=headers)
        assert response.status == status, path
    response = await client.get("/openai/v1/realtime?call_id=rtc_unknown", headers={"api-key": KEY})
    assert response.status == 404
    assert call_id in client.server.app[CALLS_KEY].calls


async def test_a_multipart_offer_carries_its_session(client):
    form = aiohttp.FormData()
    form.add_field("sdp", OFFER, content_type="application/sdp")
    session = {"type": "realtime", "model": "gpt-realtime", "instructions": "Be brief."}
    form.add_field("session", orjson.dumps(session).decode(), content_type="application/json")
    response = await client.post(CALLS, data=form, headers={"api-key": KEY})
    assert response.status == 201, await response.text()
    call_id = response.headers["Location"].rsplit("/", 1)[-1]
    assert client.server.app[CALLS_KEY].calls[call_id].engine.session["instructions"] == "Be brief."
    for fields, param in [
        ({"session": orjson.dumps(session).decode()}, "sdp"),
        ({"sdp": OFFER, "session": '{"type": "translation"}'}, "session.type"),
        ({"sdp": OFFER, "session": '{"type": "realtime", "voice": "x"}'}, "session.voice"),
    ]:
        form = aiohttp.FormData(default_to_multipart=True)
        for name, value in fields.items():
            form.add_field(name, value)
        response = await client.post(
            CALLS + "?model=gpt-realtime", data=form, headers={"api-key": KEY}
        )
        assert response.status == 400
        assert (await response.json())["error"]["param"] == param


async def test_a_ga_transcription_session_transcribes_and_never_responds(client):
    ws = await client.ws_connect(
        "/openai/v1/realtime?intent=transcription", headers={"api-key": KEY}
    )
    socket = RealtimeSocket(ws, "ga")
    created = await socket.recv()
    assert created["type"] == "session.created" and created["session"]["type"] == "transcription"
    await socket.send({"type": "session.update", "session": {"type": "realtime"}})
    assert (await socket.recv())["error"]["param"] == "session.type"
    transcription = {"model": "gpt-4o-transcribe", "language": "en"}
    update = {"type": "transcription", "audio": {"input": {"transcription": transcription}}}
    await socket.send({"type": "session.update", "session": update})
    updated = await socket.recv()
    assert updated["session"]["audio"]["input"]["transcription"] == transcription
    await socket.append(speech_then_silence())
    events = await socket.recv_until("conversation.item.input_audio_transcription.completed")
    assert "conversation.item.input_audio_transcription.delta" in types(events)
    assert events[-1]["usage"]["type"] == "tokens"
    await socket.send({"type": "response.create"})
    error = await socket.recv()
    assert error["type"] == "error" and "transcription sessions" in error["error"]["message"]
    assert not any(kind.startswith("response.") for kind in types(socket.received))


async def test_a_preview_transcription_session_and_what_it_refuses(client):
    preview = "/openai/realtime?api-version=2025-04-01-preview&intent=transcription"
    response = await client.get(preview + "&deployment=gpt-4o-transcribe", headers={"api-key": KEY})
    assert response.status == 400  # Azure refuses a deployment here
    response = await client.get("/openai/v1/realtime?intent=chat", headers={"api-key": KEY})
    assert response.status == 400
    ws = await client.ws_connect(preview, headers={"api-key": KEY})

    async def recv() -> dict[str, Any]:
        return orjson.loads((await ws.receive()).data)

    assert (await recv())["type"] == "transcription_session.created"
    await ws.send_str(orjson.dumps({"type": "session.update", "session": {}}).decode())
    assert (await recv())["type"] == "error"
    session = {"input_audio_transcription": {"model": "whisper-1"}}
    await ws.send_str(
        orjson.dumps({"type": "transcription_session.update", "session": session}).decode()
    )
    updated = await recv()
    assert updated["type"] == "transcription_session.updated"
    assert updated["session"]["input_audio_transcription"] == {"model": "whisper-1"}
    await ws.send_str(
        orjson.dumps(
            {"type": "input_audio_buffer.append", "audio": b64(speech_then_silence())}
        ).decode()
    )
    while (event := await recv())[
        "type"
    ] != "conversation.item.input_audio_transcription.completed":
        pass
    assert event["usage"]["type"] == "duration"
    await ws.close()
