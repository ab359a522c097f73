"""WAV in and out: whatever the file holds becomes the API's 24 kHz mono PCM16."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soxr  # type: ignore[import-untyped]

RATE = 24000
SAMPLE_BYTES = 2


class WavError(Exception):
    """The input is not a WAV file this command can read; the message says why."""


def read_wav(path: Path) -> bytes:
    """The file's audio as 24 kHz mono PCM16: channels averaged, resampled by soxr."""
    try:
        with wave.open(str(path), "rb") as wav:
            width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except FileNotFoundError as exc:
        raise WavError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise WavError(f"{path}: is a directory") from exc
    except OSError as exc:
        raise WavError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (wave.Error, EOFError) as exc:
        raise WavError(f"{path}: not a PCM WAV file ({exc or 'truncated'})") from exc
    if not frames:
        raise WavError(f"{path}: holds no audio")
    try:
        samples = _to_float(frames, width).reshape(-1, channels).mean(axis=1)
    except ValueError as exc:
        raise WavError(f"{path}: {exc}") from exc
    if rate != RATE:
        samples = np.asarray(soxr.resample(samples, rate, RATE, quality="HQ"), np.float64)
    return to_pcm16(samples)


def _to_float(frames: bytes, width: int) -> npt.NDArray[np.float64]:
    """Samples of any WAV integer width as floats in [-1, 1)."""
    if width == 1:  # unsigned 8-bit
        ints = np.frombuffer(frames, np.uint8).astype(np.int32) - 128
    elif width == 3:  # 24-bit little-endian: widen to 32 bits by a zero low byte
        padded = np.zeros((len(frames) // 3, 4), np.uint8)
        padded[:, 1:] = np.frombuffer(frames, np.uint8).reshape(-1, 3)
        ints, width = padded.view("<i4").ravel(), 4
    elif width in (2, 4):
        ints = np.frombuffer(frames, f"<i{width}")
    else:
        raise ValueError(f"{width * 8}-bit samples are not supported")
    floats: npt.NDArray[np.float64] = ints.astype(np.float64) / 2 ** (8 * width - 1)
    return floats


def to_pcm16(samples: npt.NDArray[np.float64]) -> bytes:
    scaled = np.clip(np.rint(samples * 32768), -32768, 32767)
    return bytes(scaled.astype("<i2").tobytes())


def write_wav(path: Path, pcm16: bytes) -> None:
    """24 kHz mono PCM16 to a WAV file."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(SAMPLE_BYTES)
        wav.setframerate(RATE)
        wav.writeframes(pcm16)


def seconds(pcm16_bytes: int) -> float:
    return pcm16_bytes / (RATE * SAMPLE_BYTES)
