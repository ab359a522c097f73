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
_GA_TO_PREVIEW: dict[str, str] = {
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
_FORMAT_TO_PREVIEW = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}
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


def preview_path(ga_path: str) -> str:
    """The preview name of a GA dotted path (`audio.input.transcription.model` ->
    `input_audio_transcription.model`)."""
    for ga, preview in _GA_TO_PREVIEW.items():
        if ga_path == ga or ga_path.startswith(ga + "."):
            return preview + ga_path[len(ga) :]
    return ga_path


def ga_path(preview: str) -> str:
    """The GA name of a preview dotted path (`turn_detection.type` ->
    `audio.input.turn_detection.type`); the inverse of `preview_path`."""
    for ga, name in _GA_TO_PREVIEW.items():
        if preview == name or preview.startswith(name + "."):
            return ga + preview[len(name) :]
    return preview


def preview_value(ga_path: str, value: Any) -> Any:
    if ga_path in ("audio.input.format", "audio.output.format") and isinstance(value, Mapping):
        return _FORMAT_TO_PREVIEW.get(str(value.get("type")), value.get("type"))
    if ga_path == "output_modalities" and isinstance(value, list):
        return ["text", "audio"] if "audio" in value else list(value)
    return value


def to_preview_session(fragment: Mapping[str, Any]) -> dict[str, Any]:
    """A GA session fragment in preview field names."""
    preview: dict[str, Any] = {}
    for key, value in fragment.items():
        if key == "type":
            continue  # the preview session has no type
        if key == "audio" and isinstance(value, Mapping):
            for ga_path in _GA_TO_PREVIEW:
                if ga_path.startswith("audio."):
                    present, inner = get_path(fragment, ga_path)
                    if present:
                        preview[preview_path(ga_path)] = preview_value(ga_path, inner)
            continue
        preview[preview_path(key)] = preview_value(key, value)
    return preview
