"""Session defaults, merging and validation (GA and beta shapes)."""

from __future__ import annotations

from typing import Any

import pytest
from openai.types.beta.realtime import SessionCreatedEvent as BetaSessionCreated
from openai.types.realtime import SessionCreatedEvent

from relay.session.schema import merge_session as deep_merge
from relay.simulator.audio import G711_ALAW, G711_ULAW, PCM16
from relay.simulator.errors import ClientEventError
from relay.simulator.schema import BETA, GA
from relay.simulator.session import apply_update, beta_model_name, default_session
from relay.simulator.settings import parse_settings
from relay.simulator.vad import TurnDetection


def ga_session() -> dict[str, Any]:
    return default_session(GA, session_id="sess_1", model="my-deployment", expires_at=1800)


def beta_session() -> dict[str, Any]:
    return default_session(BETA, session_id="sess_1", model="my-deployment", expires_at=1800)


def update_error(dialect: Any, session: dict[str, Any], fragment: Any) -> ClientEventError:
    with pytest.raises(ClientEventError) as caught:
        apply_update(dialect, session, fragment)
    return caught.value


def test_ga_default_session_is_the_documented_shape() -> None:
    session = ga_session()
    assert session["type"] == "realtime" and session["object"] == "realtime.session"
    assert session["model"] == "my-deployment"
    assert session["audio"]["input"]["turn_detection"] == {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 500,
        "create_response": True,
        "interrupt_response": True,
        "idle_timeout_ms": None,
    }
    assert session["audio"]["output"] == {
        "format": {"type": "audio/pcm", "rate": 24000},
        "voice": "alloy",
        "speed": 1.0,
    }
    assert session["max_output_tokens"] == "inf" and session["expires_at"] == 1800
    parsed = SessionCreatedEvent.model_validate(
        {"type": "session.created", "event_id": "event_1", "session": session}
    )
    assert parsed.session.type == "realtime"


def test_beta_default_session_validates_and_names_a_known_model() -> None:
    session = beta_session()
    assert session["modalities"] == ["text", "audio"] and session["input_audio_format"] == "pcm16"
    assert session["turn_detection"]["silence_duration_ms"] == 200
    BetaSessionCreated.model_validate(
        {"type": "session.created", "event_id": "event_1", "session": session}
    )


@pytest.mark.parametrize(
    ("deployment", "model"),
    [
        ("gpt-4o-realtime-preview-2024-12-17", "gpt-4o-realtime-preview-2024-12-17"),
        ("gpt-realtime-prod", "gpt-realtime"),
        ("team-mini", "gpt-4o-mini-realtime-preview"),
        ("anything", "gpt-4o-realtime-preview"),
    ],
)
def test_beta_model_name(deployment: str, model: str) -> None:
    assert beta_model_name(deployment) == model


def test_default_settings() -> None:
    settings = parse_settings(GA, ga_session())
    assert settings.voice == "alloy" and settings.audio_output
    assert settings.max_output_tokens is None and settings.transcription_model is None
    assert settings.input_format is PCM16 and settings.output_format is PCM16
    assert settings.turn_detection == TurnDetection(silence_duration_ms=500)
    assert parse_settings(BETA, beta_session()).turn_detection == TurnDetection(
        silence_duration_ms=200
    )


@pytest.mark.parametrize(
    ("base", "patch", "merged"),
    [
        ({"a": 1, "b": {"c": 2, "d": 3}}, {"b": {"c": 4}}, {"a": 1, "b": {"c": 4, "d": 3}}),
        ({"a": {"b": 1}}, {"a": None}, {"a": None}),
        ({"a": None}, {"a": {"b": 1}}, {"a": {"b": 1}}),
        ({"tools": [1, 2]}, {"tools": [3]}, {"tools": [3]}),
        (
            {"td": {"type": "server_vad", "threshold": 0.5}},
            {"td": {"type": "semantic_vad"}},
            {"td": {"type": "semantic_vad"}},
        ),
        (
            {"td": {"type": "server_vad", "threshold": 0.5}},
            {"td": {"type": "server_vad", "silence_duration_ms": 9}},
            {"td": {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 9}},
        ),
    ],
)
def test_deep_merge(base: dict[str, Any], patch: dict[str, Any], merged: dict[str, Any]) -> None:
    before = repr(base)
    assert deep_merge(base, patch) == merged
    assert repr(base) == before


