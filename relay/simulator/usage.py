"""Token accounting: plausible, deterministic usage numbers.

Rates follow the service's published conversions: user audio is 1 token per 100 ms,
assistant audio 1 token per 50 ms, text about 4 characters per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

INPUT_AUDIO_MS_PER_TOKEN = 100
OUTPUT_AUDIO_MS_PER_TOKEN = 50
CHARS_PER_TOKEN = 4


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def input_audio_tokens(ms: float) -> int:
    return math.ceil(ms / INPUT_AUDIO_MS_PER_TOKEN)


def output_audio_tokens(ms: float) -> int:
    return math.ceil(ms / OUTPUT_AUDIO_MS_PER_TOKEN)


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one response; the totals are derived so they always agree."""

    input_text: int = 0
    input_audio: int = 0
    output_text: int = 0
    output_audio: int = 0

    @property
    def input_tokens(self) -> int:
        return self.input_text + self.input_audio

    @property
    def output_tokens(self) -> int:
        return self.output_text + self.output_audio

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def to_wire(self, *, detailed: bool) -> dict[str, Any]:
        """The ``response.usage`` object; ``detailed`` adds the GA-only fields."""
        input_details: dict[str, Any] = {
            "cached_tokens": 0,
            "text_tokens": self.input_text,
            "audio_tokens": self.input_audio,
        }
        if detailed:
            input_details["image_tokens"] = 0
            input_details["cached_tokens_details"] = {
                "text_tokens": 0,
                "audio_tokens": 0,
                "image_tokens": 0,
            }
        return {
            "total_tokens": self.total_tokens,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "input_token_details": input_details,
            "output_token_details": {
                "text_tokens": self.output_text,
                "audio_tokens": self.output_audio,
            },
        }


def transcription_usage(model: str, audio_ms: float, transcript: str) -> dict[str, Any]:
    """``usage`` of an input-audio transcription: whisper bills by duration, others by tokens."""
    if model.startswith("whisper"):
        return {"type": "duration", "seconds": round(audio_ms / 1000, 3)}
    audio = input_audio_tokens(audio_ms)
    out = text_tokens(transcript)
    return {
        "type": "tokens",
        "input_tokens": audio,
        "output_tokens": out,
        "total_tokens": audio + out,
        "input_token_details": {"text_tokens": 0, "audio_tokens": audio},
    }
