"""Audio synthesis, chunking and G.711 codecs."""

from __future__ import annotations

import base64
import math
import operator
from array import array
from collections.abc import Callable

import pytest

from relay.simulator import g711
from relay.simulator.audio import (
    G711_ALAW,
    G711_ULAW,
    MIN_REPLY_MS,
    NOTE_MS,
    PCM16,
    AudioFormat,
    reply_chunks,
    reply_duration_ms,
    silence,
    synthesize_reply,
    tone,
)


def rms(fmt: AudioFormat, data: bytes) -> float:
    samples = fmt.decode(data)
    return math.sqrt(sum(map(operator.mul, samples, samples)) / len(samples))


@pytest.mark.parametrize(
    ("text", "expected_ms"),
    [
        ("", 540),
        ("Hi", 540),
        ("123456789", 540),
        ("You said: hello there", 21 * NOTE_MS),
        ("x" * 100, 6000),
    ],
)
def test_reply_length_is_60_ms_per_character_and_at_least_500_ms(
    text: str, expected_ms: int
) -> None:
    assert reply_duration_ms(text) == expected_ms >= MIN_REPLY_MS
    assert PCM16.duration_ms(len(synthesize_reply(text))) == expected_ms


@pytest.mark.parametrize("fmt", [PCM16, G711_ULAW, G711_ALAW], ids=lambda f: f.name)
def test_reply_audio_has_the_format_rate(fmt: AudioFormat) -> None:
    audio = synthesize_reply("Hello, world", fmt)
    assert len(audio) == reply_duration_ms("Hello, world") * fmt.bytes_per_ms
    assert rms(fmt, audio) > 1000  # audible, not silence


def test_synthesis_is_deterministic_and_depends_on_the_text() -> None:
    synthesize_reply.cache_clear()
    first = synthesize_reply("deterministic")
    synthesize_reply.cache_clear()
    assert synthesize_reply("deterministic") == first
    assert synthesize_reply("Deterministic") != first


def test_spaces_are_rests() -> None:
    audio = synthesize_reply("a b")
    note = NOTE_MS * PCM16.bytes_per_ms
    assert set(audio[note : 2 * note]) == {0}
    assert set(audio[:note]) != {0}


@pytest.mark.parametrize("chunk_ms", [20, 100, 250, 1000])
def test_chunks_cover_the_reply_exactly(chunk_ms: int) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    chunks = reply_chunks(text, chunk_ms)
    total_ms = reply_duration_ms(text)
    assert len(chunks) == pytest.approx(total_ms / chunk_ms, abs=2)
    assert sum(chunk.ms for chunk in chunks) == pytest.approx(total_ms)
    if len(chunks) > 2:  # sizes vary around chunk_ms, as the service's deltas do
        assert len({chunk.ms for chunk in chunks[:-1]}) > 1
        assert min(c.ms for c in chunks[:-1]) < chunk_ms < max(c.ms for c in chunks[:-1])
    assert all(len(base64.b64decode(chunk.b64)) % 2 == 0 for chunk in chunks)  # whole samples
    assert b"".join(base64.b64decode(chunk.b64) for chunk in chunks) == synthesize_reply(text)


def test_chunks_are_cached() -> None:
    assert reply_chunks("cached", 100) is reply_chunks("cached", 100)


def test_tone_and_silence() -> None:
    loud = tone(440, 1000, amplitude=0.3)
    assert len(loud) == 48_000
    assert rms(PCM16, loud) == pytest.approx(0.3 * 32767 / math.sqrt(2), rel=0.02)
    assert silence(20) == bytes(960)
    assert len(silence(20, G711_ULAW)) == 160


@pytest.mark.parametrize(
    ("encode", "table"),
    [(g711.linear_to_ulaw, g711.decode_ulaw), (g711.linear_to_alaw, g711.decode_alaw)],
    ids=["ulaw", "alaw"],
)
def test_g711_round_trip_error_is_bounded(
    encode: Callable[[int], int], table: Callable[[bytes], array[int]]
) -> None:
    samples = range(-32768, 32768)
    decoded = table(bytes(encode(s) for s in samples))
    worst = max(abs(d - s) / max(abs(s), 128) for s, d in zip(samples, decoded, strict=True))
    assert worst <= 0.0625
    # Every code decodes to a value that encodes back to an equivalent code.
    for code in range(256):
        value = table(bytes([code]))[0]
        assert table(bytes([encode(value)]))[0] == value