def test_ga_update_merges_and_fills_turn_detection_defaults() -> None:
    session, settings = apply_update(
        GA,
        ga_session(),
        {
            "type": "realtime",
            "instructions": "Be brief.",
            "audio": {
                "input": {
                    "transcription": {"model": "gpt-4o-transcribe"},
                    "turn_detection": {"type": "semantic_vad", "eagerness": "high"},
                },
                "output": {"voice": "marin"},
            },
        },
    )
    assert session["instructions"] == "Be brief."
    assert session["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert session["audio"]["input"]["turn_detection"] == {
        "type": "semantic_vad",
        "eagerness": "high",
        "create_response": True,
        "interrupt_response": True,
    }
    assert settings.voice == "marin" and settings.transcription_model == "gpt-4o-transcribe"
    assert settings.turn_detection == TurnDetection(silence_duration_ms=400)
    assert session["model"] == "my-deployment"


def test_ga_update_can_disable_turn_detection_and_use_g711() -> None:
    _, settings = apply_update(
        GA,
        ga_session(),
        {
            "type": "realtime",
            "output_modalities": ["text"],
            "max_output_tokens": 300,
            "audio": {
                "input": {"turn_detection": None, "format": {"type": "audio/pcmu"}},
                "output": {"format": {"type": "audio/pcma"}, "voice": {"id": "voice_custom"}},
            },
        },
    )
    assert settings.turn_detection is None and not settings.audio_output
    assert settings.max_output_tokens == 300 and settings.voice == "voice_custom"
    assert settings.input_format is G711_ULAW and settings.output_format is G711_ALAW


def test_read_only_fields_are_ignored() -> None:
    session = ga_session()
    updated, _ = apply_update(
        GA, session, {"type": "realtime", "id": "sess_other", "model": "x", "expires_at": 1}
    )
    assert updated == session


