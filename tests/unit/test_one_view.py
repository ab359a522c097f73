"""The relay judges exactly the event the upstream runs (duplicate and escaped keys).

The reference below reads a frame the way the upstream's parser does: the last of duplicate
keys wins and escaped key names are decoded. Whatever the relay forwards must, read that
way, obey every rule; a frame without duplicate keys gets the reference's verdict.
"""

from __future__ import annotations

import base64
import json  # noqa: TID251 (the reference reads frames as the upstream does: last key wins)
import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.session.codec import FrameError, read_client_frame
from relay.session.policy import PolicyViolation, Rewritten, SessionPolicy, build_policy
from relay.session.schema import get_path
from tests.unit.test_policy import deployment, team

LOCKED = ("instructions", "audio.output.voice")
ALLOWED = {"audio.output.voice": ("alloy", "marin")}
CAPS = {"max_output_tokens": 1000.0}
MAX_AUDIO = 48
ALLOWED_EVENTS = (
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "session.update",
    "response.create",
)
CURRENT = {"type": "realtime", "instructions": "Be brief.", "audio": {"output": {"voice": "alloy"}}}


def the_policy(on_violation: str = "rewrite") -> SessionPolicy:
    return build_policy(
        deployment(
            locked=LOCKED,
            allowed_values=ALLOWED,
            max_values=CAPS,
            max_append_audio_bytes=MAX_AUDIO,
            allowed_events=ALLOWED_EVENTS,
            on_violation=on_violation,
        ),
        team(),
    )


def upstream_view(frame: bytes) -> Any:
    """How the upstream reads a frame: last key wins, escapes decoded; numbers as doubles, a
    frame with one past a double's range refused (None: nothing runs)."""

    def double(literal: str) -> float:
        value = float(literal)
        if math.isinf(value):
            raise ValueError(literal)
        return value

    try:
        return json.loads(frame, parse_float=double)
    except ValueError:
        return None


def has_duplicates(frame: bytes) -> bool:
    found = False

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        found = found or len({k for k, _ in pairs}) != len(pairs)
        return dict(pairs)

    json.loads(frame, object_pairs_hook=hook)
    return found


def reference_verdict(event: Any) -> bool:
    """True when the event, as the upstream reads it, obeys every rule."""
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return False
    kind = event["type"]
    if kind not in ALLOWED_EVENTS:
        return False
    if kind == "input_audio_buffer.append":
        audio = event.get("audio")
        return not isinstance(audio, str) or len(base64.b64decode(audio)) <= MAX_AUDIO
    key = {"session.update": "session", "response.create": "response"}.get(kind)
    fragment = event.get(key) if key else None
    if not isinstance(fragment, dict):
        return True

    def given(path: str) -> tuple[bool, Any]:
        present, value = get_path(fragment, path)
        # In a response, null means "unset: the session's value applies" (docs/policy.md).
        return (False, None) if key == "response" and value is None else (present, value)

    for path in LOCKED:
        present, value = given(path)
        if present and value != get_path(CURRENT, path)[1]:
            return False
    for path, allowed in ALLOWED.items():
        present, value = given(path)
        if present and value not in allowed:
            return False
    for path, cap in CAPS.items():
        present, value = given(path)
        if present and (not isinstance(value, int | float) or isinstance(value, bool)):
            return False
        if present and value > cap:
            return False
    return True


CORRECTABLE = ("session.update", "response.create")
# Correcting rule-breaking events (the default) and refusing them.
POLICIES = (the_policy(), the_policy("refuse"))


def relay_forwards(frame: bytes, policy: SessionPolicy) -> bytes | None:
    try:
        checked = policy.check_client_frame(frame, CURRENT)
    except PolicyViolation:
        return None
    return checked.frame if isinstance(checked, Rewritten) else checked


# --- raw JSON text with duplicates, escapes, whitespace and any key order ---------------


def escaped(key: str, mask: list[bool]) -> str:
    return "".join(
        f"\\u{ord(c):04x}" if i < len(mask) and mask[i] else c for i, c in enumerate(key)
    )


