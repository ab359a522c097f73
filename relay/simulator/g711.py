"""G.711 µ-law and A-law codecs (ITU-T G.711), table-driven for decoding.

Only the simulator's own audio goes through ``encode_*`` (once per cached note), so the
encoders favour clarity; decoding runs on client audio and uses 256-entry tables.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

_ULAW_BIAS = 0x84
_ULAW_CLIP = 32635


def _ulaw_to_linear(code: int) -> int:
    code = ~code & 0xFF
    exponent = (code >> 4) & 0x07
    magnitude = (((code & 0x0F) << 3) + _ULAW_BIAS) << exponent
    magnitude -= _ULAW_BIAS
    return -magnitude if code & 0x80 else magnitude


def _alaw_to_linear(code: int) -> int:
    code ^= 0x55
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    if exponent == 0:
        magnitude = (mantissa << 4) + 8
    else:
        magnitude = ((mantissa << 4) + 0x108) << (exponent - 1)
    # In A-law the sign bit set means a positive sample.
    return magnitude if code & 0x80 else -magnitude


_ULAW_TABLE = tuple(_ulaw_to_linear(code) for code in range(256))
_ALAW_TABLE = tuple(_alaw_to_linear(code) for code in range(256))


def linear_to_ulaw(sample: int) -> int:
    """Encode one signed 16-bit sample as a µ-law byte."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(-sample if sample < 0 else sample, _ULAW_CLIP) + _ULAW_BIAS
    exponent = max(magnitude.bit_length() - 8, 0)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def linear_to_alaw(sample: int) -> int:
    """Encode one signed 16-bit sample as an A-law byte."""
    sign = 0x80 if sample >= 0 else 0
    magnitude = min(-sample - 1 if sample < 0 else sample, 32767)
    if magnitude >= 256:
        exponent = magnitude.bit_length() - 8
        mantissa = (magnitude >> (exponent + 3)) & 0x0F
    else:
        exponent = 0
        mantissa = magnitude >> 4
    return (sign | (exponent << 4) | mantissa) ^ 0x55


def decode_ulaw(data: bytes) -> array[int]:
    return array("h", map(_ULAW_TABLE.__getitem__, data))


def decode_alaw(data: bytes) -> array[int]:
    return array("h", map(_ALAW_TABLE.__getitem__, data))


def encode_ulaw(samples: Iterable[int]) -> bytes:
    return bytes(map(linear_to_ulaw, samples))


def encode_alaw(samples: Iterable[int]) -> bytes:
    return bytes(map(linear_to_alaw, samples))
