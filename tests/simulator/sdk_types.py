"""Validate server events with the official SDK's own pydantic event types.

``GA`` checks ``openai.types.realtime.RealtimeServerEvent`` (``/openai/v1/realtime``), ``BETA``
checks ``openai.types.beta.realtime.RealtimeServerEvent`` (the preview path). The SDK's
unions carry their discriminator as ``PropertyInfo``, which pydantic ignores; rebuilding
them with ``Field(discriminator="type")`` makes validation strict about the event name and
about ~20x faster, with short errors (protocol.md 6.3).

The SDK models accept unknown fields, so ``unknown_fields`` lists them (as dotted paths),
letting tests pin which extras are expected (e.g. ``session.id``).
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Union

import orjson
from openai.types.beta.realtime import RealtimeServerEvent as BetaServerEvent
from openai.types.realtime import RealtimeServerEvent as GaServerEvent
from pydantic import BaseModel, Field, TypeAdapter


def _discriminated(union_alias: Any) -> TypeAdapter[Any]:
    members = typing.get_args(typing.get_args(union_alias)[0])
    form: Any = Annotated[Union[members], Field(discriminator="type")]  # noqa: UP007
    return TypeAdapter(form)


GA: TypeAdapter[Any] = _discriminated(GaServerEvent)
BETA: TypeAdapter[Any] = _discriminated(BetaServerEvent)
ADAPTERS = {"ga": GA, "beta": BETA}

# Fields the service sends that the SDK models do not declare.
EXPECTED_EXTRAS = {
    "ga": {"session.object", "session.id", "session.expires_at"},
    "beta": {"session.object", "session.expires_at"},
}


def event_types(dialect: str) -> set[str]:
    """Every server event ``type`` the SDK knows for a dialect."""
    union = GaServerEvent if dialect == "ga" else BetaServerEvent
    members = typing.get_args(typing.get_args(union)[0])
    return {typing.get_args(m.model_fields["type"].annotation)[0] for m in members}


def validate(dialect: str, event: bytes | str | dict[str, Any]) -> BaseModel:
    """Parse one server event as the SDK types; raises ``pydantic.ValidationError``."""
    adapter = ADAPTERS[dialect]
    if isinstance(event, dict):
        return typing.cast(BaseModel, adapter.validate_python(event))
    return typing.cast(BaseModel, adapter.validate_json(event))


def unknown_fields(model: Any, path: str = "") -> set[str]:
    """Dotted paths of fields present in the data but not declared by the SDK model."""
    found: set[str] = set()
    if isinstance(model, BaseModel):
        for key in model.model_extra or {}:
            found.add(f"{path}{key}")
        for name in type(model).model_fields:
            found |= unknown_fields(getattr(model, name), f"{path}{name}.")
    elif isinstance(model, list | tuple):
        for item in model:
            found |= unknown_fields(item, path)
    return found


def check(dialect: str, raw: bytes | str) -> dict[str, Any]:
    """Validate a raw frame and its extras; return it decoded. For use on every frame."""
    model = validate(dialect, raw)
    extras = unknown_fields(model) - EXPECTED_EXTRAS[dialect]
    assert not extras, f"fields unknown to the SDK in {model.type}: {sorted(extras)}"  # type: ignore[attr-defined]
    decoded: dict[str, Any] = orjson.loads(raw)
    return decoded
