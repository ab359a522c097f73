"""structlog set-up: JSON lines to stdout (console rendering on a TTY), session context merged.

Nothing logged may carry a key, a token or audio: callers log names, sizes and codes only,
and URLs go through `redact_url` first.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import aiohttp.abc
import orjson
import structlog
from aiohttp.web import BaseRequest, StreamResponse
from yarl import URL

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR
_SECRET_QUERY_KEYS = frozenset({"api-key", "authorization", "key", "token", "access_token"})


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    renderer: Any
    if console:
        renderer = structlog.dev.ConsoleRenderer()
        factory: Any = structlog.PrintLoggerFactory()
    else:
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        factory = structlog.BytesLoggerFactory()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # aiohttp's access log and errors go through the stdlib; keep them, at our level.
    logging.basicConfig(level=_LEVELS[level], format="%(name)s %(levelname)s %(message)s")
    # azure-core logs every token request over several plain-text lines at INFO.
    logging.getLogger("azure").setLevel(max(logging.WARNING, _LEVELS[level]))


def redact_url(url: URL) -> str:
    """The URL as safe to log: credential query values replaced."""
    if not any(k.lower() in _SECRET_QUERY_KEYS for k in url.query):
        return str(url)
    query = [
        (k, "REDACTED" if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in url.query.items()
    ]
    return str(url.with_query(query))


class AccessLogger(aiohttp.abc.AbstractAccessLogger):
    """aiohttp's access log through structlog, with credentials in the URL redacted."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        _access.info(
            "http_request",
            method=request.method,
            url=redact_url(request.rel_url),
            status=response.status,
            duration_seconds=round(time, 6),
            peer=request.remote,
        )


_access = structlog.get_logger("relay.access")
