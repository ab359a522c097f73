"""The relay's JSON error answer, shared by every HTTP path (handlers, WebRTC, malformed
requests)."""

from __future__ import annotations

import orjson
from aiohttp import web

from relay.errors import ClientRefused, HttpRefusal, RequestRejected


def error_response(refusal: HttpRefusal) -> web.Response:
    """The refusal as the service's JSON error (with ``param`` for a RequestRejected)."""
    error: dict[str, str | None] = {
        "type": error_type(refusal),
        "code": refusal.code,
        "message": refusal.message,
    }
    if isinstance(refusal, RequestRejected):
        error["param"] = refusal.param
    headers = {"Retry-After": refusal.retry_after} if refusal.retry_after else None
    return web.Response(
        status=refusal.status,
        body=orjson.dumps({"error": error}),
        content_type="application/json",
        headers=headers,
    )


def error_type(refusal: HttpRefusal) -> str:
    return "invalid_request_error" if isinstance(refusal, ClientRefused) else "server_error"
