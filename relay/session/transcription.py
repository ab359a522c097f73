"""Transcription sessions: the Azure deployment is the session's transcription model. Pure.

A transcription session is opened with ``intent=transcription`` and no deployment in the
URL (Azure's preview path refuses one); the model that transcribes is named in the session
instead (GA ``audio.input.transcription.model``, preview
``input_audio_transcription.model``). The relay puts the backend's Azure deployment there
with the team's defaults, and locks it: a client may re-send it, not change it.
"""

from __future__ import annotations

from dataclasses import replace

from relay.session.policy import SessionPolicy
from relay.session.schema import merge_session, set_path

GA_MODEL_PATH = "audio.input.transcription.model"
PREVIEW_MODEL_PATH = "input_audio_transcription.model"


def transcription_policy(policy: SessionPolicy, azure_deployment: str) -> SessionPolicy:
    """``policy`` with the transcription model set to ``azure_deployment`` and locked."""
    path = GA_MODEL_PATH if policy.flavour == "ga" else PREVIEW_MODEL_PATH
    model: dict[str, object] = {}
    set_path(model, path, azure_deployment)
    locked = policy.locked if path in policy.locked else (*policy.locked, path)
    return replace(policy, defaults=merge_session(policy.defaults, model), locked=locked)
