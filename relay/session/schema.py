"""GA and preview session shapes: one policy definition, two wire dialects. Pure.

Policies and defaults are written once, in GA field names (`audio.output.voice`,
`max_output_tokens`, ...). For a preview deployment they are translated here into the
preview names (`voice`, `max_response_output_tokens`, ...), once, at start-up.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

# GA path -> preview key (the preview session is flat where GA nests under `audio`).
GA_TO_PREVIEW: dict[str, str] = {
    "audio.input.format": "input_audio_format",
    "audio.input.transcription": "input_audio_transcription",
    "audio.input.noise_reduction": "input_audio_noise_reduction",
    "audio.input.turn_detection": "turn_detection",
    "audio.output.format": "output_audio_format",
    "audio.output.voice": "voice",
    "audio.output.speed": "speed",
    "max_output_tokens": "max_response_output_tokens",
    "output_modalities": "modalities",
}
FORMAT_TO_PREVIEW = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}
# The only PCM rate either dialect takes; the preview name `pcm16` implies it.
PCM_RATE = 24000

# Server event renames (migration guide): GA name -> preview name. `conversation.item.done`
# has no preview counterpart; the preview `conversation.item.created` is GA's `added`.
EVENT_TO_PREVIEW: dict[str, str] = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "conversation.item.added": "conversation.item.created",
}
# Content part types of assistant messages: GA -> preview.
CONTENT_TO_PREVIEW: dict[str, str] = {"output_audio": "audio", "output_text": "text"}
_MISSING = object()


def get_path(tree: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    """(present, value) of a dotted path. A non-table on the way counts as present: setting
    `audio` to null does change `audio.output.voice`."""
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return True, None
        node = node.get(part, _MISSING)
        if node is _MISSING:
            return False, None
    return True, node


def set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def merge_session(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """``patch`` over a copy of ``base`` as the service merges a session update: tables merge
    key by key, except one whose ``type`` changes (a turn-detection mode), which is replaced;
    everything else replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in patch.items():
        old = merged.get(key)
        if (
            isinstance(value, Mapping)
            and isinstance(old, Mapping)
            and value.get("type", old.get("type")) == old.get("type")
        ):
            merged[key] = merge_session(old, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def preview_path(ga_path: str, table: Mapping[str, str] = GA_TO_PREVIEW) -> str:
    """The preview name of a GA dotted path (`audio.input.transcription.model` ->
    `input_audio_transcription.model`)."""
    for ga, preview in table.items():
        if ga_path == ga or ga_path.startswith(ga + "."):
            return preview + ga_path[len(ga) :]
    return ga_path


def ga_path(preview: str, table: Mapping[str, str] = GA_TO_PREVIEW) -> str:
    """The GA dotted path of a preview name (`input_audio_transcription.model` ->
    `audio.input.transcription.model`); the inverse of `preview_path`."""
    for ga, flat in table.items():
        if preview == flat or preview.startswith(flat + "."):
            return ga + preview[len(flat) :]
    return preview


def preview_value(ga_path: str, value: Any) -> Any:
    if ga_path in ("audio.input.format", "audio.output.format") and isinstance(value, Mapping):
        return FORMAT_TO_PREVIEW.get(str(value.get("type")), value.get("type"))
    if ga_path == "output_modalities" and isinstance(value, list):
        return ["text", "audio"] if "audio" in value else list(value)
    return value


def ga_value(ga_path: str, value: Any) -> Any:
    """A preview value in its GA shape (`"pcm16"` -> `{"type": "audio/pcm", "rate": 24000}`,
    `["text", "audio"]` -> `["audio"]`); unknown values keep their name for the service to
    judge."""
    if ga_path in ("audio.input.format", "audio.output.format") and isinstance(value, str):
        kind = _FORMAT_TO_GA.get(value, value)
        return {"type": kind, "rate": PCM_RATE} if kind == "audio/pcm" else {"type": kind}
    if ga_path == "output_modalities" and isinstance(value, list):
        return ["audio"] if "audio" in value else list(value)
    return value


_FORMAT_TO_GA = {preview: ga for ga, preview in FORMAT_TO_PREVIEW.items()}


def to_preview_session(
    fragment: Mapping[str, Any], table: Mapping[str, str] = GA_TO_PREVIEW
) -> dict[str, Any]:
    """A GA session fragment (or, with another ``table``, response fragment) in preview
    field names."""
    preview: dict[str, Any] = {}
    for key, value in fragment.items():
        if key == "type":
            continue  # the preview session has no type
        if key == "audio" and isinstance(value, Mapping):
            for path in table:
                if path.startswith("audio."):
                    present, inner = get_path(fragment, path)
                    if present:
                        preview[preview_path(path, table)] = preview_value(path, inner)
            continue
        preview[preview_path(key, table)] = preview_value(key, value)
    return preview


def to_ga_session(
    fragment: Mapping[str, Any], table: Mapping[str, str] = GA_TO_PREVIEW
) -> dict[str, Any]:
    """A preview session fragment (or response fragment, with its ``table``) in GA shape:
    flat keys nested under `audio`, formats as objects. Adds no `type`."""
    ga: dict[str, Any] = {}
    for key, value in fragment.items():
        path = ga_path(key, table)
        set_path(ga, path, ga_value(path, value))
    return ga


# Bytes of audio per second, by wire format name (GA type or preview name).
BYTES_PER_SECOND = {
    "audio/pcm": 48000,
    "pcm16": 48000,
    "audio/pcmu": 8000,
    "audio/pcma": 8000,
    "g711_ulaw": 8000,
    "g711_alaw": 8000,
}


def audio_bytes_per_second(session: Mapping[str, Any], direction: str) -> int | None:
    """Bytes a second of the ``direction`` ("input" or "output") audio format in force, in
    either dialect; None when the session does not say (or names an unknown format)."""
    audio = session.get("audio")
    fmt: Any = None
    if isinstance(audio, Mapping) and isinstance(audio.get(direction), Mapping):
        spec = audio[direction].get("format")
        fmt = spec.get("type") if isinstance(spec, Mapping) else None
    else:
        fmt = session.get(f"{direction}_audio_format")
    return BYTES_PER_SECOND.get(fmt) if isinstance(fmt, str) else None
