"""One spoken turn, followed from the server's events. Pure: no sockets, no clock.

The client feeds every server event to ``Turn.feed`` with the time it arrived, and asks the
turn what to do next: whether the server still needs trailing silence to hear the end of the
speech (server VAD), and whether the reply is complete.

A turn is complete when the upload is over, the user is not speaking, no response is in
progress, and at least one response finished after the user's last words: server VAD may
split one recording into several turns, and a response cut short by more speech is
followed by another.
"""

from __future__ import annotations

import base64
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from relay.talk.audio import seconds

# GA event names first; preview deployments use the beta names.
AUDIO_DELTAS = frozenset({"response.output_audio.delta", "response.audio.delta"})
TRANSCRIPT_DELTAS = frozenset(
    {
        "response.output_audio_transcript.delta", "response.audio_transcript.delta",
        "response.output_text.delta", "response.text.delta",
    }
)  # fmt: skip
TRANSCRIPT_DONES = frozenset(
    {
        "response.output_audio_transcript.done", "response.audio_transcript.done",
        "response.output_text.done", "response.text.done",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Said:
    """Transcript text to show: a ``delta`` while it streams, then the whole line ``final``."""

    role: Literal["user", "assistant"]
    key: str
    text: str
    final: bool


@dataclass(slots=True)
class Turn:
    server_vad: bool = True
    uploaded: bool = False
    speech_active: bool = False
    # When the user's turn ended: VAD heard the end, or the client committed.
    turn_ended_at: float | None = None
    first_audio_at: float | None = None
    open_responses: set[str] = field(default_factory=set)
    responses_done: int = 0
    # Responses finished since the user last spoke.
    answered: int = 0
    reply_audio: bytearray = field(default_factory=bytearray)
    audio_chunks_in: int = 0
    tokens: Counter[str] = field(default_factory=Counter)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def configure(self, session: dict[str, Any]) -> None:
        """Read the session's turn detection (GA ``audio.input``, or the preview's top level)."""
        detection = session.get("audio", {}).get("input", {}).get("turn_detection", ...)
        if detection is ...:
            detection = session.get("turn_detection")
        self.server_vad = detection is not None

    def committed(self, now: float) -> None:
        """The client ended the turn itself (no server VAD, or a text message)."""
        self.turn_ended_at = now

    @property
    def needs_silence(self) -> bool:
        """Server VAD has not yet heard the end of the speech."""
        return self.server_vad and (self.speech_active or self.turn_ended_at is None)

    @property
    def complete(self) -> bool:
        return (
            self.uploaded
            and not self.speech_active
            and not self.open_responses
            and self.answered > 0
        )

    @property
    def reply_seconds(self) -> float:
        return seconds(len(self.reply_audio))

    @property
    def first_audio_seconds(self) -> float | None:
        if self.first_audio_at is None or self.turn_ended_at is None:
            return None
        return max(0.0, self.first_audio_at - self.turn_ended_at)

    def feed(self, event: dict[str, Any], now: float) -> Said | None:
        kind = event.get("type")
        if kind in AUDIO_DELTAS:
            self._audio(event, now)
        elif kind in TRANSCRIPT_DELTAS:
            return Said("assistant", event.get("response_id", ""), event["delta"], final=False)
        elif kind in TRANSCRIPT_DONES:
            text = event.get("transcript", event.get("text", ""))
            return Said("assistant", event.get("response_id", ""), text, final=True)
        elif kind == "conversation.item.input_audio_transcription.delta":
            return Said("user", event["item_id"], event["delta"], final=False)
        elif kind == "conversation.item.input_audio_transcription.completed":
            return Said("user", event["item_id"], event["transcript"], final=True)
        elif kind in ("session.created", "session.updated"):
            self.configure(event["session"])
        else:
            self._progress(kind, event, now)
        return None

    def _audio(self, event: dict[str, Any], now: float) -> None:
        self.reply_audio += base64.b64decode(event["delta"])
        self.audio_chunks_in += 1
        if self.first_audio_at is None:
            self.first_audio_at = now

    def _progress(self, kind: Any, event: dict[str, Any], now: float) -> None:
        if kind == "input_audio_buffer.speech_started":
            self.speech_active = True
            self.answered = 0
        elif kind == "input_audio_buffer.speech_stopped":
            self.speech_active = False
            self.turn_ended_at = now
            self.first_audio_at = None  # time the reply to these words
        elif kind == "response.created":
            self.open_responses.add(event["response"]["id"])
        elif kind == "response.done":
            response = event["response"]
            self.open_responses.discard(response["id"])
            self.responses_done += 1
            self.answered += 1
            usage = response.get("usage") or {}
            for name in ("input_tokens", "output_tokens", "total_tokens"):
                self.tokens[name] += usage.get(name) or 0
        elif kind == "error":
            self.errors.append(event.get("error") or {})
