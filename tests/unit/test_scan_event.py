"""`_accel.scan_event` (through `codec.read_scanned` and `read_large`) against its reference,
`codec.read_parsed` (stdlib json, duplicate keys refused in any object): the same verdict on
every frame: the type and audio size, or the same error code (and, for a duplicate key or a
missing type, the same message)."""

from __future__ import annotations

import json  # noqa: TID251 (json.dumps writes the escapes json reads, as clients do)
import random
import threading
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.session import codec
from relay.session.codec import FrameError, read_large, read_parsed, read_scanned
from tests.unit.accel_build import NOT_BUILT, not_built

try:
    from relay.session import _accel
except ImportError:
    not_built()
    pytest.skip(NOT_BUILT + "; without it large events are parsed", allow_module_level=True)


def verdict(read: Any, frame: bytes) -> tuple[Any, ...]:
    try:
        found = read(frame)
    except FrameError as exc:
        if exc.code == "invalid_json":
            return (exc.code,)  # the scan's message gives a byte, not json's line and column
        return exc.code, exc.message
    return ("ok", found[0], found[-1])


def same(frame: bytes) -> None:
    assert verdict(read_scanned, frame) == verdict(read_parsed, frame), frame[:300]


# --- frames built from pairs, so that keys can repeat; spaced and escaped at random -----------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
keys = st.sampled_from(["type", "audio", "a", "b", "é", "😀", "", "ty\npe"]) | st.text(max_size=4)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(st.tuples(keys, inner), max_size=4).map(lambda pairs: ("pairs", pairs))
    ),
    max_leaves=20,
)


def escape_some(text: str, rng: random.Random) -> str:
    """A JSON string literal for ``text``, some characters written as \\u escapes (astral
    ones as surrogate pairs), the rest as json.dumps writes them."""
    out = []
    for char in text:
        if rng.random() < 0.3:
            code = ord(char)
            if code > 0xFFFF:
                code -= 0x10000
                out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04X}")
            else:
                out.append(f"\\u{code:04x}")
        else:
            out.append(json.dumps(char, ensure_ascii=rng.random() < 0.5)[1:-1])
    return '"' + "".join(out) + '"'


def write(value: Any, rng: random.Random) -> str:
    space = rng.choice(["", " ", "\n\t "])
    if isinstance(value, tuple) and value and value[0] == "pairs":
        items = [f"{escape_some(k, rng)}{space}:{space}{write(v, rng)}" for k, v in value[1]]
        return "{" + space + f",{space}".join(items) + space + "}"
    if isinstance(value, list):
        return "[" + f",{space}".join(write(v, rng) for v in value) + "]"
    if isinstance(value, str):
        return escape_some(value, rng)
    return json.dumps(value)


events = st.tuples(
    st.sampled_from(["input_audio_buffer.append", "conversation.item.create", "", 5]),
    st.text(alphabet="AB+/=é\\", max_size=12),
    st.lists(st.tuples(keys, values), max_size=5),
    st.randoms(use_true_random=False),
)


@settings(max_examples=1500, deadline=None)
@given(events)
def test_events_get_the_same_verdict(event):
    kind, audio, pairs, rng = event
    fields = [("type", kind), ("audio", audio), *pairs]
    rng.shuffle(fields)
    frame = write(("pairs", fields), rng).encode()
    same(frame)
    # A byte changed, inserted or dropped: mostly invalid, sometimes not.
    data = bytearray(frame)
    at = rng.randrange(len(data))
    choice = rng.choice(b'{}[]:,"\\ -0e.E+u1nNtfx')
    how = rng.random()
    if how < 0.4:
        data[at] = choice
    elif how < 0.7:
        data.insert(at, choice)
    else:
        del data[at]
    try:
        bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        return  # the relay refuses invalid UTF-8 before judging (1007)
    same(bytes(data))


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet='{}[]:,"\\ \t\n-0123456789.eE+truefalsnlNIaIyup\x01é😀', max_size=60))
@example('{"type":"x","n":1' + "0" * 4300 + "}")
@example('{"type":"x","n":-1' + "0" * 4300 + "}")
@example('{"type":"x","n":1' + "0" * 4299 + "}")
@example('{"type":"x","n":1' + "0" * 5000 + ".5}")
@example('{"type":"x","s":"\\ud83d"}')
@example('{"type":"x","s":"\\ud83d\\u0041"}')
@example('{"type":"x","s":"\\ud83d\\uzzzz"}')
@example('{"\\ud83d\\ude00":1,"😀":2,"type":"x"}')
@example('{"type":"x","\\u0074ype":"y"}')
@example('{"a":{"b":1,"b":2}} junk')
@example('{"type":"x","a":[{"b":1,"b":2}, }')
@example('\ufeff{"type":"x"}')
@example('{"type":"x","n":NaN}')
@example('{"type":"x","n":-Infinity}')
@example('{"type":"x","n":1e999}')
@example('{"type":"\\u0000"}')
@example('{"type":"x","a":"tab\there"}')
def test_any_text_gets_the_same_verdict(text):
    same(text.encode())


def test_appends_are_measured_alike():
    for audio in ("AAAA", "AAA=", "AA==", "A\\u0041AA", "é==", ""):
        frame = f'{{"audio":"{audio}","type":"input_audio_buffer.append","x":1}}'.encode()
        same(frame)


