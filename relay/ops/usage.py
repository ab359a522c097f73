"""Usage blocks to counts by kind, and what they cost by a deployment's price table. Pure.

Kinds (the `kind` label of relay_tokens_total) follow the service's usage fields to the last
one. Input counts per modality include the cached tokens, as the service reports them;
`input_cached_*` say how many of those were cached (billed at the cached rate):

- `response.done`: input_text, input_audio, input_image, input_cached_text,
  input_cached_audio, input_cached_image, output_text, output_audio;
- input audio transcription billed by tokens: transcription_input_text,
  transcription_input_audio, transcription_output_text; billed by duration: seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from relay.ops.config import PriceTable

_MODALITIES = ("text", "audio", "image")
_PER_TOKEN = 1e-6  # prices are per million tokens
# Counts past these are not believed (counted as 0, and logged by the meter): a realtime
# response reads at most its context window (128k tokens) and a transcription at most a
# session's audio. One crafted `response.done` would otherwise exhaust a team's budget
# (its estimated cost $9e14) and leave the counters at 1e19 for good.
MAX_TOKENS = 10_000_000
MAX_TRANSCRIPTION_SECONDS = 4 * 3600.0


def response_tokens(usage: Mapping[str, Any]) -> dict[str, int]:
    """Token counts by kind from a `response.done` usage block. Input or output tokens its
    details leave out (a block with totals only) are counted as text: counted at the lowest
    rate, not at none (see `unsplit_tokens`)."""
    counts = _split(usage)
    unsplit_in, unsplit_out = _unsplit(usage, counts)
    counts["input_text"] += unsplit_in
    counts["output_text"] += unsplit_out
    return counts


def unsplit_tokens(usage: Mapping[str, Any]) -> int:
    """Tokens a `response.done` usage block counts in its totals and not in its details (the
    service gives both, adding up): the meter logs them."""
    return sum(_unsplit(usage, _split(usage)))


def _split(usage: Mapping[str, Any]) -> dict[str, int]:
    """The counts a usage block's details give, by kind."""
    din = _mapping(usage.get("input_token_details"))
    dout = _mapping(usage.get("output_token_details"))
    counts = {f"input_{m}": _int(din.get(f"{m}_tokens")) for m in _MODALITIES}
    cached = _cached_by_modality(din, counts)
    counts |= {f"input_cached_{m}": cached[m] for m in _MODALITIES}
    counts["output_text"] = _int(dout.get("text_tokens"))
    counts["output_audio"] = _int(dout.get("audio_tokens"))
    return counts


def _unsplit(usage: Mapping[str, Any], counts: Mapping[str, int]) -> tuple[int, int]:
    split_in = sum(counts[f"input_{m}"] for m in _MODALITIES)
    split_out = counts["output_text"] + counts["output_audio"]
    return (
        max(0, _int(usage.get("input_tokens")) - split_in),
        max(0, _int(usage.get("output_tokens")) - split_out),
    )


def _cached_by_modality(details: Mapping[str, Any], counts: Mapping[str, int]) -> dict[str, int]:
    """Cached tokens per modality, from `cached_tokens_details`. Without it (the preview
    protocol), `cached_tokens` is taken as text first (a cached prefix starts with the
    instructions), the rest as audio: never more than the modality's own count."""
    split = details.get("cached_tokens_details")
    if isinstance(split, Mapping):
        return {m: _int(split.get(f"{m}_tokens")) for m in _MODALITIES}
    left = _int(details.get("cached_tokens"))
    cached = {}
    for m in _MODALITIES:
        cached[m] = min(left, counts[f"input_{m}"])
        left -= cached[m]
    return cached


def transcription_usage(usage: Mapping[str, Any]) -> tuple[dict[str, int], float]:
    """(token counts by kind, seconds billed by duration) of a transcription's usage."""
    if usage.get("type") == "duration":
        seconds = usage.get("seconds")
        if (
            isinstance(seconds, int | float)
            and not isinstance(seconds, bool)
            and 0 < seconds <= MAX_TRANSCRIPTION_SECONDS
        ):
            return {}, float(seconds)
        return {}, 0.0
    details = usage.get("input_token_details")
    if isinstance(details, Mapping):
        text, audio = _int(details.get("text_tokens")), _int(details.get("audio_tokens"))
    else:  # no split given: a transcription's input is its audio
        text, audio = 0, _int(usage.get("input_tokens"))
    counts = {
        "transcription_input_text": text,
        "transcription_input_audio": audio,
        "transcription_output_text": _int(usage.get("output_tokens")),
    }
    return counts, 0.0


def cost_usd(prices: PriceTable, tokens: Mapping[str, int], transcription_seconds: float) -> float:
    """Estimated cost of these counts: uncached input at the input rate, cached at the cached
    rate, output and transcription at theirs."""
    total = transcription_seconds / 60 * prices.transcription_per_minute
    per_token = 0.0
    for m in _MODALITIES:
        cached = min(tokens.get(f"input_cached_{m}", 0), tokens.get(f"input_{m}", 0))
        per_token += (tokens.get(f"input_{m}", 0) - cached) * getattr(prices, f"input_{m}")
        per_token += cached * getattr(prices, f"input_cached_{m}")
    for kind in (
        "output_text", "output_audio", "transcription_input_text",
        "transcription_input_audio", "transcription_output_text",
    ):  # fmt: skip
        per_token += tokens.get(kind, 0) * getattr(prices, kind)
    return total + per_token * _PER_TOKEN


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def implausible(usage: Any) -> bool:
    """Whether a usage block holds a count past what a response or transcription can use."""
    if isinstance(usage, Mapping):
        return any(implausible(value) for value in usage.values())
    if isinstance(usage, int | float) and not isinstance(usage, bool):
        return not usage <= MAX_TOKENS  # inf and nan too
    return False


def _int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_TOKENS:
        return value
    return 0
