"""Audio replay's memory: the user's own audio of each user item (`replay = "audio"`). Pure.

Theory of operation. The upstream never says which bytes a user item holds, only which
item a commit became. So the keeper follows the input audio buffer as the upstream does:
- Client side (the pump's hook, after each forward): an append's audio is kept as a
  reference to the frame it arrived in and the base64 span inside it: no decode, no copy
  on the audio path. Each is placed on a session-wide position (decoded bytes appended so
  far to this upstream session). A commit or clear is noted at the position it came at.
- Upstream side (continuity's tracked events): `input_audio_buffer.committed` names the item
  the buffer became. Its audio ends where server VAD said speech stopped (`speech_stopped`,
  or `timeout_triggered`), else at the client's commit it answers; it starts where VAD said
  speech started (`audio_start_ms` includes the prefix padding), else where the buffer
  began. VAD's milliseconds count all audio written during the session, like the keeper's
  positions. `input_audio_buffer.cleared` (the answer to a clear) drops what came before
  its clear; an `input_audio_buffer_commit_empty` error answers a commit that took nothing.
- A new upstream session starts its own buffer (and VAD clock) at zero: `new_session`.

Rules:
1. Bounded: at most ``max_seconds`` of audio are held (items and pending buffer), and at
   most twice its decoded size in memory (what the chunks hold, each with its overhead: a
   client's tiny or padded appends cannot make seconds cost more); the oldest item's audio
   is dropped first. An item whose audio was dropped, or was partly shed before it was
   committed, has no audio here and is replayed as its transcript.
2. With server VAD on, between utterances only the last few seconds are held (speech is
   reported after it started: the margin covers the report's delay and prefix padding).
3. Base64 is joined only to replay (`audio_of`): as it came where chunks hold whole 3-byte
   groups (24 kHz PCM16 in whole milliseconds always does), decoded and re-encoded only
   where a chunk was padded or cut; all of it is checked, so a chunk the upstream would
   have refused makes the item fall back to its transcript instead of failing the replay.
"""

from __future__ import annotations

import binascii
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from relay.session.codec import parse_event
from relay.session.schema import audio_bytes_per_second

_PCM16_BYTES_PER_SECOND = 48000
# Between utterances under server VAD, audio older than this cannot start a turn.
IDLE_KEEP_SECONDS = 5.0
# Speech spans announced but never committed (a clear) are forgotten past this many; so
# are commits and clears never answered.
_MAX_SPANS = 16
_MAX_ASKED = 64
_APPEND_HEADS = (
    b'{"type":"input_audio_buffer.append","audio":"',
    b'{"type": "input_audio_buffer.append", "audio": "',
)
_AUDIO_KEYS = (b'"audio":"', b'"audio": "')
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# A frame is kept whole (no copy) when it holds at most this much beside its base64;
# otherwise its base64 alone is copied out (padding and long ids are not held).
_FRAME_SLACK = 256
# What keeping a chunk costs beyond its bytes: the bytes object, its tuple, a deque slot.
_CHUNK_OVERHEAD = 200


# One append's audio: (frame, start, end, at, size): ``frame[start:end]`` is its base64, of
# ``size`` decoded bytes from session-wide position ``at``. A plain tuple: one per append.
Chunk = tuple[bytes, int, int, int, int]


# A part of a chunk: (chunk, first decoded byte, end decoded byte).
Piece = tuple[Chunk, int, int]


@dataclass(slots=True)
class KeptAudio:
    pieces: list[Piece]
    size: int
    held: int  # memory: its chunks' bytes and overhead


@dataclass(slots=True)
class _Span:
    """What server VAD reported of one item's audio, in milliseconds."""

    start_ms: int | None = None
    end_ms: int | None = None