def test_nesting_past_the_scans_depth_is_refused():
    deep = b'{"type":"x","a":' + b"[" * 600 + b"]" * 600 + b"}"
    with pytest.raises(FrameError) as info:
        read_scanned(deep)
    assert (info.value.code, info.value.message) == (
        "invalid_json",
        "The event nests more than 512 deep.",
    )
    assert read_scanned(b'{"type":"x","a":' + b"[" * 510 + b"]" * 510 + b"}") == ("x", 0)


def test_the_event_is_parsed_only_for_the_types_the_policy_reads():
    frame = b'{"type":"session.update","session":{"n":' + b"9" * 30 + b',"s":"\\ud83d"}}'
    assert read_large(frame, lambda kind: False) == ("session.update", None, 0)
    kind, event, _ = read_large(frame, lambda kind: kind == "session.update")
    assert event == read_parsed(frame)[1]  # past orjson's integers: json's dict


def test_an_event_that_must_be_parsed_holds_a_bounded_number_of_values():
    """Parsing holds the event loop (orjson holds the GIL): a large event the policy or a
    translation reads is refused past MAX_PARSED_VALUES, judged by the scan's count; one
    nobody reads passes whatever it holds."""
    from relay.session.codec import MAX_PARSED_VALUES, _scan

    n = MAX_PARSED_VALUES // 3 + 1  # three values a part: the object and its two strings
    parts = b'{"type":"input_text","text":"a"},' * n
    frame = b'{"type":"conversation.item.create","item":{"content":[' + parts + b"1]}}"
    kind, _, values = _scan(frame)
    assert values == 4 + 3 * n + 1 > MAX_PARSED_VALUES  # event, type, item, content; the 1
    assert read_large(frame, lambda kind: False)[1] is None
    with pytest.raises(FrameError) as info:
        read_large(frame, lambda kind: True)
    assert info.value.code == "event_too_complex"
    fewer = frame.replace(parts, parts[: len(parts) // 2])
    assert read_large(fewer, lambda kind: True)[1]["type"] == kind


def test_the_scan_lets_other_threads_run():
    """It releases the GIL: another thread counts meanwhile."""
    frame = b'{"type":"conversation.item.create","pad":[' + b'{"a":1},' * 2_000_000 + b"1]}"
    counted = 0
    done = threading.Event()

    def count() -> None:
        nonlocal counted
        while not done.is_set():
            counted += 1

    counter = threading.Thread(target=count)
    counter.start()
    try:
        before = counted
        assert read_scanned(frame) == ("conversation.item.create", 0)
        during = counted - before
    finally:
        done.set()
        counter.join()
    assert during > 1000


utf8_pieces = st.sampled_from(
    [b"a", b"\xc3\xa9", b"\xe4\xbd\xa0", b"\xf0\x9f\x98\x80", b"\xc0\x80", b"\xe0\x80\x80",
     b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xf5", b"\x80", b"\xc3", b"\xff", b"abcdefgh"]
)  # fmt: skip


@settings(max_examples=2000, deadline=None)
@given(st.lists(utf8_pieces, max_size=40) | st.binary(max_size=64).map(lambda b: [b]))
def test_utf8_is_checked_as_python_decodes(pieces):
    data = b"".join(pieces)
    assert _accel.is_utf8(data) == codec._is_utf8(data), data


def test_a_mid_size_frame_that_would_be_parsed_is_judged_off_the_loop():
    """Past SCANNED_EVENT_BYTES, a frame its bytes cannot judge (a backslash) or one the
    policy reads goes to the scan in a thread: 200 frames of `{}` just under 256 KiB, each
    parsed strictly on the loop (about 15 ms), held every session 1.2 s. Audio appends and
    small events stay on the loop."""
    from types import SimpleNamespace

    from relay.session.pump import SCANNED_EVENT_BYTES, Bridge

    def off(frame: bytes, reads: tuple[str, ...] = ()) -> bool:
        stub = SimpleNamespace(_parses=lambda kind: kind in reads)
        return Bridge._off_the_loop(stub, frame)  # type: ignore[arg-type]

    pad = b"{}," * (SCANNED_EVENT_BYTES // 3)
    escaped = b'{"type":"conversation.item.create","a":"\\n","pad":[' + pad + b"1]}"
    plain = b'{"type":"conversation.item.create","pad":[' + pad + b"1]}"
    append = b'{"type":"input_audio_buffer.append","audio":"' + b"A" * 200_000 + b'"}'
    assert off(escaped) and not off(escaped[: SCANNED_EVENT_BYTES // 2])
    assert not off(plain) and off(plain, reads=("conversation.item.create",))
    assert not off(append)
    assert off(append + b" " * 256 * 1024)  # large: always


def test_a_small_frame_its_bytes_cannot_judge_is_scanned_and_parsed_only_if_read():
    """An escape anywhere sends a frame to the full judgement: stdlib json with a
    duplicate-key hook took 0.8 ms for 16 KB of tiny values (four clients at the event
    rate held the loop for seconds). It is now the scan's verdict, and a parse only where
    the policy reads the event."""
    from relay.session.codec import read_client_frame

    frame = b'{"type":"conversation.item.create","\\u0061":[' + b"{}," * 3000 + b"1]}"
    assert read_client_frame(frame, lambda kind: False) == ("conversation.item.create", None, 0)
    kind, event, _ = read_client_frame(frame, lambda kind: True)
    assert kind == "conversation.item.create" and event is not None and len(event["a"]) == 3001
    assert read_client_frame(frame)[1] == event  # parsed when no one says otherwise
    twice = b'{"type":"x","\\u0061":1,"a":2}'
    with pytest.raises(FrameError) as info:
        read_client_frame(twice, lambda kind: False)
    assert info.value.code == "invalid_event"  # a key twice: refused, parsed or not
