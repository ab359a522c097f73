"""relay talk's pure parts: WAV conversion, following a turn, the endpoint URL."""

from __future__ import annotations

import base64
import wave
from pathlib import Path

import numpy as np
import pytest

from relay.talk.audio import WavError, read_wav, write_wav
from relay.talk.client import TalkError, realtime_url
from relay.talk.turn import Said, Turn


def write(path: Path, frames: bytes, *, rate: int, width: int, channels: int) -> Path:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(frames)
    return path


def sine(rate: int, seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return 0.5 * np.sin(2 * np.pi * freq * t)


def pcm16(data: bytes) -> np.ndarray:
    return np.frombuffer(data, "<i2").astype(np.float64) / 32768


@pytest.mark.parametrize(
    ("rate", "width", "channels"),
    [(24000, 2, 1), (44100, 2, 2), (8000, 1, 1), (48000, 3, 2), (16000, 4, 1)],
)
def test_any_wav_becomes_24khz_mono_pcm16(tmp_path, rate, width, channels):
    wave_ = sine(rate, 0.5)
    scale = 2 ** (8 * width - 1)
    ints = np.repeat(np.round(wave_ * (scale - 1)).astype(np.int64), channels)
    if width == 1:
        frames = (ints + 128).astype(np.uint8).tobytes()
    elif width == 3:
        frames = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints)
    else:
        frames = ints.astype(f"<i{width}").tobytes()
    path = write(tmp_path / "in.wav", frames, rate=rate, width=width, channels=channels)
    samples = pcm16(read_wav(path))
    assert abs(len(samples) - 12000) <= 2  # 0.5 s at 24 kHz
    middle = samples[1000:-1000]  # away from the resampler's edges
    expected = sine(24000, 0.5)[1000 : 1000 + len(middle)]
    assert np.max(np.abs(middle - expected)) < 0.02


def test_write_wav_round_trips(tmp_path):
    audio = (np.arange(2400, dtype="<i2") * 7).tobytes()
    write_wav(tmp_path / "out.wav", audio)
    assert read_wav(tmp_path / "out.wav") == audio


def test_unsupported_or_empty_wavs_say_why(tmp_path):
    with pytest.raises(WavError, match="holds no audio"):
        read_wav(write(tmp_path / "empty.wav", b"", rate=24000, width=2, channels=1))
    with pytest.raises(WavError, match="is a directory"):
        read_wav(tmp_path)


def audio_delta(response_id: str, pcm: bytes) -> dict:
    delta = base64.b64encode(pcm).decode()
    return {"type": "response.output_audio.delta", "response_id": response_id, "delta": delta}


def test_a_turn_under_server_vad():
    turn = Turn()
    turn.feed(
        {
            "type": "session.created",
            "session": {"audio": {"input": {"turn_detection": {"type": "server_vad"}}}},
        },
        0,
    )
    assert turn.server_vad and turn.needs_silence
    turn.feed({"type": "input_audio_buffer.speech_started"}, 1.0)
    assert turn.needs_silence
    turn.feed({"type": "input_audio_buffer.speech_stopped"}, 2.0)
    assert not turn.needs_silence
    turn.uploaded = True
    said = turn.feed(
        {
            "type": "conversation.item.input_audio_transcription.completed",
            "item_id": "i1",
            "transcript": "hi",
        },
        2.1,
    )
    assert said == Said("user", "i1", "hi", final=True)
    turn.feed({"type": "response.created", "response": {"id": "r1"}}, 2.2)
    turn.feed(audio_delta("r1", b"\x01\x00" * 2400), 2.25)
    turn.feed(audio_delta("r1", b"\x01\x00" * 2400), 2.3)
    said = turn.feed(
        {"type": "response.output_audio_transcript.delta", "response_id": "r1", "delta": "Hel"}, 2.3
    )
    assert said == Said("assistant", "r1", "Hel", final=False)
    assert not turn.complete
    usage = {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12}
    turn.feed({"type": "response.done", "response": {"id": "r1", "usage": usage}}, 2.5)
    assert turn.complete
    assert turn.first_audio_seconds == pytest.approx(0.25)
    assert turn.reply_seconds == pytest.approx(0.2)
    assert turn.audio_chunks_in == 2
    assert dict(turn.tokens) == usage


def test_more_speech_after_a_response_waits_for_the_next_one():
    turn = Turn(uploaded=True)
    turn.feed({"type": "input_audio_buffer.speech_stopped"}, 1.0)
    turn.feed({"type": "response.created", "response": {"id": "r1"}}, 1.1)
    turn.feed({"type": "input_audio_buffer.speech_started"}, 1.2)  # cuts r1 short
    turn.feed({"type": "response.done", "response": {"id": "r1", "status": "cancelled"}}, 1.3)
    assert not turn.complete
    turn.feed({"type": "input_audio_buffer.speech_stopped"}, 2.0)
    turn.feed({"type": "response.created", "response": {"id": "r2"}}, 2.1)
    turn.feed({"type": "response.done", "response": {"id": "r2"}}, 2.2)
    assert turn.complete and turn.responses_done == 2


@pytest.mark.parametrize(
    ("session", "vad"),
    [
        ({"audio": {"input": {"turn_detection": None}}}, False),
        ({"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}, True),
        ({"turn_detection": None}, False),  # preview field names
        ({"turn_detection": {"type": "server_vad"}}, True),
    ],
)
def test_turn_detection_is_read_from_the_session(session, vad):
    turn = Turn()
    turn.configure(session)
    assert turn.server_vad is vad
    assert turn.needs_silence is vad  # without VAD the client commits instead


@pytest.mark.parametrize(
    ("base", "url"),
    [
        ("ws://127.0.0.1:8080", "ws://127.0.0.1:8080/openai/v1/realtime?model=d"),
        ("wss://relay.example.com/", "wss://relay.example.com/openai/v1/realtime?model=d"),
        ("ws://h:1/openai/v1/realtime", "ws://h:1/openai/v1/realtime?model=d"),
        ("ws://h:1/v1/realtime", "ws://h:1/v1/realtime?model=d"),
    ],
)
def test_realtime_url(base, url):
    assert realtime_url(base, "d") == url


def test_realtime_url_needs_a_websocket_address():
    with pytest.raises(TalkError, match="expected ws://host:port"):
        realtime_url("127.0.0.1:8080", "d")
