"""relay.session.dialect: which dialect a client speaks, and translation both ways. No sockets."""

from __future__ import annotations

import base64

import orjson
import pytest

from relay.session.dialect import (
    Translator,
    client_dialect,
    is_preview_api_version,
    rename_on_bytes,
)
from relay.session.schema import EVENT_TO_PREVIEW

PREVIEW_TO_GA = Translator("preview", "ga")
GA_TO_PREVIEW = Translator("ga", "preview")


def dumps(event: dict) -> bytes:
    return orjson.dumps(event)


def one(frames: tuple[bytes, ...]) -> dict:
    assert len(frames) == 1
    return orjson.loads(frames[0])


@pytest.mark.parametrize(
    ("path", "api_version", "beta", "dialect"),
    [
        ("/openai/realtime", "2024-10-01-preview", False, "preview"),
        ("/openai/realtime", "2025-04-01-preview", False, "preview"),
        ("/openai/realtime", "2024-12-17", False, "preview"),
        ("/openai/realtime", "2025-08-27", False, "preview"),
        ("/openai/realtime", "2025-08-28", False, "ga"),
        ("/openai/realtime", "2026-01-01", False, "ga"),
        ("/openai/realtime", None, False, "ga"),
        ("/openai/realtime", "2025-08-28", True, "preview"),
        ("/openai/v1/realtime", "2024-10-01-preview", False, "ga"),
        ("/openai/v1/realtime", None, False, "ga"),
        ("/v1/realtime", None, False, "ga"),
        ("/v1/realtime", None, True, "preview"),
    ],
)
def test_client_dialect(path, api_version, beta, dialect):
    assert client_dialect(path, api_version, beta) == dialect


def test_preview_api_versions():
    assert is_preview_api_version("2099-01-01-preview")
    assert not is_preview_api_version("latest")
    assert not is_preview_api_version("2025-08-28")


# --- renaming on bytes --------------------------------------------------------------------

AUDIO = base64.b64encode(bytes(range(256)) * 20).decode()


@pytest.mark.parametrize("sep", [":", ": "])
def test_rename_on_bytes_changes_only_the_type(sep):
    event = {
        "type": "response.output_audio.delta",
        "event_id": "e1",
        "response_id": "r",
        "item_id": "i",
        "output_index": 0,
        "content_index": 0,
        "delta": AUDIO,
    }
    frame = orjson.dumps(event)
    if sep == ": ":
        frame = frame.replace(b'"type":"', b'"type": "', 1)
    renamed = rename_on_bytes(frame, b"response.output_audio.delta", b"response.audio.delta")
    assert renamed is not None
    assert orjson.loads(renamed) == {**event, "type": "response.audio.delta"}


@pytest.mark.parametrize(
    "frame",
    [
        # Not the type first.
        b'{"delta":"AAAA","type":"response.output_audio.delta"}',
        # A longer name that merely starts with the old one.
        b'{"type":"response.output_audio.delta.x","delta":"AAAA"}',
    ],
)
def test_rename_on_bytes_refuses_what_it_cannot_prove(frame):
    assert rename_on_bytes(frame, b"response.output_audio.delta", b"response.audio.delta") is None


def test_a_frame_bytes_cannot_prove_is_parsed_and_still_renamed():
    frame = b'{"delta":"say \\"hi\\"","type":"response.output_audio_transcript.delta"}'
    event = one(PREVIEW_TO_GA.to_client("response.output_audio_transcript.delta", frame))
    assert event == {"type": "response.audio_transcript.delta", "delta": 'say "hi"'}


# --- a preview client on a GA deployment ---------------------------------------------------

PREVIEW_SESSION = {
    "modalities": ["text", "audio"],
    "instructions": "Be brief.",
    "voice": "alloy",
    "input_audio_format": "pcm16",
    "output_audio_format": "g711_ulaw",
    "input_audio_transcription": {"model": "whisper-1"},
    "input_audio_noise_reduction": {"type": "near_field"},
    "turn_detection": {"type": "server_vad", "silence_duration_ms": 200},
    "tools": [{"type": "function", "name": "f", "parameters": {}}],
    "tool_choice": "auto",
    "max_response_output_tokens": "inf",
    "speed": 1.1,
}
GA_SESSION = {
    "type": "realtime",
    "output_modalities": ["audio"],
    "instructions": "Be brief.",
    "audio": {
        "input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "transcription": {"model": "whisper-1"},
            "noise_reduction": {"type": "near_field"},
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 200},
        },
        "output": {"format": {"type": "audio/pcmu"}, "voice": "alloy", "speed": 1.1},
    },
    "tools": [{"type": "function", "name": "f", "parameters": {}}],
    "tool_choice": "auto",
    "max_output_tokens": "inf",
}