@dataclass(slots=True)
class AudioKeeper:
    """The user audio of one client session's items, and the input buffer it comes from."""

    # Rule 1's bound, in seconds of the input format in force (`configure` sets the bytes).
    max_seconds: float
    max_bytes: int = field(init=False, default=0)
    max_held: int = field(init=False, default=0)
    # Kept audio by item id, oldest first; decoded bytes and memory held.
    items: dict[str, KeptAudio] = field(default_factory=dict)
    kept_bytes: int = 0
    kept_held: int = 0
    # Appended since the buffer last began, and not shed.
    pending: deque[Chunk] = field(default_factory=deque)
    pending_bytes: int = 0
    pending_held: int = 0
    # Session-wide positions (decoded bytes): audio appended so far, where the upstream's
    # buffer began, and up to where pending audio was shed (an item starting before it is
    # incomplete).
    position: int = 0
    floor: int = 0
    shed_to: int = 0
    # The client's commits and clears not yet answered, in order: (kind, position).
    asked: deque[tuple[str, int]] = field(default_factory=lambda: deque(maxlen=_MAX_ASKED))
    spans: dict[str, _Span] = field(default_factory=dict)
    # Updated from the session in force at each upstream event.
    bytes_per_ms: float = _PCM16_BYTES_PER_SECOND / 1000
    idle_bytes: int | None = None

    def __post_init__(self) -> None:
        self.max_bytes = int(self.max_seconds * _PCM16_BYTES_PER_SECOND)
        self.max_held = 2 * self.max_bytes

    # --- client side: the pump's hook, after each forward ---------------------------------

    def client_event(self, kind: str, frame: bytes, size: int) -> None:
        """One `input_audio_buffer.*` event forwarded upstream; ``size`` is an append's
        decoded audio bytes (as `read_client_frame` found them)."""
        if kind == "input_audio_buffer.append":
            if size > 0:
                self._append(frame, size)
        elif kind == "input_audio_buffer.commit":
            self.asked.append(("commit", self.position))
        elif kind == "input_audio_buffer.clear":
            self.asked.append(("clear", self.position))

    def _append(self, frame: bytes, size: int) -> None:
        span = _audio_span(frame)
        if span is None:  # an escaped or unusual layout: the parse the codec did, again
            audio = parse_event(frame).get("audio")
            if not isinstance(audio, str):
                return
            frame = audio.encode("ascii", "replace")
            span = (0, len(frame))
        elif len(frame) - (span[1] - span[0]) > _FRAME_SLACK:
            frame = frame[span[0] : span[1]]
            span = (0, len(frame))
        self.pending.append((frame, span[0], span[1], self.position, size))
        self.position += size
        self.pending_bytes += size
        self.pending_held += len(frame) + _CHUNK_OVERHEAD
        if self.idle_bytes is not None and self.pending_bytes > self.idle_bytes:
            if not self.spans or all(s.start_ms is None for s in self.spans.values()):
                self._shed_pending(self.idle_bytes)
        if self._over_bound():
            self._bound()

    # --- upstream side: continuity's tracked events ---------------------------------------

    def observe(self, kind: str, event: Mapping[str, Any], session: Mapping[str, Any]) -> None:
        """One upstream event; ``session`` is the session in force (formats, VAD)."""
        self.configure(session)
        item_id = event.get("item_id")
        if kind == "input_audio_buffer.committed":
            if isinstance(item_id, str):
                self._committed(item_id)
        elif kind == "input_audio_buffer.cleared":
            self._cleared()
        elif kind == "conversation.item.deleted":
            if isinstance(item_id, str):
                self.forget(item_id)
        elif kind == "error":
            error = event.get("error")
            code = error.get("code") if isinstance(error, Mapping) else None
            if code == "input_audio_buffer_commit_empty" and self.asked:
                self.asked.popleft()  # a commit that took nothing: the buffer stays
        elif isinstance(item_id, str):
            self._vad(kind, item_id, event)

    def configure(self, session: Mapping[str, Any]) -> None:
        """Take the input format and turn detection of the session in force."""
        rate = audio_bytes_per_second(session, "input") or _PCM16_BYTES_PER_SECOND
        self.bytes_per_ms = rate / 1000
        self.max_bytes = int(self.max_seconds * rate)
        self.max_held = 2 * self.max_bytes
        self.idle_bytes = int(IDLE_KEEP_SECONDS * rate) if _vad_on(session) else None

    def _vad(self, kind: str, item_id: str, event: Mapping[str, Any]) -> None:
        start, end = event.get("audio_start_ms"), event.get("audio_end_ms")
        if kind == "input_audio_buffer.speech_started":
            span = self.spans[item_id] = _Span()
        elif item_id in self.spans:
            span = self.spans[item_id]
        else:
            span = self.spans[item_id] = _Span()
        if kind != "input_audio_buffer.speech_stopped" and isinstance(start, int):
            span.start_ms = start
        if kind != "input_audio_buffer.speech_started" and isinstance(end, int):
            span.end_ms = end
        while len(self.spans) > _MAX_SPANS:
            del self.spans[next(iter(self.spans))]

    def _committed(self, item_id: str) -> None:
        span = self.spans.pop(item_id, None) or _Span()
        if span.end_ms is not None:
            end = self._at(span.end_ms)  # server VAD ended it
        elif self.asked and self.asked[0][0] == "commit":
            end = self.asked.popleft()[1]  # the client's commit
        else:
            self.asked.clear()  # out of step: take all
            end = self.position
        start = max(self.floor, self._at(span.start_ms)) if span.start_ms is not None else None
        start = self.floor if start is None else start
        pieces = self._take(start, end)
        self.floor = max(self.floor, end)
        if start < self.shed_to or not pieces:
            return  # incomplete (shed before it was committed), or empty
        size = sum(hi - lo for _, lo, hi in pieces)
        held = sum(len(chunk[0]) + _CHUNK_OVERHEAD for chunk, _, _ in pieces)
        self.items[item_id] = KeptAudio(pieces, size, held)
        self.kept_bytes += size
        self.kept_held += held
        self._bound()

    def _cleared(self) -> None:
        if self.asked and self.asked[0][0] == "clear":
            at = self.asked.popleft()[1]
        else:
            self.asked.clear()
            at = self.position
        self._take(at, at)
        self.floor = max(self.floor, at)
        self.spans.clear()

    def _at(self, ms: int) -> int:
        return min(self.position, int(ms * self.bytes_per_ms))

    # --- the buffer -----------------------------------------------------------------------

    def _take(self, start: int, end: int) -> list[Piece]:
        """The pending audio in [start, end); everything before ``end`` leaves the buffer."""
        pieces: list[Piece] = []
        pending = self.pending
        while pending:
            chunk = pending[0]
            _, _, _, at, size = chunk
            if at >= end:
                break
            lo, hi = max(0, start - at), min(size, end - at)
            if lo < hi:
                pieces.append((chunk, lo, hi))
            if at + size > end:
                break  # the rest of it is the buffer's start
            pending.popleft()
            self.pending_bytes -= size
            self.pending_held -= len(chunk[0]) + _CHUNK_OVERHEAD
        return pieces

    def _shed_pending(self, keep: int) -> None:
        """Drop the oldest pending chunks until at most ``keep`` bytes are pending, and
        what they hold is within the memory bound."""
        pending = self.pending
        while pending:
            frame, _, _, at, size = pending[0]
            if self.pending_bytes - size < keep and self.pending_held <= self.max_held:
                break
            pending.popleft()
            self.pending_bytes -= size
            self.pending_held -= len(frame) + _CHUNK_OVERHEAD
            self.shed_to = at + size

    def _over_bound(self) -> bool:
        return (
            self.kept_bytes + self.pending_bytes > self.max_bytes
            or self.kept_held + self.pending_held > self.max_held
        )

    def _bound(self) -> None:
        """Rule 1: the oldest item's audio goes first, then the oldest pending audio."""
        while self.items and self._over_bound():
            self.forget(next(iter(self.items)))
        if self.pending_bytes > self.max_bytes or self.pending_held > self.max_held:
            self._shed_pending(self.max_bytes)

    # --- for continuity ---------------------------------------------------------------------

    def forget(self, item_id: str) -> None:
        kept = self.items.pop(item_id, None)
        if kept is not None:
            self.kept_bytes -= kept.size
            self.kept_held -= kept.held

    def new_session(self) -> None:
        """The conversation moved to a new upstream session: its buffer and VAD clock start
        at zero (what was appended and not committed is lost there)."""
        self.pending.clear()
        self.asked.clear()
        self.spans.clear()
        self.pending_bytes = self.pending_held = self.position = self.floor = self.shed_to = 0

    def audio_of(self, item_id: str) -> str | None:
        """The item's audio in base64, or None when none is kept (or a chunk of it is not
        valid base64: the upstream refused that append)."""
        kept = self.items.get(item_id)
        if kept is None:
            return None
        try:
            audio = join_base64(kept.pieces)
        except binascii.Error:
            self.forget(item_id)
            return None
        return audio.decode("ascii")

    def seconds_of(self, item_id: str) -> float:
        kept = self.items.get(item_id)
        return 0.0 if kept is None else kept.size / self.bytes_per_ms / 1000


