"""The conversation engine, driven directly: no sockets, no event loop."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from relay.simulator.audio import PCM16, reply_chunks, reply_duration_ms, synthesize_reply
from relay.simulator.engine import Action, CancelResponse, Engine, StartResponse
from relay.simulator.ids import IdFactory
from relay.simulator.options import SimulatorOptions
from relay.simulator.replies import default_reply, transcript_for
from relay.simulator.response import ResponseRun
from relay.simulator.schema import BETA, GA, Dialect
from relay.simulator.usage import output_audio_tokens, text_tokens
from tests.simulator import sdk_types
from tests.simulator.conftest import b64, silence, speech, speech_then_silence, types

NO_VAD = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}


class Harness:
    """An engine plus helpers; every event it emits is checked against the SDK types."""

    def __init__(self, dialect: Dialect = GA, **options: Any) -> None:
        self.engine = Engine(
            dialect,
            model="gpt-realtime",
            options=SimulatorOptions(**options),
            ids=IdFactory(7),
            now=1_000_000,
        )
        self.dialect = dialect.name
        self.event_ids: set[str] = set()
        self.check(self.engine.session_created())

    def check(self, event: dict[str, Any]) -> dict[str, Any]:
        sdk_types.check(self.dialect, orjson.dumps(event))
        assert event["event_id"] not in self.event_ids
        self.event_ids.add(event["event_id"])
        return event

    def send(self, event: dict[str, Any] | bytes) -> list[Action]:
        raw = event if isinstance(event, bytes) else orjson.dumps(event)
        actions = self.engine.receive_text(raw)
        for action in actions:
            if isinstance(action, dict):
                self.check(action)
        return actions

    def events(self, event: dict[str, Any] | bytes) -> list[dict[str, Any]]:
        actions = self.send(event)
        assert all(isinstance(a, dict) for a in actions), actions
        return actions  # type: ignore[return-value]

    def error(self, event: dict[str, Any] | bytes) -> dict[str, Any]:
        [error] = self.events(event)
        assert error["type"] == "error"
        assert error["error"]["type"] == "invalid_request_error"
        return error["error"]  # type: ignore[no-any-return]

    def start(self, response: dict[str, Any] | None = None) -> ResponseRun:
        event: dict[str, Any] = {"type": "response.create"}
        if response is not None:
            event["response"] = response
        [action] = self.send(event)
        assert isinstance(action, StartResponse)
        return action.run

    def play(self, run: ResponseRun, limit: int | None = None) -> list[dict[str, Any]]:
        """Events of a run (pacing steps skipped), at most ``limit`` of them."""
        events: list[dict[str, Any]] = []
        for step in run.steps():
            if isinstance(step, dict):
                events.append(self.check(step))
                if limit is not None and len(events) == limit:
                    break
        return events

    def no_vad(self) -> None:
        self.events({"type": "session.update", "session": NO_VAD})


def audio_of(events: list[dict[str, Any]], kind: str = "response.output_audio.delta") -> bytes:
    return b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == kind)


def test_session_created_has_a_future_expiry() -> None:
    created = Harness().engine.session_created()
    assert created["session"]["expires_at"] == 1_000_000 + 3600  # Azure: 60 minutes
    assert created["session"]["id"].startswith("sess_")


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code", "param"),
    [
        (b"{not json", "invalid_json", None),
        (b"", "invalid_json", None),
        (b"[1, 2]", "invalid_type", None),
        (b'"session.update"', "invalid_type", None),
        (b"{}", "missing_required_parameter", "type"),
        (b'{"type": 5}', "invalid_type", "type"),
        (b'{"type": "session.teleport"}', "invalid_value", "type"),
        (b'{"type": "input_audio_buffer.commit", "audio": "AA=="}', "unknown_parameter", "audio"),
        (b'{"type": "input_audio_buffer.append"}', "missing_required_parameter", "audio"),
        (b'{"type": "input_audio_buffer.append", "audio": 12}', "invalid_type", "audio"),
        (b'{"type": "input_audio_buffer.append", "audio": "%%%"}', "invalid_value", "audio"),
        (b'{"type": "input_audio_buffer.clear", "event_id": 3}', "invalid_type", "event_id"),
        (b'{"type": "output_audio_buffer.clear"}', "invalid_value", "type"),
        (b'{"type": "transcription_session.update", "session": {}}', "invalid_value", "type"),
        (
            b'{"type": "conversation.item.retrieve", "item_id": "item_nope"}',
            "invalid_value",
            "item_id",
        ),
        (
            b'{"type": "conversation.item.delete", "item_id": "item_nope"}',
            "invalid_value",
            "item_id",
        ),
        (
            b'{"type": "conversation.item.create", "item": {"type": "message"}}',
            "missing_required_parameter",
            "item.role",
        ),
        (
            b'{"type": "response.create", "response": {"modalities": ["text"]}}',
            "unknown_parameter",
            "response.modalities",
        ),
        (
            b'{"type": "response.create", "response": {"conversation": "other"}}',
            "invalid_value",
            "response.conversation",
        ),
        (
            b'{"type": "response.create", "response": {"max_output_tokens": 0}}',
            "invalid_value",
            "response.max_output_tokens",
        ),
    ],
)
def test_client_errors(raw: bytes, code: str, param: str | None) -> None:
    harness = Harness()
    error = harness.error(raw)
    assert (error["code"], error["param"]) == (code, param)
    # The engine is still usable afterwards.
    assert types(harness.events({"type": "input_audio_buffer.clear"})) == [
        "input_audio_buffer.cleared"
    ]


def test_unknown_type_lists_the_supported_ones() -> None:
    message = Harness().error({"type": "response.audio.delta"})["message"]
    assert message.startswith("Invalid value: 'response.audio.delta'. Supported values are: ")
    assert "'session.update'" in message and "transcription_session.update" not in message


def test_error_echoes_the_client_event_id() -> None:
    error = Harness().error({"type": "input_audio_buffer.commit", "event_id": "evt_client_1"})
    assert error["code"] == "input_audio_buffer_commit_empty"
    assert error["event_id"] == "evt_client_1"
    assert "Expected at least 100ms of audio, but buffer only has 0.00ms" in error["message"]


def test_binary_frames_get_an_error() -> None:
    harness = Harness()
    [error] = harness.engine.receive_binary()
    assert isinstance(error, dict)
    harness.check(error)


def test_invalid_session_update_changes_nothing() -> None:
    harness = Harness()
    before = harness.engine.session
    harness.error(
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "instructions": "x",
                "audio": {"output": {"voice": "nova"}},
            },
        }
    )
    assert harness.engine.session is before


# -- input audio buffer -------------------------------------------------------------------


def test_manual_commit_creates_a_user_audio_item() -> None:
    harness = Harness()
    harness.no_vad()
    assert harness.events({"type": "input_audio_buffer.append", "audio": b64(speech(50))}) == []
    assert (
        harness.error({"type": "input_audio_buffer.commit"})["code"]
        == "input_audio_buffer_commit_empty"
    )
    harness.events({"type": "input_audio_buffer.append", "audio": b64(speech(150))})
    committed, added, done = harness.events({"type": "input_audio_buffer.commit"})
    assert types([committed, added, done]) == [
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    assert committed["previous_item_id"] is None
    item = added["item"]
    assert committed["item_id"] == item["id"] == done["item"]["id"]
    assert item["role"] == "user" and item["content"] == [
        {"type": "input_audio", "transcript": None}
    ]
    # The second commit points at the first item.
    harness.events({"type": "input_audio_buffer.append", "audio": b64(speech(100))})
    assert (
        harness.events({"type": "input_audio_buffer.commit"})[0]["previous_item_id"] == item["id"]
    )
    [retrieved] = harness.events({"type": "conversation.item.retrieve", "item_id": item["id"]})
    assert base64.b64decode(retrieved["item"]["content"][0]["audio"]) == speech(50) + speech(150)


def test_clear_empties_the_buffer() -> None:
    harness = Harness()
    harness.no_vad()
    harness.events({"type": "input_audio_buffer.append", "audio": b64(speech(500))})
    assert types(harness.events({"type": "input_audio_buffer.clear"})) == [
        "input_audio_buffer.cleared"
    ]
    assert (
        harness.error({"type": "input_audio_buffer.commit"})["code"]
        == "input_audio_buffer_commit_empty"
    )


@pytest.mark.parametrize(
    ("model", "usage_type"), [("whisper-1", "duration"), ("gpt-4o-transcribe", "tokens")]
)
def test_transcription(model: str, usage_type: str) -> None:
    harness = Harness()
    harness.events(
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "audio": {"input": {"turn_detection": None, "transcription": {"model": model}}},
            },
        }
    )
    harness.events({"type": "input_audio_buffer.append", "audio": b64(speech(1200))})
    events = harness.events({"type": "input_audio_buffer.commit"})
    completed = events[-1]
    assert completed["type"] == "conversation.item.input_audio_transcription.completed"
    assert (
        completed["transcript"] == transcript_for(1200) and completed["usage"]["type"] == usage_type
    )
    assert ("conversation.item.input_audio_transcription.delta" in types(events)) == (
        usage_type == "tokens"
    )


def test_server_vad_commits_and_responds() -> None:
    harness = Harness()
    actions = harness.send(
        {"type": "input_audio_buffer.append", "audio": b64(speech_then_silence(1000, 800))}
    )
    *events, start = actions
    assert types(events) == [  # type: ignore[arg-type]
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    started, stopped, committed = events[:3]
    assert started["audio_start_ms"] == 0 and stopped["audio_end_ms"] == 1500  # type: ignore[index]
    assert started["item_id"] == stopped["item_id"] == committed["item_id"]  # type: ignore[index]
    assert isinstance(start, StartResponse)
    assert harness.engine.active_response is start.run


def test_a_vad_turn_holds_the_audio_between_its_reported_start_and_end() -> None:
    harness = Harness()
    sent = silence(1000) + speech_then_silence(1000, 800)
    actions = harness.send({"type": "input_audio_buffer.append", "audio": b64(sent[:24000])})
    actions += harness.send({"type": "input_audio_buffer.append", "audio": b64(sent[24000:])})
    started, stopped, committed = [a for a in actions if isinstance(a, dict)][:3]
    assert started["audio_start_ms"] == 700 and stopped["audio_end_ms"] == 2500
    item_id = committed["item_id"]
    [retrieved] = harness.events({"type": "conversation.item.retrieve", "item_id": item_id})
    audio = base64.b64decode(retrieved["item"]["content"][0]["audio"])
    assert audio == sent[700 * 48 : 2500 * 48]  # the prefix padding, not the whole silence


def test_vad_without_create_response_only_commits() -> None:
    harness = Harness()
    harness.events(
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "audio": {
                    "input": {"turn_detection": {"type": "server_vad", "create_response": False}}
                },
            },
        }
    )
    actions = harness.send(
        {"type": "input_audio_buffer.append", "audio": b64(speech_then_silence())}
    )
    assert not any(isinstance(a, StartResponse) for a in actions)


def test_speech_interrupts_the_active_response() -> None:
    harness = Harness()
    run = harness.start()
    harness.play(run, limit=6)
    actions = harness.send(
        {"type": "input_audio_buffer.append", "audio": b64(speech_then_silence())}
    )
    assert (
        isinstance(actions[0], dict) and actions[0]["type"] == "input_audio_buffer.speech_started"
    )
    cancel = actions[1]
    assert (
        isinstance(cancel, CancelResponse)
        and cancel.run is run
        and cancel.reason == "turn_detected"
    )
    assert isinstance(actions[-1], StartResponse)  # the new turn gets its answer
    closing = [harness.check(e) for e in run.finish("cancelled", cancel.reason)]
    done = closing[-1]["response"]
    assert done["status"] == "cancelled"
    assert done["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    assert done["output"][0]["status"] == "incomplete"


# -- conversation items -------------------------------------------------------------------


def user_text(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": text}],
        **extra,
    }


def test_item_create_retrieve_delete() -> None:
    harness = Harness()
    added, done = harness.events({"type": "conversation.item.create", "item": user_text("hello")})
    item_id = added["item"]["id"]
    assert added["previous_item_id"] is None and done["item"] == added["item"]
    assert added["item"]["status"] == "completed" and added["item"]["object"] == "realtime.item"
    first, _ = harness.events(
        {
            "type": "conversation.item.create",
            "previous_item_id": "root",
            "item": user_text("first", id="item_custom"),
        }
    )
    assert first["previous_item_id"] is None
    assert [i.id for i in harness.engine.conversation.items()] == ["item_custom", item_id]
    assert (
        harness.error(
            {"type": "conversation.item.create", "item": user_text("dup", id="item_custom")}
        )["param"]
        == "item.id"
    )
    assert (
        harness.error(
            {
                "type": "conversation.item.create",
                "previous_item_id": "item_x",
                "item": user_text("x"),
            }
        )["param"]
        == "previous_item_id"
    )
    [retrieved] = harness.events({"type": "conversation.item.retrieve", "item_id": item_id})
    assert retrieved["item"]["content"] == [{"type": "input_text", "text": "hello"}]
    [deleted] = harness.events({"type": "conversation.item.delete", "item_id": item_id})
    assert deleted["item_id"] == item_id
    assert (
        harness.error({"type": "conversation.item.retrieve", "item_id": item_id})["code"]
        == "invalid_value"
    )


@pytest.mark.parametrize(
    ("dialect", "content_type", "ok"),
    [
        (GA, "output_text", True),
        (GA, "text", False),
        (BETA, "text", True),
        (BETA, "output_text", False),
    ],
)
def test_assistant_content_types_follow_the_dialect(
    dialect: Dialect, content_type: str, ok: bool
) -> None:
    harness = Harness(dialect)
    item = {
        "type": "message",
        "role": "assistant",
        "content": [{"type": content_type, "text": "hi"}],
    }
    events = harness.events({"type": "conversation.item.create", "item": item})
    assert (events[0]["type"] != "error") == ok


def test_function_call_items() -> None:
    harness = Harness()
    call = {"type": "function_call", "name": "lookup", "arguments": "{}", "call_id": "call_1"}
    output = {"type": "function_call_output", "call_id": "call_1", "output": '{"ok": true}'}
    harness.events({"type": "conversation.item.create", "item": call})
    harness.events({"type": "conversation.item.create", "item": output})
    assert len(harness.engine.conversation.items()) == 2


# -- responses --------------------------------------------------------------------------


GA_SEQUENCE_HEAD = [
    "response.created",
    "rate_limits.updated",
    "response.output_item.added",
    "conversation.item.added",
    "response.content_part.added",
]
GA_SEQUENCE_TAIL = [
    "response.output_audio.done",
    "response.output_audio_transcript.done",
    "response.content_part.done",
    "response.output_item.done",
    "conversation.item.done",
    "response.done",
]


def test_audio_response_sequence_audio_and_usage() -> None:
    harness = Harness(chunk_ms=100)
    harness.events({"type": "conversation.item.create", "item": user_text("What's up?")})
    events = harness.play(harness.start())
    reply = "You said: What's up?"
    assert types(events[:5]) == GA_SEQUENCE_HEAD and types(events[-6:]) == GA_SEQUENCE_TAIL
    deltas = types(events[5:-6])
    assert set(deltas) == {"response.output_audio.delta", "response.output_audio_transcript.delta"}
    assert deltas.count("response.output_audio.delta") == len(reply_chunks(reply, 100))
    assert audio_of(events) == synthesize_reply(reply)
    transcript = "".join(
        e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta"
    )
    assert transcript == reply == events[-5]["transcript"]
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["status_details"] is None
    assert done["output"][0]["content"] == [{"type": "output_audio", "transcript": reply}]
    usage = done["usage"]
    assert usage["output_token_details"] == {
        "text_tokens": text_tokens(reply),
        "audio_tokens": output_audio_tokens(reply_duration_ms(reply)),
    }
    instructions = harness.engine.settings.instructions
    assert usage["input_token_details"]["text_tokens"] == text_tokens(instructions) + text_tokens(
        "What's up?"
    )
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert harness.engine.active_response is None


def test_transcript_leads_the_audio() -> None:
    harness = Harness(reply_text="one two three four five six seven eight nine ten")
    events = harness.play(harness.start())
    first_audio = types(events).index("response.output_audio.delta")
    assert events[first_audio - 1]["type"] == "response.output_audio_transcript.delta"


def test_steps_carry_audio_deadlines() -> None:
    harness = Harness(reply_text="x" * 20, chunk_ms=200)  # 1200 ms of audio
    deadlines = [step for step in harness.start().steps() if isinstance(step, float)]
    # Deltas of 100, 300, 200, 150, 250 ms (sizes vary around chunk_ms), then 100 and 100.
    assert deadlines == [100.0, 400.0, 600.0, 750.0, 1000.0, 1100.0]


def test_reply_follows_the_input() -> None:
    harness = Harness()
    harness.no_vad()
    harness.events({"type": "input_audio_buffer.append", "audio": b64(speech(1500))})
    harness.events({"type": "input_audio_buffer.commit"})
    events = harness.play(harness.start())
    assert (
        events[-1]["response"]["output"][0]["content"][0]["transcript"]
        == "I heard 1.5 seconds of audio."
    )
    assert default_reply([]) == "Hello! This is the simulated realtime service."


def test_one_response_at_a_time() -> None:
    harness = Harness()
    run = harness.start()
    error = harness.error({"type": "response.create"})
    assert (
        error["code"] == "conversation_already_has_active_response" and run.id in error["message"]
    )
    harness.play(run)
    harness.start()


def test_cancel_reports_usage_so_far() -> None:
    harness = Harness(reply_text="A long reply that will not be heard to the end. " * 4)
    run = harness.start()
    played = harness.play(run, limit=9)
    assert (
        harness.error({"type": "response.cancel", "response_id": "resp_other"})["code"]
        == "response_cancel_not_active"
    )
    [cancel] = harness.send({"type": "response.cancel", "response_id": run.id})
    assert isinstance(cancel, CancelResponse) and cancel.reason == "client_cancelled"
    closing = [harness.check(e) for e in run.finish("cancelled", cancel.reason)]
    assert types(closing) == GA_SEQUENCE_TAIL
    done = closing[-1]["response"]
    assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
    heard = PCM16.duration_ms(len(audio_of(played)))
    assert done["usage"]["output_token_details"]["audio_tokens"] == output_audio_tokens(heard) > 0
    assert run.finish("cancelled", "client_cancelled") == []
    assert harness.error({"type": "response.cancel"})["code"] == "response_cancel_not_active"
    harness.start()  # a new response may start right away


def test_cancel_before_any_output() -> None:
    harness = Harness()
    run = harness.start()
    harness.play(run, limit=1)
    harness.send({"type": "response.cancel"})
    [done] = [harness.check(e) for e in run.finish("cancelled", "client_cancelled")]
    assert done["response"]["output"] == [] and done["response"]["usage"]["output_tokens"] == 0


def test_cancel_before_the_run_started() -> None:
    harness = Harness()
    run = harness.start()
    harness.send({"type": "response.cancel"})
    closing = [harness.check(e) for e in run.finish("cancelled", "client_cancelled")]
    assert types(closing) == ["response.created", "response.done"]
    assert closing[0]["response"]["id"] == closing[1]["response"]["id"] == run.id


def test_cancel_between_item_and_conversation_announcement() -> None:
    harness = Harness()
    run = harness.start()
    assert types(harness.play(run, limit=3))[-1] == "response.output_item.added"
    harness.send({"type": "response.cancel"})
    closing = [harness.check(e) for e in run.finish("cancelled", "client_cancelled")]
    assert types(closing) == ["response.output_item.done", "response.done"]


def test_text_only_response() -> None:
    harness = Harness(reply_text="Just text, please.")
    events = harness.play(
        harness.start({"output_modalities": ["text"], "instructions": "Be terse."})
    )
    kinds = types(events)
    assert "response.output_audio.delta" not in kinds
    assert kinds[-5:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    assert (
        "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        == "Just text, please."
    )
    assert events[4]["part"] == {"type": "text", "text": ""}
    done = events[-1]["response"]
    assert (
        done["output_modalities"] == ["text"]
        and done["usage"]["output_token_details"]["audio_tokens"] == 0
    )
    assert done["output"][0]["content"] == [{"type": "output_text", "text": "Just text, please."}]


def test_max_output_tokens_makes_the_response_incomplete() -> None:
    harness = Harness(reply_text="This reply is much longer than the token budget allows.")
    events = harness.play(harness.start({"max_output_tokens": 10}))
    done = events[-1]["response"]
    assert done["status"] == "incomplete" and done["max_output_tokens"] == 10
    assert done["status_details"] == {"type": "incomplete", "reason": "max_output_tokens"}
    assert 0 < done["usage"]["output_tokens"] <= 10
    assert done["output"][0]["status"] == "incomplete"


def test_out_of_band_response() -> None:
    harness = Harness()
    harness.events({"type": "conversation.item.create", "item": user_text("in the conversation")})
    run = harness.start(
        {
            "conversation": "none",
            "metadata": {"topic": "summary"},
            "input": [user_text("only this")],
        }
    )
    events = harness.play(run)
    assert "conversation.item.added" not in types(events) and "conversation.item.done" not in types(
        events
    )
    done = events[-1]["response"]
    assert done["conversation_id"] is None and done["metadata"] == {"topic": "summary"}
    assert done["output"][0]["content"][0]["transcript"] == "You said: only this"
    assert len(harness.engine.conversation.items()) == 1


def test_response_input_can_reference_items() -> None:
    harness = Harness()
    [added, _] = harness.events(
        {"type": "conversation.item.create", "item": user_text("referenced")}
    )
    run = harness.start({"input": [{"type": "item_reference", "id": added["item"]["id"]}]})
    assert (
        harness.play(run)[-1]["response"]["output"][0]["content"][0]["transcript"]
        == "You said: referenced"
    )
    assert (
        harness.error(
            {
                "type": "response.create",
                "response": {"input": [{"type": "item_reference", "id": "item_x"}]},
            }
        )["param"]
        == "response.input[0].id"
    )


def test_metadata_limits() -> None:
    harness = Harness()
    error = harness.error(
        {"type": "response.create", "response": {"metadata": {str(i): "v" for i in range(17)}}}
    )
    assert error["param"] == "response.metadata"


def test_voice_is_fixed_after_the_assistant_spoke() -> None:
    harness = Harness()
    harness.events(
        {
            "type": "session.update",
            "session": {"type": "realtime", "audio": {"output": {"voice": "marin"}}},
        }
    )
    harness.play(harness.start())
    error = harness.error(
        {
            "type": "session.update",
            "session": {"type": "realtime", "audio": {"output": {"voice": "cedar"}}},
        }
    )
    assert error["param"] == "session.audio.output.voice"
    harness.events(
        {
            "type": "session.update",
            "session": {"type": "realtime", "audio": {"output": {"voice": "marin"}}},
        }
    )


def test_truncate_assistant_audio() -> None:
    harness = Harness(reply_text="Hello there, how are you?")
    events = harness.play(harness.start())
    item_id = events[-1]["response"]["output"][0]["id"]
    [truncated] = harness.events(
        {
            "type": "conversation.item.truncate",
            "item_id": item_id,
            "content_index": 0,
            "audio_end_ms": 300,
        }
    )
    assert (truncated["item_id"], truncated["content_index"], truncated["audio_end_ms"]) == (
        item_id,
        0,
        300,
    )
    [retrieved] = harness.events({"type": "conversation.item.retrieve", "item_id": item_id})
    assert retrieved["item"]["content"][0]["transcript"] == ""
    too_long = {
        "type": "conversation.item.truncate",
        "item_id": item_id,
        "content_index": 0,
        "audio_end_ms": 301,
    }
    assert harness.error(too_long)["param"] == "audio_end_ms"
    assert (
        harness.error({**too_long, "content_index": 1, "audio_end_ms": 0})["param"]
        == "content_index"
    )
    [user, _] = harness.events({"type": "conversation.item.create", "item": user_text("hi")})
    assert harness.error({**too_long, "item_id": user["item"]["id"]})["param"] == "item_id"


def test_items_being_generated_cannot_be_deleted() -> None:
    harness = Harness()
    run = harness.start()
    harness.play(run, limit=4)
    assert (
        harness.error({"type": "conversation.item.delete", "item_id": run.item_id})["param"]
        == "item_id"
    )


# -- beta dialect -------------------------------------------------------------------------


def test_beta_response_uses_beta_names() -> None:
    harness = Harness(BETA, reply_text="Beta reply.")
    [created] = harness.events({"type": "conversation.item.create", "item": user_text("hi")})
    assert created["type"] == "conversation.item.created"
    events = harness.play(
        harness.start({"modalities": ["text", "audio"], "voice": "echo", "temperature": 0.9})
    )
    kinds = types(events)
    assert kinds[:5] == GA_SEQUENCE_HEAD[:3] + [
        "conversation.item.created",
        "response.content_part.added",
    ]
    assert {"response.audio.delta", "response.audio_transcript.delta"} <= set(kinds)
    assert kinds[-5:] == [
        "response.audio.done",
        "response.audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.done",
    ]
    done = events[-1]["response"]
    assert (
        done["modalities"] == ["text", "audio"]
        and done["voice"] == "echo"
        and done["temperature"] == 0.9
    )
    assert done["output"][0]["content"] == [{"type": "audio", "transcript": "Beta reply."}]
    assert "image_tokens" not in done["usage"]["input_token_details"]
    assert audio_of(events, "response.audio.delta") == synthesize_reply("Beta reply.")


def test_beta_text_only() -> None:
    harness = Harness(BETA, reply_text="Text.")
    events = harness.play(harness.start({"modalities": ["text"]}))
    assert "response.text.delta" in types(events) and "response.text.done" in types(events)


def test_an_append_may_carry_15_mib_and_no_more() -> None:
    harness = Harness()
    harness.no_vad()
    most = b"\x01\x00" * (15 * 1024 * 1024 // 2)
    assert harness.events({"type": "input_audio_buffer.append", "audio": b64(most)}) == []
    error = harness.error({"type": "input_audio_buffer.append", "audio": b64(most + b"\0\0")})
    assert (error["code"], error["param"]) == ("invalid_value", "audio")


def test_an_images_detail_is_kept_and_checked() -> None:
    """It was dropped from the item (the SDK's model has it), and any value taken."""
    harness = Harness()
    image = {"type": "input_image", "image_url": "data:image/png;base64,AA==", "detail": "high"}
    item = {"type": "message", "role": "user", "content": [image]}
    added, _ = harness.events({"type": "conversation.item.create", "item": item})
    assert added["item"]["content"] == [image]
    wrong = {**item, "content": [{**image, "detail": "ultra"}]}
    assert harness.error({"type": "conversation.item.create", "item": wrong})["param"] == (
        "item.content[0].detail"
    )
