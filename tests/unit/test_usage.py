"""Usage blocks to counts by kind, and their cost: every field of protocol.md §9."""

import pytest

from relay.ops.config import PriceTable
from relay.ops.usage import cost_usd, response_tokens, transcription_usage, unsplit_tokens

# gpt-realtime's list prices (protocol.md §9, read 2026-11-30), image cached unknown: 0.
GPT_REALTIME = PriceTable(
    input_text=4, input_cached_text=0.4, input_audio=32, input_cached_audio=0.4, input_image=5,
    output_text=16, output_audio=64,
)  # fmt: skip

GA_USAGE = {
    "total_tokens": 1680,
    "input_tokens": 1200,
    "output_tokens": 480,
    "input_token_details": {
        "text_tokens": 300,
        "audio_tokens": 800,
        "image_tokens": 100,
        "cached_tokens": 700,
        "cached_tokens_details": {"text_tokens": 200, "audio_tokens": 500, "image_tokens": 0},
    },
    "output_token_details": {"text_tokens": 80, "audio_tokens": 400},
}


def test_every_field_of_a_ga_usage_block():
    assert response_tokens(GA_USAGE) == {
        "input_text": 300,
        "input_audio": 800,
        "input_image": 100,
        "input_cached_text": 200,
        "input_cached_audio": 500,
        "input_cached_image": 0,
        "output_text": 80,
        "output_audio": 400,
    }


def test_cached_tokens_without_a_split_count_as_text_first():
    usage = {"input_token_details": {"text_tokens": 50, "audio_tokens": 400, "cached_tokens": 120}}
    counts = response_tokens(usage)
    assert (counts["input_cached_text"], counts["input_cached_audio"]) == (50, 70)


@pytest.mark.parametrize(
    "usage", [{}, {"input_token_details": None}, {"output_token_details": {"text_tokens": -3}}]
)
def test_missing_or_odd_details_count_nothing(usage):
    assert set(response_tokens(usage).values()) == {0}


def test_totals_the_details_leave_out_count_as_text_not_as_nothing():
    """A block with totals only was costed $0 without a word: metering and budgets off."""
    totals = {"total_tokens": 1500, "input_tokens": 1000, "output_tokens": 500}
    counts = response_tokens(totals)
    assert (counts["input_text"], counts["output_text"]) == (1000, 500)
    assert unsplit_tokens(totals) == 1500
    partial = {**GA_USAGE, "output_token_details": None}
    assert response_tokens(partial)["output_text"] == 480 and unsplit_tokens(partial) == 480
    assert unsplit_tokens(GA_USAGE) == 0  # the service's blocks add up


def test_cost_prices_cached_tokens_at_the_cached_rate():
    # text: 100 uncached x 4 + 200 cached x 0.4; audio: 300 x 32 + 500 x 0.4; image 100 x 5;
    # out: 80 x 16 + 400 x 64.
    expected = (400 + 80 + 9600 + 200 + 500 + 1280 + 25600) / 1e6
    assert cost_usd(GPT_REALTIME, response_tokens(GA_USAGE), 0) == pytest.approx(expected)


def test_transcription_by_tokens_and_by_duration():
    tokens = {
        "type": "tokens",
        "input_tokens": 25,
        "output_tokens": 9,
        "total_tokens": 34,
        "input_token_details": {"text_tokens": 5, "audio_tokens": 20},
    }
    assert transcription_usage(tokens) == (
        {"transcription_input_text": 5, "transcription_input_audio": 20,
         "transcription_output_text": 9},
        0.0,
    )  # fmt: skip
    assert transcription_usage({"type": "duration", "seconds": 12.5}) == ({}, 12.5)
    assert transcription_usage({"type": "duration", "seconds": "12"}) == ({}, 0.0)
    # No split given: the input is the audio.
    counts, _ = transcription_usage({"type": "tokens", "input_tokens": 7, "output_tokens": 1})
    assert counts["transcription_input_audio"] == 7
    transcribe = PriceTable(
        transcription_input_audio=6, transcription_input_text=2.5, transcription_output_text=10,
        transcription_per_minute=0.006,
    )  # fmt: skip
    assert cost_usd(transcribe, transcription_usage(tokens)[0], 0) == pytest.approx(
        (20 * 6 + 5 * 2.5 + 9 * 10) / 1e6
    )
    assert cost_usd(transcribe, {}, 90) == pytest.approx(0.009)


def test_negative_prices_are_refused():
    with pytest.raises(ValueError, match="output_audio must be 0 or more"):
        PriceTable(output_audio=-1)


def test_counts_past_what_a_response_can_use_are_not_believed():
    """One crafted `response.done` (counts near 1e19) made a team's estimated spend $9e14,
    closed all its sessions over budget until midnight, and left the counters at 1e19."""
    from relay.ops.usage import implausible

    inflated = {"output_token_details": {"audio_tokens": 10**19, "text_tokens": 12}}
    assert response_tokens(inflated)["output_audio"] == 0
    assert response_tokens(inflated)["output_text"] == 12
    assert implausible(inflated) and implausible({"total_tokens": float("inf")})
    assert not implausible({"total_tokens": 120_000, "input_token_details": {"text_tokens": 9}})
    assert transcription_usage({"type": "duration", "seconds": 1e300}) == ({}, 0.0)
    assert transcription_usage({"type": "duration", "seconds": 90.5}) == ({}, 90.5)
