"""Odd input never breaks the engine: every reply is a valid server event."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay.simulator.engine import Engine, StartResponse
from relay.simulator.ids import IdFactory
from relay.simulator.options import SimulatorOptions
from relay.simulator.schema import BETA, CLIENT_EVENTS, GA
from tests.simulator import sdk_types

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "session",
    "audio",
    "item",
    "item_id",
    "previous_item_id",
    "content_index",
    "audio_end_ms",
    "response",
    "response_id",
    "event_id",
]
client_events = st.builds(
    lambda kind, fields: {"type": kind, **fields},
    st.sampled_from([*CLIENT_EVENTS, "transcription_session.update", "bogus"]),
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=3),
)


def near(known: list[Any]) -> st.SearchStrategy[Any]:
    """Mostly plausible values, sometimes anything."""
    return st.one_of(st.sampled_from(known), json_values)


content_parts = st.fixed_dictionaries(
    {"type": near(["input_text", "input_audio", "output_text", "output_audio", "text", "audio"])},
    optional={"text": near(["hi"]), "transcript": near(["said"]), "audio": near(["AAAA", "AAA="])},
)
items = st.fixed_dictionaries(
    {"type": near(["message", "function_call", "function_call_output"])},
    optional={
        "role": near(["user", "assistant", "system"]),
        "content": st.lists(content_parts, max_size=2),
        "id": near(["item_a", "item_b"]),
        "name": near(["f"]),
        "arguments": near(["{}"]),
        "call_id": near(["c"]),
        "output": near(["o"]),
    },
)
turn_detection = st.none() | st.fixed_dictionaries(
    {"type": near(["server_vad", "semantic_vad"])},
    optional={
        "threshold": near([0.1, 0.9]),
        "silence_duration_ms": near([0, 200]),
        "create_response": near([False]),
        "eagerness": near(["high"]),
    },
)
ga_sessions = st.fixed_dictionaries(
    {"type": near(["realtime"])},
    optional={
        "output_modalities": near([["text"], ["audio"]]),
        "max_output_tokens": near([1, 5, "inf"]),
        "instructions": near(["be brief"]),
        "audio": st.fixed_dictionaries(
            {},
            optional={
                "input": st.fixed_dictionaries(
                    {},
                    optional={
                        "turn_detection": turn_detection,
                        "transcription": near(
                            [None, {"model": "whisper-1"}, {"model": "gpt-4o-transcribe"}]
                        ),
                        "format": near(
                            [{"type": "audio/pcmu"}, {"type": "audio/pcm", "rate": 24000}]
                        ),
                    },
                ),
                "output": st.fixed_dictionaries(
                    {}, optional={"voice": near(["echo", {"id": "v"}]), "speed": near([1.5])}
                ),
            },
        ),
    },
)
beta_sessions = st.fixed_dictionaries(
    {},
    optional={
        "modalities": near([["text"], ["text", "audio"]]),
        "voice": near(["echo"]),
        "turn_detection": turn_detection,
        "input_audio_format": near(["g711_ulaw", "pcm16"]),
        "input_audio_transcription": near([None, {"model": "whisper-1"}]),
        "max_response_output_tokens": near([3, "inf"]),
    },
)
responses = st.fixed_dictionaries(
    {},
    optional={
        "output_modalities": near([["text"]]),
        "modalities": near([["text"]]),
        "conversation": near(["none", "auto"]),
        "input": st.lists(
            items
            | st.fixed_dictionaries({"type": st.just("item_reference"), "id": near(["item_a"])}),
            max_size=2,
        ),
        "metadata": near([{"k": "v"}]),
        "max_output_tokens": near([2, "inf"]),
    },
)
structured = st.one_of(
    st.builds(lambda s: {"type": "session.update", "session": s}, ga_sessions | beta_sessions),
    st.builds(
        lambda i, p: {"type": "conversation.item.create", "item": i, **p},
        items,
        st.fixed_dictionaries({}, optional={"previous_item_id": near(["root", "item_a"])}),
    ),
    st.builds(lambda r: {"type": "response.create", "response": r}, responses),
    st.builds(
        lambda a: {"type": "input_audio_buffer.append", "audio": a},
        st.sampled_from(["AAAA" * 2000, "f39/" * 3000, ""]),
    ),
    st.sampled_from(
        [
            {"type": "input_audio_buffer.commit"},
            {"type": "response.cancel"},
            {"type": "input_audio_buffer.clear"},
        ]
    ),
    st.builds(
        lambda k, i, c, e: {"type": k, "item_id": i, "content_index": c, "audio_end_ms": e},
        st.just("conversation.item.truncate"),
        near(["item_a"]),
        near([0, 1]),
        near([0, 100]),
    ),
    st.builds(
        lambda k, i: {"type": k, "item_id": i},
        st.sampled_from(["conversation.item.retrieve", "conversation.item.delete"]),
        near(["item_a", "item_b"]),
    ),
)
frames = st.one_of(
    structured.map(orjson.dumps),
    client_events.map(orjson.dumps),
    json_values.map(orjson.dumps),
    st.binary(max_size=30),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dialect=st.sampled_from([GA, BETA]), sequence=st.lists(frames, min_size=1, max_size=8))
# Found by this test: unsortable modalities crashed, unknown nested keys were echoed.
@example(dialect=BETA, sequence=[b'{"type":"session.update","session":{"modalities":[null,null]}}'])
@example(
    dialect=BETA,
    sequence=[b'{"type":"session.update","session":{"input_audio_transcription":{"":null}}}'],
)
def test_any_frames_give_valid_events(dialect: Any, sequence: list[bytes]) -> None:
    engine = Engine(
        dialect,
        model="gpt-realtime",
        options=SimulatorOptions(reply_text="ok"),
        ids=IdFactory(),
        now=0,
    )
    for frame in sequence:
        for action in engine.receive_text(frame):
            if isinstance(action, StartResponse):
                for step in action.run.steps():
                    if isinstance(step, dict):
                        sdk_types.check(dialect.name, orjson.dumps(step))
            elif isinstance(action, dict):
                sdk_types.check(dialect.name, orjson.dumps(action))
            else:
                for event in action.run.finish("cancelled", action.reason):
                    sdk_types.check(dialect.name, orjson.dumps(event))
