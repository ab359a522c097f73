"""Looking inside frames without parsing them. Pure.

Audio frames are most of the traffic and only need their type (and sometimes the length of
their base64 payload). Clients put `type` first in practice (the SDKs build the event dict
with `type` first), so a prefix check answers almost always; anything else gets an exact
parse with orjson, so the answer is never a guess.
"""

from __future__ import annotations

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


def sniff_type(frame: bytes) -> str:
    """The event's `type`; raises FrameError when the frame is not a typed JSON object."""
    for prefix, name in _HOT:
        if frame.startswith(prefix):
            return name
    for prefix in _PREFIXES:
        if frame.startswith(prefix):
            start = len(prefix)
            end = frame.find(b'"', start, start + _MAX_TYPE_LEN)
            if end > start and b"\\" not in frame[start:end]:
                return frame[start:end].decode("utf-8", "replace")
    return event_type(parse_event(frame))


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
    span = _compact_span(frame, field) or _string_span(frame, field)
    if span is None:
        value = parse_event(frame).get(field.decode())
        if not isinstance(value, str):
            return 0
        encoded = value.encode("ascii", "replace")
        span = (0, len(encoded))
        frame = encoded
    start, end = span
    if end <= start:
        return 0
    padding = (frame[end - 1] == _EQUALS) + (end - 2 >= start and frame[end - 2] == _EQUALS)
    return (end - start) * 3 // 4 - padding


_KEYS: dict[bytes, bytes] = {}


def _compact_span(frame: bytes, field: bytes) -> tuple[int, int] | None:
    """The common layouts (`"audio":"` and `"audio": "`), found with one search.

    An unescaped `"audio"` followed by `:"` cannot occur inside a JSON string: it is the key.
    """
    key = _KEYS.get(field)
    if key is None:
        key = _KEYS[field] = b'"' + field + b'"'
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
    return None if end == -1 else (start, end)


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