def join_base64(pieces: list[Piece]) -> bytes:
    """One base64 string of ``pieces``. A piece of whole 3-byte groups is its base64 slice
    as it came; only pieces that end mid-group (padding, a VAD cut) are decoded and
    re-encoded. Raises binascii.Error when a chunk is not valid base64."""
    parts: list[bytes] = []
    carry = b""
    for (frame, start, end, _, _), lo, hi in pieces:
        if not carry and lo % 3 == 0 and hi % 3 == 0 and (end - start) % 4 == 0:
            parts.append(frame[start + lo // 3 * 4 : start + hi // 3 * 4])
            continue
        raw = carry + binascii.a2b_base64(frame[start:end], strict_mode=True)[lo:hi]
        whole = len(raw) - len(raw) % 3
        parts.append(binascii.b2a_base64(raw[:whole], newline=False))
        carry = raw[whole:]
    if carry:
        parts.append(binascii.b2a_base64(carry, newline=False))
    joined = b"".join(parts)
    if joined.rstrip(b"=").translate(None, _BASE64_ALPHABET) or len(joined) % 4:
        raise binascii.Error("not base64")  # a slice passed on as it came was not
    return joined


def _audio_span(frame: bytes) -> tuple[int, int] | None:
    """Where an append's base64 lies, in the layouts the codec proved unambiguous (no
    backslash: every quote delimits a string, so `"audio":"` is the key)."""
    for head in _APPEND_HEADS:
        if frame.startswith(head) and frame.endswith(b'"}'):
            end = len(frame) - 2
            if frame.find(b'"', len(head)) == end:
                return len(head), end
    if frame.find(b"\\") != -1:
        return None
    for key in _AUDIO_KEYS:
        at = frame.find(key)
        if at != -1:
            start = at + len(key)
            end = frame.find(b'"', start)
            return None if end == -1 else (start, end)
    return None


def _vad_on(session: Mapping[str, Any]) -> bool:
    audio = session.get("audio")
    if isinstance(audio, Mapping) and isinstance(audio.get("input"), Mapping):
        return audio["input"].get("turn_detection") is not None
    return session.get("turn_detection") is not None