@st.composite
def raw_objects(draw: st.DrawFn, entries: list[tuple[str, str]]) -> str:
    """A JSON object text from (key, value text) pairs, keys maybe escaped, any spacing."""
    space = st.sampled_from(["", " ", "\n", "\t "])
    parts = []
    for key, value in draw(st.permutations(entries)):
        mask = draw(st.lists(st.booleans(), max_size=len(key)))
        parts.append(f'{draw(space)}"{escaped(key, mask)}"{draw(space)}:{draw(space)}{value}')
    return "{" + ",".join(parts) + draw(space) + "}"


def text(value: Any) -> str:
    return orjson.dumps(value).decode()


types = st.sampled_from(
    [*ALLOWED_EVENTS, "conversation.item.create", "output_audio_buffer.clear", "x.y"]
)
audio = st.integers(0, 80).map(lambda n: text(base64.b64encode(b"\0" * n).decode()))
voices = st.sampled_from(["alloy", "marin", "echo", 7]).map(text)
# A lone surrogate escape: orjson refuses it, so the frame takes the fallback parse.
instructions = st.sampled_from(["Be brief.", "Talk like a pirate.", None]).map(text) | st.just(
    '"\\ud800"'
)
tokens = st.sampled_from([10, 1000, 5000, "inf"]).map(text) | st.just("-1e400")


@st.composite
def fragments(draw: st.DrawFn) -> str:
    entries = []
    for field in draw(
        st.lists(st.sampled_from(["instructions", "tokens", "audio", "type"]), max_size=5)
    ):
        if field == "instructions":
            entries.append(("instructions", draw(instructions)))
        elif field == "tokens":
            entries.append(("max_output_tokens", draw(tokens)))
        elif field == "audio":
            voice_entries = [("voice", draw(voices)) for _ in range(draw(st.integers(0, 2)))]
            output = draw(raw_objects(voice_entries))
            entries.append(("audio", draw(raw_objects([("output", output)]))))
        else:
            entries.append(("type", '"realtime"'))
    return draw(raw_objects(entries))


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    entries = [("type", text(t)) for t in draw(st.lists(types, min_size=1, max_size=3))]
    entries += [("audio", a) for a in draw(st.lists(audio, max_size=2))]
    entries += [
        (k, draw(fragments()))
        for k in draw(st.lists(st.sampled_from(["session", "response"]), max_size=2))
    ]
    entries += [
        ("event_id", text(e))
        for e in draw(st.lists(st.sampled_from(["e1", "type", "audio"]), max_size=1))
    ]
    return draw(raw_objects(entries)).encode()


@settings(max_examples=300, deadline=None)
@given(frames())
def test_what_the_relay_forwards_obeys_every_rule_as_the_upstream_reads_it(frame: bytes) -> None:
    for policy in POLICIES:
        forwarded = relay_forwards(frame, policy)
        if forwarded is not None and (view := upstream_view(forwarded)) is not None:
            assert reference_verdict(view), (frame, forwarded)
            assert read_client_frame(forwarded)[0] == view["type"]
        # Without duplicate keys there is one reading, and a frame within the rules passes.
        if not has_duplicates(frame) and reference_verdict(upstream_view(frame)):
            assert forwarded is not None, frame
    # Correcting: an unambiguous session.update or response.create is always forwarded.
    view = upstream_view(frame)
    if not has_duplicates(frame) and view is not None and view["type"] in CORRECTABLE:
        assert relay_forwards(frame, POLICIES[0]) is not None, frame


# --- the cases the review found, by hand ------------------------------------------------


SMUGGLED = [
    b'{"type":"input_audio_buffer.append","type":"session.update","session":{"instructions":"x"}}',
    b'{"type":"input_audio_buffer.append","\\u0074ype":"session.update","session":{}}',
    b'{"type":"input_audio_buffer.commit","type":"output_audio_buffer.clear"}',
    b'{"type":"response.create","response":{},"response":{"instructions":"x"}}',
    b'{"type":"session.update","session":{"audio":{"output":{"voice":"alloy","voice":"echo"}}}}',
]


