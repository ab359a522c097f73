"""Server VAD on PCM energy, positioned in ms of audio received."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.simulator.audio import G711_ULAW, PCM16, silence, tone
from relay.simulator.vad import TurnDetection, VoiceActivityDetector, rms_threshold
from tests.simulator.conftest import speech


def feed_all(vad: VoiceActivityDetector, *pieces: bytes) -> list[tuple[str, int, int]]:
    """Feed pieces; return (kind, audio_ms, absolute byte offset) of each event."""
    events: list[tuple[str, int, int]] = []
    consumed = 0
    for piece in pieces:
        events += [(e.kind, e.audio_ms, consumed + e.offset) for e in vad.feed(piece)]
        consumed += len(piece)
    return events


def test_threshold_mapping() -> None:
    assert rms_threshold(0.5) == pytest.approx(32767 * 10 ** (-30 / 20))
    assert rms_threshold(0.0) < rms_threshold(0.5) < rms_threshold(0.9) < rms_threshold(1.0)
    assert rms_threshold(-1) == rms_threshold(0) and rms_threshold(2) == rms_threshold(1)


def test_speech_then_silence() -> None:
    vad = VoiceActivityDetector(TurnDetection())
    events = feed_all(vad, silence(600) + speech(1000) + silence(800))
    # Start includes the 300 ms prefix padding; stop comes 500 ms into the silence.
    assert events == [("speech_started", 300, 620 * 48), ("speech_stopped", 2100, 2100 * 48)]
    assert not vad.in_speech


def test_start_is_not_before_the_buffer() -> None:
    vad = VoiceActivityDetector(TurnDetection(prefix_padding_ms=300))
    assert feed_all(vad, speech(200))[0][:2] == ("speech_started", 0)
    vad.reset()
    vad.feed(silence(1000))
    vad.reset()  # the buffer now starts at 1200 ms
    assert feed_all(vad, speech(100))[0][:2] == ("speech_started", 1200)


def test_short_pauses_do_not_end_speech() -> None:
    vad = VoiceActivityDetector(TurnDetection(silence_duration_ms=500))
    audio = speech(500) + silence(400) + speech(500) + silence(500)
    assert [e[:2] for e in feed_all(vad, audio)] == [
        ("speech_started", 0),
        ("speech_stopped", 1900),
    ]


def test_threshold_controls_sensitivity() -> None:
    quiet = tone(440, 500, amplitude=0.01) + silence(600)  # RMS ~230: -43 dBFS
    assert feed_all(VoiceActivityDetector(TurnDetection(threshold=0.5)), quiet) == []
    assert len(feed_all(VoiceActivityDetector(TurnDetection(threshold=0.2)), quiet)) == 2


def test_skip_counts_audio_without_detecting() -> None:
    vad = VoiceActivityDetector(TurnDetection(prefix_padding_ms=0))
    vad.skip(speech(990))
    vad.skip(speech(10))
    assert [e[:2] for e in feed_all(vad, speech(100))] == [("speech_started", 1000)]


def test_g711_audio() -> None:
    vad = VoiceActivityDetector(TurnDetection(), G711_ULAW)
    audio = tone(440, 1000, fmt=G711_ULAW) + silence(800, G711_ULAW)
    assert feed_all(vad, audio) == [("speech_started", 0, 160), ("speech_stopped", 1500, 1500 * 8)]


def test_configure_keeps_position() -> None:
    vad = VoiceActivityDetector(TurnDetection())
    vad.feed(silence(1000))
    vad.configure(TurnDetection(prefix_padding_ms=0, silence_duration_ms=200), PCM16)
    assert [e[:2] for e in feed_all(vad, speech(100) + silence(300))] == [
        ("speech_started", 1000),
        ("speech_stopped", 1300),
    ]


AUDIO = silence(130) + speech(700) + silence(350) + speech(260) + silence(900)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(AUDIO)), max_size=12))
def test_events_do_not_depend_on_how_audio_is_split(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(AUDIO)]
    pieces = [AUDIO[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    whole = feed_all(VoiceActivityDetector(TurnDetection(silence_duration_ms=300)), AUDIO)
    split = feed_all(VoiceActivityDetector(TurnDetection(silence_duration_ms=300)), *pieces)
    assert split == whole
    assert [kind for kind, _, _ in whole] == ["speech_started", "speech_stopped"] * 2
