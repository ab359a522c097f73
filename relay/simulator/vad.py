"""Server VAD on signal energy, positioned in milliseconds of audio received.

The detector looks at 20 ms windows. Speech starts at the first window whose RMS reaches the
threshold derived from ``turn_detection.threshold``, and stops once ``silence_duration_ms``
of quieter windows follow. Positions count audio received, never wall-clock time, so the
same audio always gives the same events.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

from relay.simulator.audio import PCM16, AudioFormat

WINDOW_MS = 20
# Threshold 0.0 maps to -60 dBFS, 0.5 to -30 dBFS, 1.0 to full scale.
_FLOOR_DBFS = -60.0


@dataclass(frozen=True, slots=True)
class TurnDetection:
    """The effective ``turn_detection`` settings the simulator acts on."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True


@dataclass(frozen=True, slots=True)
class VadEvent:
    """A VAD transition: ``audio_ms`` is session-wide; ``offset`` is where it happened
    in the bytes passed to the ``feed`` call that produced it, at session-wide ``offset_ms``
    (a speech start is reported before it, by the prefix padding and the loud window)."""

    kind: Literal["speech_started", "speech_stopped"]
    audio_ms: int
    offset: int
    offset_ms: int


def rms_threshold(threshold: float) -> float:
    """The RMS level (of a signed 16-bit signal) that counts as speech."""
    clamped = min(max(threshold, 0.0), 1.0)
    return 32767 * 10 ** ((_FLOOR_DBFS * (1 - clamped)) / 20)


class VoiceActivityDetector:
    """Feeds on appended audio; returns speech start/stop transitions."""

    def __init__(self, config: TurnDetection, fmt: AudioFormat = PCM16) -> None:
        self._config = config
        self._fmt = fmt
        self._min_energy = rms_threshold(config.threshold) ** 2
        # Session-wide position of the end of the last analysed window.
        self._position_ms = 0
        # Bytes of an incomplete window, kept for the next feed.
        self._pending = b""
        # Speech may not start before the current input buffer began.
        self._floor_ms = 0
        self._in_speech = False
        self._silence_ms = 0

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    def configure(self, config: TurnDetection, fmt: AudioFormat) -> None:
        """Apply new settings, keeping the position (a session.update mid-stream)."""
        if fmt != self._fmt:
            self._pending = b""
        self._config = config
        self._fmt = fmt
        self._min_energy = rms_threshold(config.threshold) ** 2

    def reset(self) -> None:
        """Forget the current utterance: the input buffer was committed or cleared."""
        self._in_speech = False
        self._silence_ms = 0
        self._floor_ms = self._position_ms

    def feed(self, data: bytes) -> list[VadEvent]:
        """Analyse appended audio and return the transitions it contains, in order."""
        window_bytes = self._fmt.bytes_per_ms * WINDOW_MS
        buffered = self._pending + data if self._pending else data
        usable = len(buffered) - len(buffered) % window_bytes
        samples = self._fmt.decode(buffered[:usable])
        window_samples = window_bytes // self._fmt.bytes_per_sample
        events: list[VadEvent] = []
        for index in range(usable // window_bytes):
            window = samples[index * window_samples : (index + 1) * window_samples]
            energy = sum(map(operator.mul, window, window)) / max(len(window), 1)
            kind = self._step(energy >= self._min_energy)
            if kind is not None:
                at = self._position_ms if kind == "speech_stopped" else self._speech_start()
                offset = (index + 1) * window_bytes - len(self._pending)
                events.append(VadEvent(kind, at, offset, self._position_ms))
        self._pending = bytes(buffered[usable:])
        return events

    def skip(self, data: bytes) -> None:
        """Count appended audio without analysing it (turn detection is off)."""
        window_bytes = self._fmt.bytes_per_ms * WINDOW_MS
        buffered = self._pending + data
        whole = len(buffered) // window_bytes
        self._position_ms += whole * WINDOW_MS
        self._pending = bytes(buffered[whole * window_bytes :])

    def _speech_start(self) -> int:
        window_start = self._position_ms - WINDOW_MS
        return max(self._floor_ms, window_start - self._config.prefix_padding_ms)

    def _step(self, loud: bool) -> Literal["speech_started", "speech_stopped"] | None:
        self._position_ms += WINDOW_MS
        if not self._in_speech:
            if loud:
                self._in_speech = True
                self._silence_ms = 0
                return "speech_started"
            return None
        if loud:
            self._silence_ms = 0
            return None
        self._silence_ms += WINDOW_MS
        if self._silence_ms >= self._config.silence_duration_ms:
            self._in_speech = False
            self._silence_ms = 0
            return "speech_stopped"
        return None