@pytest.mark.parametrize("frame", SMUGGLED)
def test_duplicate_and_aliased_keys_are_refused_naming_the_key(frame: bytes) -> None:
    with pytest.raises(PolicyViolation) as info:
        the_policy().check_client_frame(frame, CURRENT)
    assert info.value.code == "invalid_event"
    assert "more than once" in info.value.message


def test_a_second_audio_key_is_measured_as_the_upstream_reads_it() -> None:
    small, big = base64.b64encode(b"\0" * 8).decode(), base64.b64encode(b"\0" * 4800).decode()
    frame = f'{{"type":"input_audio_buffer.append","audio":"{small}","audio":"{big}"}}'.encode()
    with pytest.raises(PolicyViolation) as info:
        the_policy().check_client_frame(frame, CURRENT)
    assert info.value.code == "invalid_event"


@pytest.mark.parametrize(
    ("frame", "fast"),
    [
        (b'{"type":"input_audio_buffer.append","audio":"AAAA"}', True),
        (b'{"type": "input_audio_buffer.append", "audio": "AAAA", "event_id": "e1"}', True),
        (b'{"type":"input_audio_buffer.commit"}', True),
        # Pipecat's layout: event_id first, spaced or compact.
        (b'{"event_id": "4e1c-a", "type": "input_audio_buffer.append", "audio": "AAAA"}', True),
        (b'{"event_id":"type","type":"input_audio_buffer.append","audio":"AAAA"}', True),
        (b'{"event_id": "a\\"b", "type": "input_audio_buffer.append", "audio": "AAAA"}', False),
        (b'{"event_id": "e", "type": "input_audio_buffer.append", "audio": "AAAA", "x": 1}', False),
        # An object literal's layout: type, event_id, audio; spaced or compact.
        (b'{"type":"input_audio_buffer.append","event_id":"t1-1","audio":"AAAA"}', True),
        (b'{"type": "input_audio_buffer.append", "event_id": "audio", "audio": "AAAA"}', True),
        (b'{"type":"input_audio_buffer.append","event_id":"a\\"b","audio":"AAAA"}', False),
        (b'{"type":"input_audio_buffer.append","event_id":"e","audio":"AAAA","x":"y"}', True),
        (b'{"event_id":"e","type":"input_audio_buffer.append","audio":"AAAA","x":"y"}', False),
        # A string value that reads "type" or an escape anywhere: parsed, never guessed.
        (b'{"type":"input_audio_buffer.append","audio":"AAAA","event_id":"type"}', False),
        (b'{"type":"input_audio_buffer.append","audio":"AAAA","event_id":"a\\"b"}', False),
        (b'{"audio":"AAAA","type":"input_audio_buffer.append"}', False),
    ],
)
def test_the_fast_path_is_taken_only_when_the_bytes_prove_the_frame_unambiguous(
    frame: bytes, fast: bool
) -> None:
    kind, event, audio_bytes = read_client_frame(frame)
    assert kind in ("input_audio_buffer.append", "input_audio_buffer.commit")
    assert (event is None) == fast
    if kind == "input_audio_buffer.append":
        assert audio_bytes == 3


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b'{"session":{"x":NaN},"type":"session.update"}', "invalid_json"),
        (b'{"a":1,"type":"a",}', "invalid_json"),
        (b"[1]", "invalid_event"),
        (b'{"type":"x","type":"y"}', "invalid_event"),
        # The fixed layouts' tails, repeated: never taken for the fixed layout.
        (
            b'{"type":"input_audio_buffer.append","event_id":"e","audio":"AAAA","audio":"A"}',
            "invalid_event",
        ),
        (
            b'{"type":"input_audio_buffer.append","event_id":"e","audio":"AAAA","type":"x"}',
            "invalid_event",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
        # Past a double's range, in a frame only the fallback parse reads (the surrogate).
        (
            b'{"type":"session.update","session":{"instructions":"\\ud800",'
            b'"max_output_tokens":-1e400,"audio":{"output":{"voice":"echo"}}}}',
            "invalid_json",
        ),
    ],
)
def test_frames_the_upstream_cannot_run_are_refused(frame: bytes, code: str) -> None:
    with pytest.raises(FrameError) as info:
        read_client_frame(frame)
    assert info.value.code == code
