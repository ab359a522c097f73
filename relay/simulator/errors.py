"""Client-event errors, reported to the client as ``error`` events (the socket stays open)."""

from __future__ import annotations

from typing import Any


class ClientEventError(Exception):
    """A client event the service would reject with an ``invalid_request_error``.

    Args:
        code: the service's error code, e.g. ``invalid_value``.
        message: human-readable explanation, in the service's phrasing.
        param: dotted path of the offending parameter, if any.
    """

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def describe(value: Any) -> str:
    """How the service names a JSON value's type in messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def invalid_type(param: str, expected: str, value: Any) -> ClientEventError:
    return ClientEventError(
        "invalid_type",
        f"Invalid type for '{param}': expected {expected}, but got {describe(value)} instead.",
        param,
    )


def invalid_value(param: str, value: Any, supported: tuple[str, ...] = ()) -> ClientEventError:
    shown = f"'{value}'" if isinstance(value, str) else str(value)
    if len(shown) > 100:
        shown = shown[:97] + "..."
    message = f"Invalid value: {shown}."
    if supported:
        message += " Supported values are: " + ", ".join(f"'{s}'" for s in supported) + "."
    return ClientEventError("invalid_value", message, param)


def missing(param: str) -> ClientEventError:
    return ClientEventError(
        "missing_required_parameter", f"Missing required parameter: '{param}'.", param
    )


def unknown_parameter(param: str) -> ClientEventError:
    return ClientEventError("unknown_parameter", f"Unknown parameter: '{param}'.", param)
