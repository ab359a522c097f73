"""The input audio buffer: appended audio, server-VAD turns, and what a commit takes."""

from __future__ import annotations

from dataclasses import dataclass

from relay.simulator.audio import AudioFormat
from relay.simulator.errors import ClientEventError
from relay.simulator.ids import IdFactory
from relay.simulator.vad import TurnDetection, VoiceActivityDetector

MIN_COMMIT_MS = 100


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """VAD heard speech; ``item_id`` is the user item the turn will become."""

    item_id: str
    audio_start_ms: int


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    """VAD heard the end of speech; ``audio`` is the turn, taken out of the buffer."""

    item_id: str
    audio_end_ms: int
    audio: bytes


Turn = SpeechStarted | SpeechStopped


class InputBuffer:
    """Audio appended since the last commit or clear, watched by server VAD when enabled."""

    def __init__(
        self, turn_detection: TurnDetection | None, fmt: AudioFormat, ids: IdFactory
    ) -> None:
        self._ids = ids
        self._turn_detection = turn_detection
        self._fmt = fmt
        self._audio = bytearray()
        self._vad = VoiceActivityDetector(turn_detection or TurnDetection(), fmt)
        # The user item id announced by speech_started, used when the turn is committed.
        self._item_id: str | None = None

    def configure(self, turn_detection: TurnDetection | None, fmt: AudioFormat) -> None:
        """Apply a session update; turning VAD off forgets any utterance in progress."""
        self._turn_detection = turn_detection
        self._fmt = fmt
        self._vad.configure(turn_detection or TurnDetection(), fmt)
        if turn_detection is None:
            self._reset_turn()

    def append(self, audio: bytes) -> list[Turn]:
        """Add audio; with VAD on, return the turns it started or ended, in order."""
        turn_detection = self._turn_detection
        if turn_detection is None:
            self._vad.skip(audio)
            self._audio += audio
            return []
        turns: list[Turn] = []
        cursor = 0
        for change in self._vad.feed(audio):
            self._audio += audio[cursor : change.offset]
            cursor = change.offset
            if change.kind == "speech_started":
                self._item_id = self._ids.item()
                turns.append(SpeechStarted(self._item_id, change.audio_ms))
                # The turn's audio starts where the event says (prefix padding included).
                keep = (change.offset_ms - change.audio_ms) * self._fmt.bytes_per_ms
                if len(self._audio) > keep:
                    del self._audio[: len(self._audio) - keep]
            else:
                item_id, taken = self._take()
                turns.append(SpeechStopped(item_id, change.audio_ms, taken))
        self._audio += audio[cursor:]
        if not self._vad.in_speech:
            # Between utterances only the prefix padding is worth keeping.
            keep = turn_detection.prefix_padding_ms * self._fmt.bytes_per_ms
            if len(self._audio) > keep:
                del self._audio[: len(self._audio) - keep]
        return turns

    def commit(self) -> tuple[str, bytes]:
        """Take the buffered audio for a user item: ``(item_id, audio)``.

        Raises:
            ClientEventError: less than 100 ms of audio is buffered.
        """
        buffered_ms = self._fmt.duration_ms(len(self._audio))
        if buffered_ms < MIN_COMMIT_MS:
            raise ClientEventError(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"{MIN_COMMIT_MS}ms of audio, but buffer only has {buffered_ms:.2f}ms of audio.",
            )
        return self._take()

    def clear(self) -> None:
        self._audio.clear()
        self._reset_turn()

    def _take(self) -> tuple[str, bytes]:
        item_id = self._item_id or self._ids.item()
        taken = bytes(self._audio)
        self.clear()
        return item_id, taken

    def _reset_turn(self) -> None:
        self._vad.reset()
        self._item_id = None
