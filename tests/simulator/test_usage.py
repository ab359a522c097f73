"""Token arithmetic and transcript splitting."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relay.simulator.response import split_transcript
from relay.simulator.usage import (
    Usage,
    input_audio_tokens,
    output_audio_tokens,
    text_tokens,
    transcription_usage,
)


def test_rates() -> None:
    assert text_tokens("") == 0 and text_tokens("abcd") == 1 and text_tokens("abcde") == 2
    assert input_audio_tokens(1000) == 10 and input_audio_tokens(1001) == 11
    assert output_audio_tokens(1000) == 20 and output_audio_tokens(0) == 0


def test_totals_are_consistent_in_both_shapes() -> None:
    usage = Usage(input_text=5, input_audio=10, output_text=21, output_audio=56)
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (15, 77, 92)
    ga = usage.to_wire(detailed=True)
    assert ga["total_tokens"] == ga["input_tokens"] + ga["output_tokens"] == 92
    assert ga["input_token_details"]["cached_tokens_details"] == {
        "text_tokens": 0,
        "audio_tokens": 0,
        "image_tokens": 0,
    }
    assert ga["output_token_details"] == {"text_tokens": 21, "audio_tokens": 56}
    beta = usage.to_wire(detailed=False)
    assert set(beta["input_token_details"]) == {"cached_tokens", "text_tokens", "audio_tokens"}


def test_transcription_usage() -> None:
    assert transcription_usage("whisper-1", 1500, "hi") == {"type": "duration", "seconds": 1.5}
    tokens = transcription_usage("gpt-4o-transcribe", 1500, "hello there")
    assert tokens["type"] == "tokens" and tokens["input_tokens"] == 15
    assert tokens["total_tokens"] == tokens["input_tokens"] + tokens["output_tokens"]


@given(st.text())
def test_transcript_pieces_join_back_to_the_text(text: str) -> None:
    pieces = split_transcript(text)
    assert "".join(pieces) == text
    assert all(pieces)
    words = text.split()
    if words:
        assert len(pieces) == len(words)