def test_preview_session_update_becomes_ga():
    frame = dumps({"type": "session.update", "event_id": "c1", "session": PREVIEW_SESSION})
    translation = PREVIEW_TO_GA.to_upstream("session.update", frame, None)
    assert translation.dropped == ()
    assert orjson.loads(translation.frame) == {
        "type": "session.update",
        "event_id": "c1",
        "session": GA_SESSION,
    }


def test_ga_session_update_becomes_preview():
    frame = dumps({"type": "session.update", "session": GA_SESSION})
    translation = GA_TO_PREVIEW.to_upstream("session.update", frame, None)
    assert orjson.loads(translation.frame)["session"] == PREVIEW_SESSION


def test_fields_without_a_counterpart_are_left_out_and_named():
    session = {"voice": "alloy", "temperature": 0.8}
    frame = dumps({"type": "session.update", "event_id": "c2", "session": session})
    translation = PREVIEW_TO_GA.to_upstream("session.update", frame, None)
    assert translation.dropped == ("session.temperature",)
    assert translation.event_id == "c2"
    assert orjson.loads(translation.frame)["session"] == {
        "type": "realtime",
        "audio": {"output": {"voice": "alloy"}},
    }
    ga = {"type": "realtime", "truncation": "auto", "include": None, "instructions": "x"}
    translation = GA_TO_PREVIEW.to_upstream(
        "session.update", dumps({"type": "session.update", "session": ga}), None
    )
    assert translation.dropped == ("session.include", "session.truncation")
    assert orjson.loads(translation.frame)["session"] == {"instructions": "x"}


def test_events_with_no_counterpart_are_not_sent():
    frame = dumps({"type": "transcription_session.update", "session": {}})
    translation = PREVIEW_TO_GA.to_upstream("transcription_session.update", frame, None)
    assert translation.frame is None and translation.dropped == ("type",)
    frame = dumps({"type": "session.update", "session": {"type": "transcription"}})
    translation = GA_TO_PREVIEW.to_upstream("session.update", frame, None)
    assert translation.frame is None and translation.dropped == ("session.type",)


def test_response_create_and_items():
    preview = {
        "modalities": ["text"],
        "voice": "ash",
        "output_audio_format": "pcm16",
        "max_response_output_tokens": 200,
        "instructions": None,
        "temperature": 0.7,
        "input": [{"type": "message", "role": "assistant", "content": [{"type": "text"}]}],
    }
    frame = dumps({"type": "response.create", "response": preview})
    translation = PREVIEW_TO_GA.to_upstream("response.create", frame, None)
    assert translation.dropped == ("response.temperature",)
    assert orjson.loads(translation.frame)["response"] == {
        "output_modalities": ["text"],
        "audio": {"output": {"voice": "ash", "format": {"type": "audio/pcm", "rate": 24000}}},
        "max_output_tokens": 200,
        "instructions": None,
        "input": [{"type": "message", "role": "assistant", "content": [{"type": "output_text"}]}],
    }
    item = {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "audio", "transcript": "hi"}],
    }
    frame = dumps({"type": "conversation.item.create", "item": item})
    sent = orjson.loads(PREVIEW_TO_GA.to_upstream("conversation.item.create", frame, None).frame)
    assert sent["item"]["content"] == [{"type": "output_audio", "transcript": "hi"}]


def test_appends_and_unchanged_events_pass_untouched():
    for kind in ("input_audio_buffer.append", "input_audio_buffer.commit", "response.cancel"):
        assert kind not in PREVIEW_TO_GA.client_events
    frame = b'{"type":"input_audio_buffer.committed","item_id":"i"}'
    assert PREVIEW_TO_GA.to_client("input_audio_buffer.committed", frame) == (frame,)


