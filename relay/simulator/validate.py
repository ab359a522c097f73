"""Typed reads of client JSON that fail the way the service does (``ClientEventError``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from relay.simulator.errors import invalid_type, invalid_value, missing, unknown_parameter


def check_keys(obj: Mapping[str, Any], allowed: Iterable[str], path: str) -> None:
    """Reject the first key not in ``allowed`` as an ``unknown_parameter``."""
    known = set(allowed)
    for key in obj:
        if key not in known:
            raise unknown_parameter(f"{path}.{key}" if path else key)


def obj(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid_type(param, "an object", value)
    return value


def required(container: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in container:
        raise missing(f"{path}.{key}" if path else key)
    return container[key]


def string(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise invalid_type(param, "a string", value)
    return value


def boolean(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise invalid_type(param, "a boolean", value)
    return value


def integer(value: Any, param: str, low: int = 0, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_type(param, "an integer", value)
    if value < low or (high is not None and value > high):
        raise invalid_value(param, value)
    return value


def number(value: Any, param: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid_type(param, "a number", value)
    if not low <= value <= high:
        raise invalid_value(param, value)
    return float(value)


def choice(value: Any, param: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise invalid_value(param, value, choices)
    return str(value)


def max_tokens(value: Any, param: str) -> int | None:
    """``max_output_tokens``: 1..4096 or ``"inf"`` (returned as None)."""
    if value == "inf":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise invalid_value(param, value)
    return value
