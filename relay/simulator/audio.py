"""Audio formats, deterministic speech-like synthesis, and base64 chunking.

The simulator's "voice" is a melody: one 60 ms note per character of the reply (spaces are
rests), at least 500 ms long. Notes are synthesized once and cached, so a reply costs a
few byte joins and one base64 pass per chunk, and the same text always gives the same audio.
"""

from __future__ import annotations

import base64
import functools
import math
import sys
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from relay.simulator import g711

NOTE_MS = 60
MIN_REPLY_MS = 500
_FADE_MS = 5
_REPLY_AMPLITUDE = 0.25
# C-major pentatonic over two octaves: pleasant, and easy to tell apart from silence.
_SCALE_HZ = (261.63, 293.66, 329.63, 392.0, 440.0, 523.25, 587.33, 659.25, 783.99, 880.0)


def _decode_pcm16(data: bytes) -> array[int]:
    samples = array("h")
    samples.frombytes(data[: len(data) - len(data) % 2])
    if sys.byteorder == "big":
        samples.byteswap()
    return samples


def _encode_pcm16(samples: Iterable[int]) -> bytes:
    out = array("h", samples)
    if sys.byteorder == "big":
        out.byteswap()
    return out.tobytes()


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """A wire audio format: PCM16 at 24 kHz, or G.711 at 8 kHz."""

    name: str
    sample_rate: int
    bytes_per_sample: int
    decode: Callable[[bytes], array[int]]
    encode: Callable[[Iterable[int]], bytes]

    @property
    def bytes_per_ms(self) -> int:
        return self.sample_rate * self.bytes_per_sample // 1000

    def duration_ms(self, nbytes: int) -> float:
        return nbytes / self.bytes_per_ms


PCM16 = AudioFormat("pcm16", 24000, 2, _decode_pcm16, _encode_pcm16)
G711_ULAW = AudioFormat("g711_ulaw", 8000, 1, g711.decode_ulaw, g711.encode_ulaw)
G711_ALAW = AudioFormat("g711_alaw", 8000, 1, g711.decode_alaw, g711.encode_alaw)


def tone_samples(freq_hz: float, ms: float, amplitude: float, sample_rate: int) -> list[int]:
    """A sine tone with short fades at both ends (no clicks), as signed 16-bit samples."""
    count = round(sample_rate * ms / 1000)
    fade = max(1, min(count // 2, sample_rate * _FADE_MS // 1000))
    peak = amplitude * 32767
    step = 2 * math.pi * freq_hz / sample_rate
    return [
        round(peak * min(1.0, (n + 1) / fade, (count - n) / fade) * math.sin(step * n))
        for n in range(count)
    ]


def tone(freq_hz: float, ms: float, amplitude: float = 0.3, fmt: AudioFormat = PCM16) -> bytes:
    """Encoded audio of a sine tone; tests use it as "speech"."""
    return fmt.encode(tone_samples(freq_hz, ms, amplitude, fmt.sample_rate))


def silence(ms: float, fmt: AudioFormat = PCM16) -> bytes:
    """Encoded digital silence."""
    return fmt.encode([0] * round(fmt.sample_rate * ms / 1000))


@functools.cache
def _note(pitch: int | None, fmt: AudioFormat) -> bytes:
    if pitch is None:
        return silence(NOTE_MS, fmt)
    return tone(_SCALE_HZ[pitch], NOTE_MS, _REPLY_AMPLITUDE, fmt)


def _pitch(char: str) -> int | None:
    return None if char.isspace() else ord(char) % len(_SCALE_HZ)


def reply_duration_ms(text: str) -> int:
    """Length of the synthesized reply: NOTE_MS per character, at least MIN_REPLY_MS."""
    return _note_count(text) * NOTE_MS


def _note_count(text: str) -> int:
    return max(len(text), math.ceil(MIN_REPLY_MS / NOTE_MS))


@functools.lru_cache(maxsize=64)
def synthesize_reply(text: str, fmt: AudioFormat = PCM16) -> bytes:
    """Deterministic speech-like audio for ``text`` (cycling through it to the minimum length)."""
    chars = text or " "
    return b"".join(_note(_pitch(chars[i % len(chars)]), fmt) for i in range(_note_count(text)))


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """One ``…audio.delta`` worth of audio: base64 payload and its duration."""

    b64: str
    ms: float


# Delta sizes cycle through these multiples of chunk_ms (mean 1): the service's audio deltas
# vary in size, and a client or relay must not count on one size.
CHUNK_FACTORS = (0.5, 1.5, 1.0, 0.75, 1.25)


def chunk_sizes(chunk_ms: int, fmt: AudioFormat = PCM16) -> tuple[int, ...]:
    """Bytes per delta, one per factor, each a whole number of samples."""
    sample = fmt.bytes_per_sample
    return tuple(
        max(1, round(chunk_ms * factor * fmt.bytes_per_ms / sample)) * sample
        for factor in CHUNK_FACTORS
    )


@functools.lru_cache(maxsize=64)
def reply_chunks(text: str, chunk_ms: int, fmt: AudioFormat = PCM16) -> tuple[AudioChunk, ...]:
    """The reply audio split into pieces of ``chunk_ms`` on average, base64 encoded once and
    cached."""
    audio = synthesize_reply(text, fmt)
    sizes = chunk_sizes(chunk_ms, fmt)
    chunks: list[AudioChunk] = []
    start = 0
    while start < len(audio):
        piece = audio[start : start + sizes[len(chunks) % len(sizes)]]
        chunks.append(
            AudioChunk(base64.b64encode(piece).decode("ascii"), fmt.duration_ms(len(piece)))
        )
        start += len(piece)
    return tuple(chunks)