def test_ga_server_events_reach_a_preview_client_in_its_names():
    session = {**GA_SESSION, "id": "s", "object": "realtime.session", "include": None}
    frames = PREVIEW_TO_GA.to_client(
        "session.created", dumps({"type": "session.created", "session": session})
    )
    created, conversation = (orjson.loads(frame) for frame in frames)
    assert created["session"] == {**PREVIEW_SESSION, "id": "s", "object": "realtime.session"}
    # As the preview service does, a conversation.created follows.
    assert conversation["type"] == "conversation.created"
    assert conversation["conversation"]["object"] == "realtime.conversation"
    for ga, preview in EVENT_TO_PREVIEW.items():
        if ga == "conversation.item.added":
            continue
        frame = dumps({"type": ga, "event_id": "e", "delta": "AAAA"})
        assert one(PREVIEW_TO_GA.to_client(ga, frame)) == {
            "type": preview,
            "event_id": "e",
            "delta": "AAAA",
        }
    item = {
        "id": "i",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_audio"}],
    }
    added = one(
        PREVIEW_TO_GA.to_client(
            "conversation.item.added", dumps({"type": "conversation.item.added", "item": item})
        )
    )
    assert added["type"] == "conversation.item.created"
    assert added["item"]["content"] == [{"type": "audio"}]
    assert (
        PREVIEW_TO_GA.to_client("conversation.item.done", dumps({"type": "conversation.item.done"}))
        == ()
    )
    # Content parts are `text` and `audio` in both dialects (the SDKs' models say so): as
    # they are. (They were retyped like items, which GA clients' models refused.)
    added = {"type": "response.content_part.added", "part": {"type": "audio", "transcript": ""}}
    assert PREVIEW_TO_GA.to_client("response.content_part.added", dumps(added)) == (dumps(added),)
    assert GA_TO_PREVIEW.to_client("response.content_part.added", dumps(added)) == (dumps(added),)


def test_a_ga_client_hears_the_name_of_the_function_whose_arguments_are_done():
    """GA's `response.function_call_arguments.done` names the function (its models require
    it); preview's does not: the name comes from the call's `response.output_item.added`."""
    translator = Translator("ga", "preview")
    call = {"id": "item_1", "type": "function_call", "name": "get_weather", "call_id": "c1"}
    translator.to_client(
        "response.output_item.added",
        dumps({"type": "response.output_item.added", "item": call}),
    )
    done = {"type": "response.function_call_arguments.done", "item_id": "item_1",
            "call_id": "c1", "arguments": "{}"}  # fmt: skip
    translated = one(translator.to_client("response.function_call_arguments.done", dumps(done)))
    assert translated == {**done, "name": "get_weather"}
    # A preview client gets the preview shape: without it.
    with_name = {**done, "name": "get_weather"}
    assert (
        one(PREVIEW_TO_GA.to_client("response.function_call_arguments.done", dumps(with_name)))
        == done
    )


def test_response_objects_and_error_params():
    response = {
        "id": "r",
        "output_modalities": ["audio"],
        "audio": {"output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy"}},
        "max_output_tokens": "inf",
        "output": [{"type": "message", "content": [{"type": "output_audio", "transcript": "hi"}]}],
        "usage": {"total_tokens": 3},
    }
    done = one(
        PREVIEW_TO_GA.to_client(
            "response.done", dumps({"type": "response.done", "response": response})
        )
    )
    assert done["response"] == {
        "id": "r",
        "modalities": ["text", "audio"],
        "output_audio_format": "pcm16",
        "voice": "alloy",
        "max_output_tokens": "inf",
        "output": [{"type": "message", "content": [{"type": "audio", "transcript": "hi"}]}],
        "usage": {"total_tokens": 3},
    }
    back = one(GA_TO_PREVIEW.to_client("response.done", dumps(done)))
    assert back["response"] == response
    error = {"type": "error", "error": {"param": "session.audio.output.voice", "code": "x"}}
    assert one(PREVIEW_TO_GA.to_client("error", dumps(error)))["error"]["param"] == "session.voice"
    assert (
        PREVIEW_TO_GA.client_param("response.max_output_tokens")
        == "response.max_response_output_tokens"
    )
    assert (
        GA_TO_PREVIEW.client_param("session.input_audio_transcription.model")
        == "session.audio.input.transcription.model"
    )
    assert PREVIEW_TO_GA.client_param("item.content") == "item.content"


# --- a GA client on a preview deployment ---------------------------------------------------


def test_preview_server_events_reach_a_ga_client_in_its_names():
    item = {
        "id": "i",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": "hi"}],
    }
    frames = GA_TO_PREVIEW.to_client(
        "conversation.item.created",
        dumps({"type": "conversation.item.created", "event_id": "e", "item": item}),
    )
    added, done = (orjson.loads(f) for f in frames)
    assert (added["type"], done["type"]) == ("conversation.item.added", "conversation.item.done")
    assert added["item"]["content"] == [{"type": "output_text", "text": "hi"}]
    assert added["event_id"] != done["event_id"]
    frame = b'{"type":"response.audio.delta","delta":"AAAA"}'
    assert GA_TO_PREVIEW.to_client("response.audio.delta", frame) == (
        b'{"type":"response.output_audio.delta","delta":"AAAA"}',
    )
    session = {**PREVIEW_SESSION, "temperature": 0.8, "id": "s"}
    created = one(
        GA_TO_PREVIEW.to_client(
            "session.created", dumps({"type": "session.created", "session": session})
        )
    )
    assert created["session"] == {**GA_SESSION, "id": "s"}
