"""Looking inside frames without parsing them. Pure.

Audio frames are most of the traffic and only need their type (and sometimes the length of
their base64 payload). Clients put `type` first in practice (the SDKs build the event dict
with `type` first), so a prefix check answers almost always; anything else gets an exact
parse, so the answer is never a guess.

Client frames are judged the way the upstream will run them (`read_client_frame`). The
upstream's JSON parser keeps the *last* of duplicate keys and decodes escaped key names, so
a prefix sniff is only trusted when a byte scan proves the frame unambiguous: no backslash
anywhere (so no escaped key and no quote inside a string) and exactly one `"type"` (and, for
an append, one `"audio"`). Every other client frame is parsed, refusing duplicate keys at
every level, so the event the relay judged is the event the upstream runs. A large one is
judged by `_accel.scan_event` instead (`read_large`, for a thread): the same verdict,
without building the event and without the GIL.
"""

from __future__ import annotations

import json  # noqa: TID251 (orjson cannot report duplicate keys; used only off the fast path)
import math
import sys
from collections.abc import Callable
from typing import Any

import orjson

_PREFIXES = (b'{"type":"', b'{"type": "')
_EQUALS = ord("=")
# The two types that are most of the traffic, answered by one comparison each.
_HOT = tuple(
    (prefix + name.encode() + b'"', name)
    for name in ("input_audio_buffer.append", "response.output_audio.delta")
    for prefix in _PREFIXES
)
# Longest event type name is under 64 bytes; a prefix longer than this is not a type.
_MAX_TYPE_LEN = 96


