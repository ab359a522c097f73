"""``response.create`` parameters: per-response overrides of the session settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from relay.simulator import validate as v
from relay.simulator.audio import AudioFormat
from relay.simulator.checks import check_tools
from relay.simulator.errors import ClientEventError, invalid_type
from relay.simulator.schema import Dialect
from relay.simulator.settings import (
    SessionSettings,
    parse_beta_format,
    parse_beta_modalities,
    parse_ga_format,
    parse_ga_modalities,
    parse_voice,
)

_GA_KEYS = frozenset(
    {
        "audio",
        "conversation",
        "input",
        "instructions",
        "max_output_tokens",
        "metadata",
        "output_modalities",
        "parallel_tool_calls",
        "prompt",
        "reasoning",
        "tool_choice",
        "tools",
    }
)
_BETA_KEYS = frozenset(
    {
        "conversation",
        "input",
        "instructions",
        "max_response_output_tokens",
        "metadata",
        "modalities",
        "output_audio_format",
        "temperature",
        "tool_choice",
        "tools",
        "voice",
    }
)
_MAX_METADATA_PAIRS = 16


@dataclass(frozen=True, slots=True)
class ResponseParams:
    """The effective configuration of one response."""

    audio_output: bool
    instructions: str
    max_output_tokens: int | None
    voice: str
    output_format: AudioFormat
    temperature: float | None
    metadata: dict[str, str] | None = None
    # ``conversation: "none"``: the output is not added to the default conversation.
    out_of_band: bool = False
    # Explicit ``input`` items replacing the conversation as context (raw, unresolved).
    input_items: tuple[Any, ...] | None = None
    tools: tuple[Any, ...] = ()
    tool_choice: Any = "auto"


def defaults_from(session: SessionSettings) -> ResponseParams:
    """Parameters of a response created without overrides (e.g. by server VAD)."""
    return ResponseParams(
        audio_output=session.audio_output,
        instructions=session.instructions,
        max_output_tokens=session.max_output_tokens,
        voice=session.voice,
        output_format=session.output_format,
        temperature=session.temperature,
        tools=session.tools,
        tool_choice=session.tool_choice,
    )


def parse_response_params(dialect: Dialect, raw: Any, session: SessionSettings) -> ResponseParams:
    """Apply ``response.create``'s ``response`` object over the session defaults.

    Raises:
        ClientEventError: an override the service would reject.
    """
    base = defaults_from(session)
    if raw is None:
        return base
    given = v.obj(raw, "response")
    v.check_keys(given, _GA_KEYS if dialect.is_ga else _BETA_KEYS, "response")
    # A null leaves the field unset: the session's value applies (LiveKit sends
    # `"instructions": null`).
    overrides = _without_nulls(given)
    if "tools" in overrides or "tool_choice" in overrides:
        check_tools(dialect, overrides, "response")
    common = _parse_common(overrides)
    if dialect.is_ga:
        specific = _parse_ga(overrides)
    else:
        specific = _parse_beta(overrides)
    return replace(base, **common, **specific)


def _without_nulls(overrides: Mapping[str, Any]) -> dict[str, Any]:
    kept = {key: value for key, value in overrides.items() if value is not None}
    audio = kept.get("audio")
    if isinstance(audio, dict) and isinstance(audio.get("output"), dict):
        output = {k: v for k, v in audio["output"].items() if v is not None}
        kept["audio"] = {**audio, "output": output}
    return kept


def _parse_common(overrides: Mapping[str, Any]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    if "tools" in overrides:
        parsed["tools"] = tuple(overrides["tools"])
    if "tool_choice" in overrides:
        parsed["tool_choice"] = overrides["tool_choice"]
    if "instructions" in overrides:
        parsed["instructions"] = v.string(overrides["instructions"], "response.instructions")
    if "conversation" in overrides:
        conversation = v.choice(
            overrides["conversation"], "response.conversation", ("auto", "none")
        )
        parsed["out_of_band"] = conversation == "none"
    if overrides.get("metadata") is not None:
        parsed["metadata"] = parse_metadata(overrides["metadata"], "response.metadata")
    if "input" in overrides:
        items = overrides["input"]
        if not isinstance(items, list):
            raise invalid_type("response.input", "an array", items)
        parsed["input_items"] = tuple(items)
    return parsed


def _parse_ga(overrides: Mapping[str, Any]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    if "output_modalities" in overrides:
        parsed["audio_output"] = parse_ga_modalities(
            overrides["output_modalities"], "response.output_modalities"
        )
    if "max_output_tokens" in overrides:
        parsed["max_output_tokens"] = v.max_tokens(
            overrides["max_output_tokens"], "response.max_output_tokens"
        )
    if "audio" in overrides:
        audio = v.obj(overrides["audio"], "response.audio")
        v.check_keys(audio, ("output",), "response.audio")
        out = v.obj(audio.get("output", {}), "response.audio.output")
        v.check_keys(out, ("format", "voice"), "response.audio.output")
        if "voice" in out:
            parsed["voice"] = parse_voice(out["voice"], "response.audio.output.voice")
        if out.get("format") is not None:
            parsed["output_format"] = parse_ga_format(out["format"], "response.audio.output.format")
    return parsed


def _parse_beta(overrides: Mapping[str, Any]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    if "modalities" in overrides:
        parsed["audio_output"] = parse_beta_modalities(
            overrides["modalities"], "response.modalities"
        )
    if "max_response_output_tokens" in overrides:
        parsed["max_output_tokens"] = v.max_tokens(
            overrides["max_response_output_tokens"], "response.max_response_output_tokens"
        )
    if "voice" in overrides:
        parsed["voice"] = parse_voice(overrides["voice"], "response.voice")
    if "output_audio_format" in overrides:
        parsed["output_format"] = parse_beta_format(
            overrides["output_audio_format"], "response.output_audio_format"
        )
    if "temperature" in overrides:
        parsed["temperature"] = v.number(overrides["temperature"], "response.temperature", 0.6, 1.2)
    return parsed


def parse_metadata(value: Any, param: str) -> dict[str, str]:
    """At most 16 pairs; keys up to 64 characters, string values up to 512."""
    metadata = v.obj(value, param)
    if len(metadata) > _MAX_METADATA_PAIRS:
        raise ClientEventError(
            "invalid_value",
            f"Invalid '{param}': too many properties. Expected an object with at most "
            f"{_MAX_METADATA_PAIRS} properties, but got {len(metadata)} instead.",
            param,
        )
    for key, item in metadata.items():
        if len(key) > 64:
            raise ClientEventError(
                "invalid_value",
                f"Invalid '{param}': key too long. Expected at most 64 characters.",
                f"{param}.{key[:64]}",
            )
        if not isinstance(item, str) or len(item) > 512:
            raise ClientEventError(
                "invalid_value",
                f"Invalid '{param}.{key}': expected a string of at most 512 characters.",
                f"{param}.{key}",
            )
    return dict(metadata)
