"""Events the relay itself sends to clients, in the service's own `error` shape. Pure."""

from __future__ import annotations

import itertools
import os

import orjson

_PREFIX = "event_relay_" + os.urandom(4).hex() + "_"
_counter = itertools.count(1)


def error_event(
    code: str,
    message: str,
    *,
    error_type: str = "server_error",
    param: str | None = None,
    event_id: str | None = None,
) -> bytes:
    """An `error` server event; ``event_id`` names the client event that caused it."""
    return orjson.dumps(
        {
            "type": "error",
            "event_id": f"{_PREFIX}{next(_counter)}",
            "error": {
                "type": error_type,
                "code": code,
                "message": message,
                "param": param,
                "event_id": event_id,
            },
        }
    )
