"""Transcription-only sessions (``intent=transcription``): their session shape and updates.

GA: the session is ``{"type": "transcription", "audio": {"input": {...}}, "include": ...}``
and is changed by ``session.update`` with ``session.type = "transcription"``. Preview: the
session has the beta input fields and is changed by ``transcription_session.update``; the
service answers ``transcription_session.created``/``.updated``. Committed audio is
transcribed (``conversation.item.input_audio_transcription.delta``/``.completed`` with
usage); no response is ever generated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from relay.session.schema import merge_session
from relay.simulator import validate as v
from relay.simulator.errors import ClientEventError, missing
from relay.simulator.schema import Dialect
from relay.simulator.settings import SessionSettings, parse_settings

_READ_ONLY = frozenset({"id", "object", "expires_at", "client_secret"})
_GA_KEYS = frozenset({"type", "audio", "include"}) | _READ_ONLY
_GA_INPUT_KEYS = ("format", "noise_reduction", "transcription", "turn_detection")
_BETA_KEYS = (
    frozenset(
        {
            "input_audio_format",
            "input_audio_noise_reduction",
            "input_audio_transcription",
            "turn_detection",
            "include",
            "modalities",
        }
    )
    | _READ_ONLY
)
# Client events a transcription session refuses: there is no model to respond.
REFUSED_EVENTS = frozenset(
    {
        "response.create",
        "response.cancel",
        "conversation.item.create",
        "conversation.item.retrieve",
        "conversation.item.truncate",
        "conversation.item.delete",
        "output_audio_buffer.clear",
    }
)


def update_event(dialect: Dialect) -> str:
    """The client event that changes a transcription session."""
    return "session.update" if dialect.is_ga else "transcription_session.update"


def server_event(dialect: Dialect, what: str) -> str:
    """``created``/``updated``: the service's name for the event in this dialect."""
    return f"session.{what}" if dialect.is_ga else f"transcription_session.{what}"


def default_transcription_session(
    dialect: Dialect, *, session_id: str, expires_at: int
) -> dict[str, Any]:
    vad = {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 500 if dialect.is_ga else 200,
    }
    if dialect.is_ga:
        return {
            "type": "transcription",
            "object": "realtime.transcription_session",
            "id": session_id,
            "expires_at": expires_at,
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": None,
                    "noise_reduction": None,
                    "turn_detection": vad,
                }
            },
            "include": None,
        }
    return {
        "id": session_id,
        "object": "realtime.transcription_session",
        "expires_at": expires_at,
        "input_audio_format": "pcm16",
        "input_audio_transcription": None,
        "input_audio_noise_reduction": None,
        "turn_detection": vad,
        "include": None,
    }


def apply_transcription_update(
    dialect: Dialect, session: Mapping[str, Any], fragment: Any
) -> tuple[dict[str, Any], SessionSettings]:
    """Validate an update of a transcription session; the new session and its settings."""
    patch = v.obj(fragment, "session")
    if dialect.is_ga:
        if "type" not in patch:
            raise missing("session.type")
        if patch["type"] != "transcription":
            raise ClientEventError(
                "invalid_value",
                "Cannot update a transcription session to a realtime session.",
                "session.type",
            )
        v.check_keys(patch, _GA_KEYS, "session")
        audio = patch.get("audio")
        if audio is not None:
            v.check_keys(v.obj(audio, "session.audio"), ("input",), "session.audio")
            if audio.get("input") is not None:
                inp = v.obj(audio["input"], "session.audio.input")
                v.check_keys(inp, _GA_INPUT_KEYS, "session.audio.input")
    else:
        v.check_keys(patch, _BETA_KEYS, "session")
    patch = {k: value for k, value in patch.items() if k not in _READ_ONLY}
    merged = merge_session(session, patch)
    return merged, transcription_settings(dialect, merged)


def transcription_settings(dialect: Dialect, session: Mapping[str, Any]) -> SessionSettings:
    """The engine's settings: a transcription session read as a text-only realtime one."""
    if dialect.is_ga:
        view = {k: value for k, value in session.items() if k != "include"}
        view["output_modalities"] = ["text"]
    else:
        view = {k: value for k, value in session.items() if k != "include"}
        view["modalities"] = ["text"]
    return parse_settings(dialect, view)