GA_ERRORS = [
    ({"instructions": "x"}, "missing_required_parameter", "session.type"),
    ({"type": "transcription"}, "invalid_value", "session.type"),
    ({"type": "conversation"}, "invalid_value", "session.type"),
    ({"type": "realtime", "modalities": ["text"]}, "unknown_parameter", "session.modalities"),
    ({"type": "realtime", "voice": "alloy"}, "unknown_parameter", "session.voice"),
    ({"type": "realtime", "temperature": 0.8}, "unknown_parameter", "session.temperature"),
    (
        {"type": "realtime", "audio": {"input": {"pitch": 1}}},
        "unknown_parameter",
        "session.audio.input.pitch",
    ),
    (
        {"type": "realtime", "audio": {"output": {"voice": "nova"}}},
        "invalid_value",
        "session.audio.output.voice",
    ),
    ({"type": "realtime", "max_output_tokens": 0}, "invalid_value", "session.max_output_tokens"),
    ({"type": "realtime", "max_output_tokens": 4097}, "invalid_value", "session.max_output_tokens"),
    (
        {"type": "realtime", "max_output_tokens": "lots"},
        "invalid_value",
        "session.max_output_tokens",
    ),
    ({"type": "realtime", "max_output_tokens": True}, "invalid_value", "session.max_output_tokens"),
    (
        {"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}},
        "invalid_value",
        "session.audio.input.format.rate",
    ),
    (
        {"type": "realtime", "audio": {"output": {"format": {"type": "audio/wav"}}}},
        "invalid_value",
        "session.audio.output.format.type",
    ),
    (
        {"type": "realtime", "output_modalities": ["audio", "text"]},
        "invalid_value",
        "session.output_modalities",
    ),
    (
        {
            "type": "realtime",
            "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 2}}},
        },
        "invalid_value",
        "session.audio.input.turn_detection.threshold",
    ),
    (
        {"type": "realtime", "audio": {"input": {"turn_detection": {"type": "push_to_talk"}}}},
        "invalid_value",
        "session.audio.input.turn_detection.type",
    ),
    (
        {"type": "realtime", "audio": {"output": {"speed": 3}}},
        "invalid_value",
        "session.audio.output.speed",
    ),
    ({"type": "realtime", "instructions": 7}, "invalid_type", "session.instructions"),
    ({"type": "realtime", "audio": "loud"}, "invalid_type", "session.audio"),
    ({"type": "realtime", "tools": {}}, "invalid_type", "session.tools"),
    ({"type": "realtime", "tool_choice": "sometimes"}, "invalid_value", "session.tool_choice"),
]


@pytest.mark.parametrize(("fragment", "code", "param"), GA_ERRORS)
def test_ga_update_errors(fragment: dict[str, Any], code: str, param: str) -> None:
    error = update_error(GA, ga_session(), fragment)
    assert (error.code, error.param) == (code, param)
    assert error.message


@pytest.mark.parametrize("fragment", [None, [], "realtime", 3])
def test_session_must_be_an_object(fragment: Any) -> None:
    error = update_error(GA, ga_session(), fragment)
    assert (error.code, error.param) == ("invalid_type", "session")


def test_beta_update() -> None:
    _, settings = apply_update(
        BETA,
        beta_session(),
        {
            "modalities": ["audio", "text"],
            "voice": "verse",
            "input_audio_format": "g711_alaw",
            "input_audio_transcription": {"model": "whisper-1"},
            "turn_detection": None,
            "temperature": 0.7,
            "max_response_output_tokens": 1000,
        },
    )
    assert settings.audio_output and settings.voice == "verse" and settings.temperature == 0.7
    assert settings.input_format is G711_ALAW and settings.turn_detection is None
    assert settings.transcription_model == "whisper-1" and settings.max_output_tokens == 1000


BETA_ERRORS = [
    ({"type": "realtime"}, "unknown_parameter", "session.type"),
    ({"output_modalities": ["audio"]}, "unknown_parameter", "session.output_modalities"),
    ({"modalities": ["audio"]}, "invalid_value", "session.modalities"),
    ({"voice": "nova"}, "invalid_value", "session.voice"),
    ({"temperature": 2.0}, "invalid_value", "session.temperature"),
    ({"input_audio_format": "pcm24"}, "invalid_value", "session.input_audio_format"),
    ({"max_response_output_tokens": -1}, "invalid_value", "session.max_response_output_tokens"),
]


@pytest.mark.parametrize(("fragment", "code", "param"), BETA_ERRORS)
def test_beta_update_errors(fragment: dict[str, Any], code: str, param: str) -> None:
    error = update_error(BETA, beta_session(), fragment)
    assert (error.code, error.param) == (code, param)


# --- as strict as Azure, no stricter (found by validating against the SDK's models) --------


def test_beta_forced_function_tool_choice_in_both_forms_is_taken() -> None:
    """The beta SDK documents `{"type": "function", "function": {"name"}}`; LiveKit's preview
    mode sends the flat `{"type": "function", "name"}`. Both were refused."""
    for choice in (
        {"type": "function", "function": {"name": "f"}},
        {"type": "function", "name": "f"},
    ):
        apply_update(BETA, beta_session(), {"tool_choice": choice})
    error = update_error(BETA, beta_session(), {"tool_choice": {"type": "function"}})
    assert (error.code, error.param) == ("missing_required_parameter", "session.tool_choice.name")


def test_beta_turn_detection_has_no_idle_timeout() -> None:
    """`idle_timeout_ms` is GA's; a preview session took and echoed it."""
    fragment = {"turn_detection": {"type": "server_vad", "idle_timeout_ms": 6000}}
    error = update_error(BETA, beta_session(), fragment)
    assert (error.code, error.param) == (
        "unknown_parameter",
        "session.turn_detection.idle_timeout_ms",
    )
    ga = {"type": "realtime", "audio": {"input": {"turn_detection": fragment["turn_detection"]}}}
    apply_update(GA, ga_session(), ga)


def test_prompt_variables_may_be_responses_inputs() -> None:
    variables = {"name": "Ada", "photo": {"type": "input_image", "image_url": "data:,"},
                 "intro": {"type": "input_text", "text": "Hello"}}  # fmt: skip
    apply_update(
        GA, ga_session(), {"type": "realtime", "prompt": {"id": "p", "variables": variables}}
    )
    error = update_error(
        GA,
        ga_session(),
        {"type": "realtime", "prompt": {"id": "p", "variables": {"x": {"type": "x"}}}},
    )
    assert (error.code, error.param) == ("invalid_value", "session.prompt.variables.x.type")


def test_a_preview_transcription_session_takes_modalities() -> None:
    """The beta SDK's transcription session has `modalities`; it was refused as unknown."""
    from relay.simulator.transcription import (
        apply_transcription_update,
        default_transcription_session,
    )

    session = default_transcription_session(BETA, session_id="sess_1", expires_at=1800)
    merged, _ = apply_transcription_update(BETA, session, {"modalities": ["text"]})
    assert merged["modalities"] == ["text"]
