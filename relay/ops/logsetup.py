"""Logging set-up: every line the process logs, structlog's and the stdlib's (aiohttp, asyncio,
azure, warnings), comes out as one JSON line on stdout (console rendering on a TTY), with
the session context merged and secrets removed by one filter (`redaction.SECRETS`), written
by a thread of its own (`log_writer`): a stuck log reader never blocks the event loop.

Callers still log names, sizes, codes and statuses only; URLs go through `redact_url` and
exceptions through `describe_error`. The filter is the net under them, not the plan.
"""

from __future__ import annotations

import atexit
import logging
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

import aiohttp
import aiohttp.abc
import orjson
import structlog
from aiohttp.web import BaseRequest, StreamResponse
from structlog.typing import EventDict, Processor, WrappedLogger
from yarl import URL

from relay.ops.log_writer import LogWriter, text_stream
from relay.ops.redaction import SECRETS

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR
_SECRET_QUERY_WORDS = ("key", "token", "secret", "sig", "password", "auth", "credential")


# Fields of every line this process writes (a worker's index), kept when a request or a
# session starts its own context (`fresh_context`).
_PROCESS_FIELDS: dict[str, Any] = {}


def bind_process_fields(**fields: Any) -> None:
    _PROCESS_FIELDS.update(fields)
    structlog.contextvars.bind_contextvars(**fields)


def fresh_context() -> None:
    """The current task's log context emptied of another request's fields, but for the
    process's own (under --workers, which worker held the session)."""
    structlog.contextvars.clear_contextvars()
    if _PROCESS_FIELDS:
        structlog.contextvars.bind_contextvars(**_PROCESS_FIELDS)


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    writer = _writer(sys.stdout.buffer)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    finish: list[Processor] = [structlog.processors.format_exc_info, redact_secrets]
    renderer: Any
    text_renderer: Any
    if console:
        renderer = text_renderer = structlog.dev.ConsoleRenderer()
        factory: Any = structlog.PrintLoggerFactory(text_stream(writer))
    else:
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        text_renderer = structlog.processors.JSONRenderer(serializer=_dumps_text)
        factory = structlog.BytesLoggerFactory(writer)  # type: ignore[arg-type]
    structlog.configure(
        processors=[*shared, *finish, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # The stdlib's loggers (aiohttp's server errors, asyncio, azure, warnings) through the
    # same processors: the same JSON lines, the same filter.
    handler = _RelayHandler(text_stream(writer))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *finish,
                text_renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _RelayHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    logging.captureWarnings(True)
    # azure-core logs every token request over several lines at INFO.
    logging.getLogger("azure").setLevel(max(logging.WARNING, _LEVELS[level]))


_WRITER: LogWriter | None = None


def _writer(stream: BinaryIO) -> LogWriter:
    """The process's log writer (one thread), writing to ``stream``."""
    global _WRITER
    if _WRITER is None:
        _WRITER = LogWriter(stream)
        atexit.register(flush_logs)
    else:
        _WRITER.retarget(stream)
    return _WRITER


def flush_logs() -> None:
    """Wait (a few seconds at most) until the lines logged so far are written: at exit."""
    if _WRITER is not None:
        _WRITER.wait_written()


def write_log_line(line: bytes) -> None:
    """A line logged by another process (a worker's), out with this process's own."""
    if _WRITER is None:
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
    else:
        _WRITER.write(line)


def count_dropped_lines(count: Callable[[], None]) -> None:
    """Call ``count`` for each log line dropped because the output was not read."""
    if _WRITER is not None:
        _WRITER.on_drop = count


class _RelayHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stdlib handler `configure_logging` installs (and replaces when called again)."""

    def handleError(self, record: logging.LogRecord) -> None:
        # The stdlib's own would print the record, exception and arguments unfiltered.
        sys.stderr.write(f"relay: a log line from {record.name} could not be written\n")


def redact_secrets(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """The processor every log line passes last before rendering."""
    clean = SECRETS.clean_value
    # Most lines hold nothing suspect: one look at all their text, then only what is not a
    # plain JSON value (containers, objects whose repr would be rendered) is walked.
    text = "\n".join(v for v in event_dict.values() if type(v) is str)
    if SECRETS.suspect(text):
        return {
            key: value if key in _OWN_FIELDS else clean(value) for key, value in event_dict.items()
        }
    return {
        key: value if type(value) in _PLAIN else clean(value) for key, value in event_dict.items()
    }


_PLAIN = frozenset({str, int, float, bool, type(None)})
# Fields the relay fills itself, never with a secret: not cleaned, so a client presenting its
# own address as its "key" cannot have it hidden from the lines about its guesses. (`event`
# is not one: a stdlib logger's message lands there.)
_OWN_FIELDS = frozenset({"level", "log_level", "logger", "timestamp", "peer", "session_id"})


def _dumps_text(value: Any, **kwargs: Any) -> str:
    return orjson.dumps(value, **kwargs).decode()


def redact_url(url: URL) -> str:
    """The URL as safe to log: values of credential-like query parameters replaced, and cut
    at `MAX_LOGGED_URL_CHARS` (a keyless client's 16 KB URL made two 32 KB lines a request:
    its quotes and backslashes double in JSON)."""
    if any(_is_secret_name(k) for k in url.query):
        query = [(k, "REDACTED" if _is_secret_name(k) else v) for k, v in url.query.items()]
        url = url.with_query(query)
    text = str(url)
    if len(text) > MAX_LOGGED_URL_CHARS:
        text = f"{text[:MAX_LOGGED_URL_CHARS]}…({len(text) - MAX_LOGGED_URL_CHARS} more)"
    return text


MAX_LOGGED_URL_CHARS = 1024


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_QUERY_WORDS)


def describe_error(exc: BaseException | None) -> str | None:
    """What may be logged about an exception. Never its repr: aiohttp's response errors
    carry the request (headers with the upstream key or token); of those, the class and
    the HTTP status only."""
    if exc is None:
        return None
    name = type(exc).__name__
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{name} (HTTP {exc.status})"
    text = str(exc)
    return f"{name}: {SECRETS.clean(text)}" if text else name


class AccessLogger(aiohttp.abc.AbstractAccessLogger):
    """aiohttp's access log through structlog, with credentials in the URL redacted.

    A WebSocket session's record is its own `session_ended` line, logged as its handler
    ends (the socket is then marked `logged_as_session`): the access line would repeat it at
    the same moment, a third of a session's log volume and about 60 us of its set-up CPU."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if getattr(response, "logged_as_session", False):
            return
        _access.info(
            "http_request",
            method=request.method,
            url=redact_url(request.rel_url),
            status=response.status,
            duration_seconds=round(time, 6),
            peer=request.get(CLIENT_ADDRESS) or request.remote,
        )


_access = structlog.get_logger("relay.access")
# Where a request keeps the client's address once the relay has worked it out (behind a
# trusted proxy, from X-Forwarded-For): the access line names the client, as the session's
# lines do, not the proxy.
CLIENT_ADDRESS = aiohttp.web.RequestKey("client_address", str)