class FrameError(ValueError):
    """The frame is not a JSON object with a string `type`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_DELTA = "response.output_audio.delta"
_DELTA_PREFIX = b'{"type":"' + _DELTA.encode() + b'"'


def sniff_type(frame: bytes) -> str:
    """The event's `type`, for frames from the upstream (trusted to send each key once);
    raises FrameError when the frame is not a typed JSON object."""
    if frame.startswith(_DELTA_PREFIX):  # Azure's audio deltas: most of what it sends
        return _DELTA
    kind = _sniff_prefix(frame)
    return kind if kind is not None else event_type(parse_event(frame))


# A client frame as the upstream will read it: its type, the parsed event when judging it
# needed a parse (None on the fast path), and an append's decoded audio bytes (else 0).
# A plain tuple: one is built for every frame.
ClientFrame = tuple[str, dict[str, Any] | None, int]


_APPEND = "input_audio_buffer.append"
_TYPE_KEY = b'"type"'
_CANONICAL_APPENDS = (
    b'{"type":"input_audio_buffer.append","audio":"',
    b'{"type": "input_audio_buffer.append", "audio": "',
)
_AUDIO_KEY = b'"audio"'
# Appends with an `event_id`, in the two orders clients build them, spaced as json.dumps or
# compact: {"event_id", "type", "audio"} (pydantic models with an `event_id` base field, as
# Pipecat's) and {"type", "event_id", "audio"} (object literals; the bench's load generator).
# Each is a head, the event id's value, then a fixed middle up to the audio's value.
_ID_APPENDS = (
    (b'{"event_id": "', b'", "type": "input_audio_buffer.append", "audio": "'),
    (b'{"event_id":"', b'","type":"input_audio_buffer.append","audio":"'),
    (b'{"type":"input_audio_buffer.append","event_id":"', b'","audio":"'),
    (b'{"type": "input_audio_buffer.append", "event_id": "', b'", "audio": "'),
)


def read_client_frame(frame: bytes, parses: Callable[[str], bool] | None = None) -> ClientFrame:
    """The type (and an append's audio size) the upstream will see; FrameError otherwise.
    A frame its bytes cannot judge is judged by `_accel.scan_event` (the strict parse's
    verdict at a tenth of its cost: stdlib json with a duplicate-key hook took 0.8 ms for
    16 KB of tiny values, a fifth of the loop for one client at 250 events a second) and
    parsed (orjson) only where ``parses(kind)``, or always without ``parses``."""
    unparsed = read_unparsed(frame)
    if unparsed is not None:
        return unparsed[0], None, unparsed[1]
    if scan_event is None:  # pragma: no cover (built here)
        return read_parsed(frame)
    kind, audio, _ = _scan(frame)
    if parses is not None and not parses(kind):
        return kind, None, audio
    return kind, _load_scanned(frame), audio


def _load_scanned(frame: bytes) -> dict[str, Any]:
    """A frame the scan found valid and without a key twice, as a dict: orjson's; json's
    where orjson refuses what json takes (a lone surrogate escape)."""
    try:
        event = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return parse_event_strict(frame)
    assert isinstance(event, dict)
    return event


def read_unparsed(frame: bytes) -> tuple[str, int] | None:
    """`read_client_frame`'s answer where the bytes give it without a parse: the type and
    an append's audio size; else None."""
    audio = fixed_append_size(frame)
    if audio >= 0:
        return _APPEND, audio
    kind = _sniff_prefix(frame)
    # No backslash: no escaped key, and every quote delimits a string, so a key name is
    # found exactly where its bytes are. The prefix put one `"type"` at index 1.
    if kind is not None and frame.find(b"\\") == -1:
        if kind != _APPEND:
            if frame.find(_TYPE_KEY, 2) == -1:
                return kind, 0
        else:
            found = _key_span(frame, _AUDIO_KEY)
            # The base64 between start and end holds no quote, so no key: only the bytes
            # around it need searching for a second `"type"` or `"audio"`.
            if found is not None:
                at, start, end = found
                if (
                    frame.find(_TYPE_KEY, 2, at) == -1
                    and frame.find(_TYPE_KEY, end) == -1
                    and frame.find(_AUDIO_KEY, end) == -1
                ):
                    return kind, _span_size(frame, start, end)
    return None


# Nesting the scan follows; a deeper event is refused (stdlib json gives up near 1,000).
SCAN_MAX_DEPTH = 512
# A large event that must be parsed (the policy reads it, or it is translated) holds at most
# this many values: its parse, which holds the event loop, stays near 10 ms. Real events
# hold hundreds (a session with tools); a crafted 30 MiB one, millions (1.2 s held).
MAX_PARSED_VALUES = 100_000


def read_large(frame: bytes, parses: Callable[[str], bool]) -> ClientFrame:
    """`read_client_frame` for a large frame, for a thread, UTF-8 checked first (FrameError
    `invalid_utf8`: the relay closes with 1007). Its prefix answers where it can; else it is
    judged by `_accel.scan_event` (as `parse_event_strict` judges it); both without the GIL,
    so the event loop goes on meanwhile. The event is parsed only where ``parses(kind)``
    (the policy reads it). Where `_accel` was not built, `read_parsed`."""
    if not frame.isascii() and not is_utf8(frame):
        raise FrameError("invalid_utf8", "invalid UTF-8 in a text frame")
    unparsed = read_unparsed(frame)
    if unparsed is not None and not parses(unparsed[0]):
        return unparsed[0], None, unparsed[1]
    if scan_event is None:  # pragma: no cover (built here)
        return read_parsed(frame)
    kind, audio, values = _scan(frame)
    if not parses(kind):
        return kind, None, audio
    if values > MAX_PARSED_VALUES:
        raise FrameError(
            "event_too_complex",
            f"The event holds {values:,} JSON values; the relay reads at most "
            f"{MAX_PARSED_VALUES:,} in an event its rules (or a translation) must read. "
            "Send fewer, larger values.",
        )
    return kind, _load_scanned(frame), audio


def read_scanned(frame: bytes) -> tuple[str, int]:
    """The type and an append's audio size, by `_accel.scan_event`; FrameError as
    `read_parsed` would raise it (its messages say less: no line and column)."""
    kind, audio, _ = _scan(frame)
    return kind, audio


def _scan(frame: bytes) -> tuple[str, int, int]:
    """`read_scanned`'s answer, and how many JSON values the event holds."""
    assert scan_event is not None
    status, *found = scan_event(frame, sys.get_int_max_str_digits())
    if status == _SCAN_INVALID:
        raise FrameError("invalid_json", f"The event is not valid JSON (at byte {found[0]}).")
    if status == _SCAN_DUPLICATE:
        raise FrameError(
            "invalid_event",
            f"The event has the key {found[0]!r} more than once in one object; send each key once.",
        )
    if status == _SCAN_DEEP:
        raise FrameError("invalid_json", f"The event nests more than {SCAN_MAX_DEPTH} deep.")
    if status == _SCAN_NOT_OBJECT:
        raise FrameError("invalid_event", "An event must be a JSON object.")
    type_start, type_end, audio_start, audio_end, values = found
    kind = _string_value(frame[type_start:type_end]) if type_start >= 0 else None
    if not kind:
        raise FrameError("missing_event_type", "The event has no string `type` field.")
    if kind != _APPEND or audio_start < 0:
        return kind, 0, values
    audio = frame[audio_start + 1 : audio_end - 1]
    if audio.isascii() and b"\\" not in audio:
        return kind, _span_size(audio, 0, len(audio)), values
    return kind, _decoded_size(_string_value(frame[audio_start:audio_end])), values


def _string_value(literal: bytes) -> str:
    """A JSON string literal the scan found valid, as json reads it (a lone surrogate
    escape included, which orjson refuses)."""
    value = json.loads(literal)
    assert isinstance(value, str)
    return value


_SCAN_NOT_OBJECT, _SCAN_DUPLICATE, _SCAN_INVALID, _SCAN_DEEP = 2, 3, 4, 5


def _is_utf8(data: bytes) -> bool:
    """The reference for `_accel.is_utf8`."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_parsed(frame: bytes) -> ClientFrame:
    """`read_client_frame` by a strict parse."""
    event = parse_event_strict(frame)
    kind = event_type(event)
    audio_value = event.get("audio") if kind == _APPEND else None
    return kind, event, _decoded_size(audio_value) if isinstance(audio_value, str) else 0


def _fixed_append_size(frame: bytes) -> int:
    """An append's decoded audio bytes when the frame has one of the fixed layouts, else -1:
    `{"type", "audio"}` and nothing else (what the SDKs send), or three different keys in an
    `_ID_APPENDS` layout, whose event id's value ends at the first quote after its head. In
    both the audio is the last value and the frame has no backslash (no escape: every quote
    delimits a string), so there is nothing to search. The reference for `_accel`'s."""
    for head in _CANONICAL_APPENDS:
        if frame.startswith(head):
            return _audio_to_the_end(frame, len(head))
    for head, middle in _ID_APPENDS:
        if frame.startswith(head):
            id_end = frame.find(b'"', len(head))
            if id_end != -1 and frame.startswith(middle, id_end):
                return _audio_to_the_end(frame, id_end + len(middle))
            return -1
    return -1


def _audio_to_the_end(frame: bytes, start: int) -> int:
    """The decoded size of an append's audio string that starts at ``start`` and is the
    frame's last value (`..."}`), in a frame without a backslash; else -1."""
    end = len(frame) - 2
    if frame.find(b'"', start) == end and frame.endswith(b'"}') and frame.find(b"\\") == -1:
        return _span_size(frame, start, end)
    return -1


def _key_span(frame: bytes, key: bytes) -> tuple[int, int, int] | None:
    """Where the first ``key`` (quoted) is and its string value lies, in the compact layouts
    (`"audio":"` and `"audio": "`). An unescaped `"audio"` followed by `:"` cannot occur
    inside a JSON string: it is the key."""
    at = frame.find(key)
    if at == -1:
        return None
    start = at + len(key)
    if frame.startswith(b':"', start):
        start += 2
    elif frame.startswith(b': "', start):
        start += 3
    else:
        return None
    end = frame.find(b'"', start)
    return None if end == -1 else (at, start, end)


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite(literal: str) -> float:
    """A number as a double, as the service reads it: one past a double's range (1e400) is
    refused there (orjson too). json would read it as infinity, which is written back as
    null: the upstream would run a different event from the one the relay judged."""
    value = float(literal)
    if value in (math.inf, -math.inf):
        raise ValueError(f"the number {literal[:40]} is infinity when parsed as a double")
    return value


def _integer(literal: str) -> int | float:
    """An integer as orjson (and so the service) reads it: past 64 bits, as a double."""
    if len(literal) <= 20:
        value = int(literal)
        if -(2**63) <= value < 2**64:
            return value
    return _finite(literal)


def parse_event_strict(frame: bytes) -> dict[str, Any]:
    """Parse a client event, refusing a key that appears twice in any object.

    Keys are compared after unescaping, so `"\\u0074ype"` is a second `"type"`: the two
    would be read differently by a parser that keeps the first and one that keeps the last.
    """
    try:
        event = json.loads(
            frame.decode("utf-8"),
            object_pairs_hook=_unique_keys,
            parse_constant=_no_constant,
            parse_float=_finite,
            parse_int=_integer,
        )
    except _DuplicateKey as exc:
        raise FrameError(
            "invalid_event",
            f"The event has the key {exc.key!r} more than once in one object; send each key once.",
        ) from exc
    except (ValueError, RecursionError) as exc:
        raise FrameError("invalid_json", f"The event is not valid JSON: {exc}.") from exc
    if not isinstance(event, dict):
        raise FrameError("invalid_event", "An event must be a JSON object.")
    event_type(event)
    return event


def _sniff_prefix(frame: bytes) -> str | None:
    for prefix, name in _HOT:
        if frame.startswith(prefix):
            return name
    for prefix in _PREFIXES:
        if frame.startswith(prefix):
            start = len(prefix)
            end = frame.find(b'"', start, start + _MAX_TYPE_LEN)
            if end > start and b"\\" not in frame[start:end]:
                return frame[start:end].decode("utf-8", "replace")
    return None


def _decoded_size(encoded: str) -> int:
    data = encoded.encode("ascii", "replace")
    return _span_size(data, 0, len(data))


def load_json(frame: bytes) -> Any:
    """JSON as orjson reads it (an integer past 64 bits as the nearest float); what only json
    takes (a lone surrogate escape, nesting orjson refuses) as json reads it. ValueError when
    neither can."""
    try:
        return orjson.loads(frame)
    except orjson.JSONDecodeError:
        return json.loads(
            frame, parse_constant=_no_constant, parse_float=_finite, parse_int=_integer
        )


def dump_json(value: Any) -> bytes:
    """``value`` as orjson writes it; what orjson cannot write (integers past 64 bits, lone
    surrogates, nesting past 254) as json does, ASCII-escaped. A client's event the strict
    parse accepted is always written back; FrameError `invalid_event` only for one past
    Python's recursion limit."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        try:
            return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
        except (ValueError, RecursionError) as exc:
            raise FrameError(
                "invalid_event", "The event is nested too deeply to be forwarded."
            ) from exc


def load_event(frame: bytes) -> dict[str, Any]:
    """A client event the relay passed unparsed, parsed now to change it (a translation):
    by orjson where it can, else strictly; FrameError where it is not a JSON object."""
    try:
        event = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return parse_event_strict(frame)
    if not isinstance(event, dict):
        raise FrameError("invalid_event", "An event must be a JSON object.")
    return event


def parse_event(frame: bytes) -> dict[str, Any]:
    try:
        event = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise FrameError("invalid_json", f"The event is not valid JSON: {exc.msg}.") from exc
    if not isinstance(event, dict):
        raise FrameError("invalid_event", "An event must be a JSON object.")
    event_type(event)
    return event


def event_type(event: dict[str, Any]) -> str:
    kind = event.get("type")
    if not isinstance(kind, str) or not kind:
        raise FrameError("missing_event_type", "The event has no string `type` field.")
    return kind


def base64_size(frame: bytes, field: bytes) -> int:
    """Decoded bytes in the base64 string value of ``field`` (e.g. b"audio"), never decoding.

    Scans for the field; parses only when the scan can't tell. 0 when absent or not a string.
    """
    key = _KEYS.get(field)
    if key is None:
        key = _KEYS[field] = b'"' + field + b'"'
    found = _key_span(frame, key)  # the common layouts, found with one search
    if found is not None:
        return _span_size(frame, found[1], found[2])
    span = _string_span(frame, field)
    if span is None:
        value = parse_event(frame).get(field.decode())
        return _decoded_size(value) if isinstance(value, str) else 0
    return _span_size(frame, *span)


_DELTA_KEY = b'"delta":"'


def delta_size(frame: bytes) -> int:
    """Decoded bytes of an upstream audio delta's `delta` (base64), never decoding."""
    size = delta_to_the_end(frame)
    return size if size >= 0 else base64_size(frame, b"delta")


def _delta_to_the_end(frame: bytes) -> int:
    """Azure puts a delta's audio last (`..."delta":"<base64>"}`): its size from the key's
    first place (an unescaped `"delta":"` is a key; the upstream sends each once) when the
    value runs to the frame's end, else -1 (`base64_size` measures any other layout). The
    reference for `_accel`'s."""
    at = frame.find(_DELTA_KEY)
    if at != -1:
        start = at + len(_DELTA_KEY)
        end = len(frame) - 2
        if frame.find(b'"', start) == end and frame.endswith(b'"}'):
            return _span_size(frame, start, end)
    return -1


def _span_size(data: bytes, start: int, end: int) -> int:
    if end <= start:
        return 0
    padding = (data[end - 1] == _EQUALS) + (end - 2 >= start and data[end - 2] == _EQUALS)
    size = (end - start) * 3 // 4 - padding
    return size if size > 0 else 0  # "=" alone is not -1 bytes


# A field's quoted key, built once per field name.
_KEYS: dict[bytes, bytes] = {}


def _string_span(frame: bytes, field: bytes) -> tuple[int, int] | None:
    """Where the string value of a top-level ``field`` lies, found by scan.

    Base64 holds no quotes or escapes, so the value ends at the next quote. Returns None
    when the field is not found where expected; callers then parse.
    """
    key = b'"' + field + b'"'
    at = frame.find(key)
    while at != -1:
        colon = at + len(key)
        while frame[colon : colon + 1] == b" ":
            colon += 1
        if frame[colon : colon + 1] == b":":
            start = frame.find(b'"', colon + 1)
            if start == -1 or frame[colon + 1 : start].strip() != b"":
                return None
            end = frame.find(b'"', start + 1)
            return None if end == -1 else (start + 1, end)
        at = frame.find(key, at + 1)
    return None


# The two scans every audio frame takes, in C (relay/session/_accel.c) where it was built: one
# call instead of ten to fifteen. The Python versions above are the reference its tests hold
# it to (tests/unit/test_accel.py), and what runs where no C compiler was at install.
try:
    from relay.session._accel import delta_to_the_end as delta_to_the_end
    from relay.session._accel import fixed_append_size as fixed_append_size
    from relay.session._accel import is_utf8 as is_utf8
    from relay.session._accel import scan_event as _scan_event

    scan_event: Callable[[bytes, int], tuple[Any, ...]] | None = _scan_event
except ImportError:  # pragma: no cover
    fixed_append_size, delta_to_the_end = _fixed_append_size, _delta_to_the_end
    scan_event = None
    is_utf8 = _is_utf8
