"""Effective settings of a session, parsed (and validated) out of its dialect's wire shape.

``SessionSettings`` is what the engine acts on, the same for GA and beta sessions; the
``parse_*`` helpers are shared with ``response.create`` parameters (``params.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from relay.simulator import validate as v
from relay.simulator.audio import AudioFormat
from relay.simulator.checks import check_noise_reduction, check_passthrough, check_transcription
from relay.simulator.errors import ClientEventError, invalid_type, invalid_value
from relay.simulator.schema import BETA, BETA_FORMATS, GA, GA_FORMAT_TYPES, Dialect
from relay.simulator.vad import TurnDetection

VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
_VAD_KEYS = {
    "server_vad": frozenset(
        {
            "type",
            "threshold",
            "prefix_padding_ms",
            "silence_duration_ms",
            "create_response",
            "interrupt_response",
            "idle_timeout_ms",
        }
    ),
    "semantic_vad": frozenset({"type", "eagerness", "create_response", "interrupt_response"}),
}
_EAGERNESS_SILENCE_MS = {"low": 1500, "medium": 800, "auto": 800, "high": 400}


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """What the engine needs from a session, whatever the dialect."""

    instructions: str
    voice: str
    audio_output: bool
    max_output_tokens: int | None
    input_format: AudioFormat
    output_format: AudioFormat
    turn_detection: TurnDetection | None
    transcription_model: str | None
    temperature: float | None
    # Validated by `check_passthrough`; the model may call the function tools.
    tools: tuple[Any, ...] = ()
    tool_choice: Any = "auto"


def parse_settings(dialect: Dialect, session: Mapping[str, Any]) -> SessionSettings:
    """Read the effective settings out of a dialect-shaped session.

    Raises:
        ClientEventError: a value the service would reject.
    """
    if dialect.is_ga:
        return _parse_ga(session)
    return _parse_beta(session)


def _parse_ga(session: Mapping[str, Any]) -> SessionSettings:
    audio = v.obj(session.get("audio", {}), "session.audio")
    inp = v.obj(audio.get("input", {}), "session.audio.input")
    out = v.obj(audio.get("output", {}), "session.audio.output")
    check_passthrough(GA, session)
    v.number(out.get("speed", 1.0), "session.audio.output.speed", 0.25, 1.5)
    check_noise_reduction(GA, inp.get("noise_reduction"), "session.audio.input.noise_reduction")
    return SessionSettings(
        instructions=v.string(session.get("instructions", ""), "session.instructions"),
        voice=parse_voice(out.get("voice", "alloy"), "session.audio.output.voice"),
        audio_output=parse_ga_modalities(
            session.get("output_modalities", ["audio"]), "session.output_modalities"
        ),
        max_output_tokens=v.max_tokens(
            session.get("max_output_tokens", "inf"), "session.max_output_tokens"
        ),
        input_format=parse_ga_format(inp.get("format"), "session.audio.input.format"),
        output_format=parse_ga_format(out.get("format"), "session.audio.output.format"),
        turn_detection=_parse_turn_detection(
            inp.get("turn_detection"), "session.audio.input.turn_detection", ga=True
        ),
        transcription_model=check_transcription(
            GA, inp.get("transcription"), "session.audio.input.transcription"
        ),
        temperature=None,
        tools=tuple(session.get("tools") or ()),
        tool_choice=session.get("tool_choice") or "auto",
    )


def _parse_beta(session: Mapping[str, Any]) -> SessionSettings:
    check_passthrough(BETA, session)
    v.number(session.get("speed", 1.0), "session.speed", 0.25, 1.5)
    check_noise_reduction(
        BETA, session.get("input_audio_noise_reduction"), "session.input_audio_noise_reduction"
    )
    return SessionSettings(
        instructions=v.string(session.get("instructions", ""), "session.instructions"),
        voice=parse_voice(session.get("voice", "alloy"), "session.voice"),
        audio_output=parse_beta_modalities(session.get("modalities"), "session.modalities"),
        max_output_tokens=v.max_tokens(
            session.get("max_response_output_tokens", "inf"), "session.max_response_output_tokens"
        ),
        input_format=parse_beta_format(
            session.get("input_audio_format", "pcm16"), "session.input_audio_format"
        ),
        output_format=parse_beta_format(
            session.get("output_audio_format", "pcm16"), "session.output_audio_format"
        ),
        turn_detection=_parse_turn_detection(
            session.get("turn_detection"), "session.turn_detection", ga=False
        ),
        transcription_model=check_transcription(
            BETA, session.get("input_audio_transcription"), "session.input_audio_transcription"
        ),
        temperature=v.number(session.get("temperature", 0.8), "session.temperature", 0.6, 1.2),
        tools=tuple(session.get("tools") or ()),
        tool_choice=session.get("tool_choice") or "auto",
    )


def parse_voice(value: Any, param: str) -> str:
    """A built-in voice name, or a custom voice ``{"id": …}`` (GA)."""
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return str(value["id"])
    return v.choice(value, param, VOICES)


def parse_ga_modalities(value: Any, param: str) -> bool:
    """True for ``["audio"]`` (audio plus transcript), False for ``["text"]``."""
    if value == ["audio"]:
        return True
    if value == ["text"]:
        return False
    if not isinstance(value, list):
        raise invalid_type(param, "an array", value)
    raise invalid_value(param, value, ("audio", "text"))


def parse_beta_modalities(value: Any, param: str) -> bool:
    """True for ``["text", "audio"]`` in any order, False for ``["text"]``."""
    if not isinstance(value, list):
        raise invalid_type(param, "an array", value)
    if value in (["text", "audio"], ["audio", "text"]):
        return True
    if value == ["text"]:
        return False
    raise ClientEventError(
        "invalid_value",
        f"Invalid modalities: {value}. Supported combinations are: ['text'] and ['audio', 'text'].",
        param,
    )


def parse_ga_format(value: Any, param: str) -> AudioFormat:
    if value is None:
        return GA_FORMAT_TYPES["audio/pcm"]
    fmt = v.obj(value, param)
    v.check_keys(fmt, ("type", "rate"), param)
    kind = v.choice(fmt.get("type"), f"{param}.type", tuple(GA_FORMAT_TYPES))
    if "rate" in fmt and (kind != "audio/pcm" or fmt["rate"] != 24000):
        raise invalid_value(f"{param}.rate", fmt["rate"], ("24000",))
    return GA_FORMAT_TYPES[kind]


def parse_beta_format(value: Any, param: str) -> AudioFormat:
    return BETA_FORMATS[v.choice(value, param, tuple(BETA_FORMATS))]


def _parse_turn_detection(value: Any, param: str, *, ga: bool) -> TurnDetection | None:
    if value is None:
        return None
    td = v.obj(value, param)
    kind = v.choice(td.get("type"), f"{param}.type", tuple(_VAD_KEYS))
    # `idle_timeout_ms` is GA's: the preview session has no such field.
    v.check_keys(td, _VAD_KEYS[kind] if ga else _VAD_KEYS[kind] - {"idle_timeout_ms"}, param)
    create = v.boolean(td.get("create_response", True), f"{param}.create_response")
    interrupt = v.boolean(td.get("interrupt_response", True), f"{param}.interrupt_response")
    if kind == "semantic_vad":
        eagerness = v.choice(
            td.get("eagerness", "auto"), f"{param}.eagerness", tuple(_EAGERNESS_SILENCE_MS)
        )
        return TurnDetection(
            silence_duration_ms=_EAGERNESS_SILENCE_MS[eagerness],
            create_response=create,
            interrupt_response=interrupt,
        )
    if td.get("idle_timeout_ms") is not None:
        v.integer(td["idle_timeout_ms"], f"{param}.idle_timeout_ms", 5000, 30000)
    return TurnDetection(
        threshold=v.number(td.get("threshold", 0.5), f"{param}.threshold", 0.0, 1.0),
        prefix_padding_ms=v.integer(
            td.get("prefix_padding_ms", 300), f"{param}.prefix_padding_ms", 0, 10_000
        ),
        silence_duration_ms=v.integer(
            td.get("silence_duration_ms", 500), f"{param}.silence_duration_ms", 0, 10_000
        ),
        create_response=create,
        interrupt_response=interrupt,
    )
