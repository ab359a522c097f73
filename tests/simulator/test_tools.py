"""Function calls, nulls that mean "unset", and the preview greeting: engine-level tests."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from relay.simulator.schema import BETA, GA, Dialect
from relay.simulator.tools import sample_value
from tests.simulator.conftest import b64, speech, types
from tests.simulator.test_engine import NO_VAD, Harness, user_text

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
    },
}
CALL_SEQUENCE = {
    "ga": [
        "response.created",
        "rate_limits.updated",
        "response.output_item.added",
        "conversation.item.added",
        *["response.function_call_arguments.delta"] * 3,
        "response.function_call_arguments.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ],
    "beta": [
        "response.created",
        "rate_limits.updated",
        "response.output_item.added",
        "conversation.item.created",
        *["response.function_call_arguments.delta"] * 3,
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.done",
    ],
}


def with_tools(dialect: Dialect = GA, tool_choice: Any = "auto", **options: Any) -> Harness:
    harness = Harness(dialect, **options)
    session: dict[str, Any] = {"tools": [WEATHER], "tool_choice": tool_choice}
    if dialect is GA:
        session["type"] = "realtime"
    [updated] = harness.events({"type": "session.update", "session": session})
    assert updated["type"] == "session.updated"
    return harness


@pytest.mark.parametrize("dialect", [GA, BETA])
def test_naming_a_tool_gets_a_function_call_then_a_reply_to_its_output(dialect: Dialect) -> None:
    harness = with_tools(dialect)
    harness.events(
        {"type": "conversation.item.create", "item": user_text("Use get_weather for Paris")}
    )
    events = harness.play(harness.start())
    assert types(events) == CALL_SEQUENCE[dialect.name]
    arguments = '{"city":"simulated","unit":"celsius"}'
    assert "".join(e["delta"] for e in events if e["type"].endswith("arguments.delta")) == (
        arguments
    )
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert done["arguments"] == arguments
    assert ("name" in done) == (dialect is GA)
    [item] = events[-1]["response"]["output"]
    assert item["type"] == "function_call" and item["status"] == "completed"
    assert (item["name"], item["arguments"], item["call_id"]) == (
        "get_weather",
        arguments,
        done["call_id"],
    )
    usage = events[-1]["response"]["usage"]
    assert usage["output_token_details"]["audio_tokens"] == 0
    # The agent runs the tool and sends its output; the model answers it, speaking.
    output = {"type": "function_call_output", "call_id": done["call_id"], "output": "Sunny, 21"}
    harness.events({"type": "conversation.item.create", "item": output})
    reply = harness.play(harness.start())
    assert reply[-1]["response"]["status"] == "completed"
    [message] = reply[-1]["response"]["output"]
    assert message["type"] == "message"
    assert message["content"][0]["transcript"] == "The tool answered: Sunny, 21"


def test_a_trigger_in_the_transcript_calls_the_first_tool() -> None:
    # Audio input is "transcribed" as "Hello, this is N seconds of simulated speech."
    harness = with_tools(tool_trigger="simulated speech")
    harness.events(
        {
            "type": "session.update",
            "session": {
                **NO_VAD,
                "audio": {
                    "input": {"turn_detection": None, "transcription": {"model": "whisper-1"}}
                },
            },
        }
    )
    harness.events({"type": "input_audio_buffer.append", "audio": b64(speech(500))})
    harness.events({"type": "input_audio_buffer.commit"})
    events = harness.play(harness.start())
    assert "response.function_call_arguments.done" in types(events)


@pytest.mark.parametrize(
    ("tool_choice", "text", "calls"),
    [
        ("auto", "How are you?", False),
        ("none", "Use get_weather", False),
        ("required", "How are you?", True),
        ({"type": "function", "name": "get_weather"}, "How are you?", True),
        ("auto", "What's the get weather tool say?", True),  # "get weather" names it too
    ],
)
def test_tool_choice(tool_choice: Any, text: str, calls: bool) -> None:
    harness = with_tools(tool_choice=tool_choice)
    harness.events({"type": "conversation.item.create", "item": user_text(text)})
    events = harness.play(harness.start())
    assert ("response.function_call_arguments.done" in types(events)) == calls


def test_response_create_can_bring_its_own_tools() -> None:
    harness = Harness()
    harness.events({"type": "conversation.item.create", "item": user_text("get_weather?")})
    events = harness.play(harness.start({"tools": [WEATHER]}))
    assert "response.function_call_arguments.done" in types(events)


def test_sample_arguments_follow_the_schema() -> None:
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer"},
            "ok": {"type": "boolean"},
            "tags": {"type": "array"},
            "where": {"type": "object", "properties": {"lat": {"type": ["number", "null"]}}},
            "optional": {"type": "string"},
        },
        "required": ["n", "ok", "tags", "where"],
    }
    assert sample_value(schema) == {"n": 1, "ok": True, "tags": [], "where": {"lat": 1}}
    assert sample_value({}) == "simulated"


# -- nulls that mean "unset" --------------------------------------------------------------


@pytest.mark.parametrize(
    ("dialect", "response"),
    [
        (
            GA,
            {
                "instructions": None,
                "tool_choice": None,
                "tools": None,
                "max_output_tokens": None,
                "output_modalities": None,
                "metadata": None,
                "conversation": None,
                "input": None,
                "audio": {"output": {"voice": None, "format": None}},
            },
        ),
        (
            BETA,
            {
                "instructions": None,
                "voice": None,
                "modalities": None,
                "max_response_output_tokens": None,
                "temperature": None,
                "output_audio_format": None,
                "tools": None,
            },
        ),
    ],
)
def test_response_create_takes_nulls_as_unset(dialect: Dialect, response: dict[str, Any]) -> None:
    """LiveKit's generate_reply() sends `"instructions": null` and friends."""
    harness = Harness(dialect, reply_text="Hi.")
    events = harness.play(harness.start(response))
    done = events[-1]["response"]
    assert done["status"] == "completed"
    assert done["max_output_tokens"] == "inf"


@pytest.mark.parametrize("dialect", [GA, BETA])
def test_session_nulls_leave_fields_unset_but_turn_things_off(dialect: Dialect) -> None:
    harness = Harness(dialect)
    before = harness.engine.session
    if dialect is GA:
        update = {
            "type": "realtime",
            "instructions": None,
            "max_output_tokens": None,
            "tools": None,
            "audio": {"output": {"voice": None}, "input": {"turn_detection": None}},
        }
    else:
        update = {"instructions": None, "voice": None, "turn_detection": None, "tools": None}
    [updated] = harness.events({"type": "session.update", "session": update})
    session = updated["session"]
    assert session["instructions"] == before["instructions"]
    assert session["tools"] == []
    if dialect is GA:
        assert session["audio"]["output"]["voice"] == "alloy"
        assert session["audio"]["input"]["turn_detection"] is None  # null turns VAD off
        assert session["max_output_tokens"] == "inf"
    else:
        assert session["voice"] == "alloy" and session["turn_detection"] is None


def test_preview_greeting_announces_the_conversation() -> None:
    harness = Harness(BETA)
    created, conversation = harness.engine.greeting()
    harness.check(conversation)
    assert conversation["conversation"] == {
        "id": harness.engine.conversation.id,
        "object": "realtime.conversation",
    }
    assert [e["type"] for e in Harness(GA).engine.greeting()] == ["session.created"]
    assert orjson.loads(orjson.dumps(created))["type"] == "session.created"
