"""The client's connection, below the handlers: what aiohttp's server leaves to the app.

- A deadline for the request head: a connection must send its request line and headers
  within `header_timeout_seconds` of opening (or of a later request's first byte), else it
  is closed (with a 408 if it sent part of one). aiohttp's keep-alive timeout closes
  connections idle between requests.
- A request head past `HEAD_LINES` times `max_header_bytes` in all is refused (431) before
  it is complete: aiohttp bounds each line, not their sum (128 headers of 16 KB each, 2 MB
  a connection, held a few hundred MiB for a few hundred keyless connections). Where heads
  begin and end in the bytes is walked by `head_bound`.
- A malformed or oversized request head gets the relay's JSON error, never aiohttp's
  plain-text one (which quotes the start of the line, a key in the query included), and one
  log line naming the error's class only.
- A client frame over `max_message_bytes`: the client gets close 1009 with a reason, then the
  rest of what it sends is read and discarded (bounded in bytes and time) before the TCP
  close, so a compliant client reads the close rather than a connection reset. A frame the
  budget for messages still arriving refuses (`server.message_buffer_bytes`, or the team's
  part: see `frames.MessageBufferFull`) is closed the same way, with 1013.

aiohttp internals used, pinned by tests/faults/test_connection.py: `web.Server._kwargs`
(the handler options) and `_loop`, `RequestHandler.handle_error`, `_messages` (the requests
parsed and not yet handled) and
`WebSocketResponse._close_transport`; and, for an upgraded connection's bytes, the
handler's `_payload_parser` (the WebSocket reader: `feed_data` returns an EOF flag),
`_data_received_cb`, `_force_close` and `_close` (pinned by tests/test_frames.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import structlog
from aiohttp import WSCloseCode, web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.http_websocket import WebSocketError
from aiohttp.web_protocol import RequestHandler

from relay.edge.head_bound import UPGRADE, HeadBound, Unframed
from relay.edge.responses import error_response
from relay.errors import ClientRefused, HttpRefusal
from relay.heartbeat import LazyHeartbeat
from relay.session import frames

_log = structlog.get_logger("relay.edge.connection")

# A request head may hold this many lines of `max_header_bytes` (nginx: 4 x 8 KiB).
HEAD_LINES = 4
HEAD_LINGER_SECONDS = 2.0

# After an oversized frame: how long without data before the connection is closed (the
# client has stopped sending), and the bytes discarded at most before it is reset.
LINGER_QUIET_SECONDS = 0.5
LINGER_MIN_BYTES = 128 * 1024 * 1024


class RelayConnection(RequestHandler):
    """aiohttp's per-connection protocol with a request-head deadline, JSON errors for
    malformed requests and a lingering close after an oversized frame."""

    __slots__ = (
        "_header_timeout", "_max_head_bytes", "_counting", "_heads", "_head_deadline",
        "_head_overdue", "_answered", "_linger", "upgrading", "large_frames",
    )  # fmt: skip

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._max_head_bytes = HEAD_LINES * self.max_field_size
        # The bytes of a head not yet whole, walked from the end of the last whole head and
        # its body (`head_bound`). Not counted once a request asks for an upgrade (frames
        # follow).
        self._counting = True
        self._heads = HeadBound(self._max_head_bytes)
        self._answered = 0  # requests answered (`log_access`), of `_request_count` parsed
        self._head_deadline: asyncio.TimerHandle | None = None
        # A pipelined head timed out or outgrew the bound while a request before it was
        # still to be answered: its 408 or 431 comes once that one is (`log_access`).
        self._head_overdue: Callable[[], None] | None = None
        self._linger: _Linger | None = None
        # The ClientSocket being prepared on this connection, until it sets its parser.
        self.upgrading: ClientSocket | None = None
        self.large_frames: frames.Splitter | None = None

    def set_parser(self, parser: Any, data_received_cb: Callable[[], None] | None = None) -> None:
        socket, self.upgrading = self.upgrading, None
        if socket is None:
            super().set_parser(parser, data_received_cb)
            return
        self.large_frames = frames.splitter(
            socket._reader, masked=True, max_size=socket._limit + 1, budget=socket.message_budget
        )
        # The splitter must see every byte the reader sees, from the first: frames that came
        # with the request (a client that did not wait for the 101) go through it too.
        tail, self._message_tail = self._message_tail, b""
        self._heads.forget()
        super().set_parser(parser, data_received_cb)
        if tail and frames.feed(parser, tail, self.large_frames)[0]:
            self.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_head_deadline()
        if self._linger is not None:
            self._linger.finish()
        # The splitter holds the socket's queue, which holds this protocol: a cycle that
        # would leave every closed session to the cycle collector (see frames.feed_eof).
        # So does a socket whose upgrade failed before `set_parser` took it.
        self.large_frames = self.upgrading = None
        self._heads.forget()  # a closed connection may wait for the cycle collector
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._linger is not None:
            self._linger.discarded(len(data))
            return
        parser = self._payload_parser
        if parser is not None:
            # Upgraded: the bytes go to the WebSocket reader as aiohttp's own data_received
            # sends them, one Python call fewer per frame.
            if data and not (self._force_close or self._close):
                callback = self._data_received_cb
                if callback is not None:
                    callback()
                eof, _ = frames.feed(parser, data, self.large_frames)
                if eof:
                    self.close()
            return
        if not self._counting:
            if self._heads.upgrading:
                self._heads.hold(data)  # aiohttp keeps it aside too, until the upgrade is decided
            super().data_received(data)
            return
        before = self._request_count
        super().data_received(data)
        made = self._request_count - before
        self._walk(data, list(self._messages)[-made:] if made else ())

    def _walk(self, data: bytes, requests: Any) -> None:
        """Walk ``data`` with the requests the parser made (`head_bound`); then refuse, time
        or clear what is left of a head."""
        lengths, upgrades, ignored = [], set(), set()
        for index, (message, _) in enumerate(requests):
            lengths.append(_body_length(message))
            if lengths[-1] == UPGRADE:
                continue
            if _switches(message):
                upgrades.add(index)
            elif message.upgrade:
                ignored.add(index)  # served as HTTP: aiohttp switches for WebSocket only
        try:
            whole = self._heads.read(data, lengths, upgrades, ignored)
        except Unframed as exc:
            self._unframed(str(exc))
            return
        if not whole:
            self._stop_counting()  # frames follow (or its refusal, then the close)
            if self.upgrading is None and self._answered >= self._request_count:
                # An upgrade answered over HTTP (declined) before its body had all come:
                # aiohttp switches once the body is read, then parses nothing more, so what
                # follows would wait, unanswered and unbounded, for the keep-alive timeout.
                _log.info("declined_upgrade_closed", peer=_peer(self.transport))
                self.force_close()
            return
        if not self._heads.pending:
            self._disarm_head_deadline()
            if self._head_overdue == self._refuse_late_head:
                self._head_overdue = None  # its head has come whole since (or was held back)
        elif self._heads.pending > self._max_head_bytes:
            self._head_too_large()  # no whole head within the bound: refused
        elif self._head_deadline is None and self._head_overdue is None:
            self._arm_head_deadline()

    def _stop_counting(self) -> None:
        self._counting = False
        self._heads.pending = 0
        self._disarm_head_deadline()

    def _unframed(self, error: str) -> None:
        """A chunked body whose framing the parser refuses too, a chunk line past the head
        bound, or more requests in flight than `head_bound.MAX_HELD`: what follows cannot
        be bounded. 400, after the answer before it."""
        _log.info("request_body_unframed", peer=_peer(self.transport), error=error)
        self._stop_counting()
        self._once_answered(self._refuse_unframed)

    def _refuse_unframed(self) -> None:
        self._close_with(_UNFRAMED)

    def _head_too_large(self) -> None:
        self._disarm_head_deadline()
        self._once_answered(self._refuse_large_head)

    def _refuse_large_head(self) -> None:
        transport = self.transport
        self._counting = False
        if transport is not None and not transport.is_closing():
            _log.info(
                "request_head_too_large",
                peer=_peer(transport),
                bytes_received=self._heads.pending,
                max_head_bytes=self._max_head_bytes,
            )
        self._close_with(_head_answer(self._max_head_bytes))

    def _once_answered(self, refuse: Callable[[], None]) -> None:
        """``refuse`` now, or once the request before it is answered (`log_access`), nothing
        more being read meanwhile."""
        if self._answering():
            if self.transport is not None:
                self.transport.pause_reading()
            self._head_overdue = refuse
            return
        refuse()

    def _close_with(self, answer: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(answer)
            # What the client still sends is read and dropped, so that it reads the answer
            # rather than a reset; past twice the bound, or a few seconds, it is reset.
            self.linger(seconds=HEAD_LINGER_SECONDS, max_bytes=2 * self._max_head_bytes)
            return
        self.force_close()

    def log_access(self, request: web.BaseRequest, response: web.StreamResponse, time: Any) -> None:
        super().log_access(request, response, time)
        self._answered += 1
        if self._heads.upgrading and self._payload_parser is None and self._linger is None:
            # An upgrade refused over HTTP: aiohttp has parsed what came after its head (the
            # requests queued now), and so is it walked.
            self._counting = True
            self._walk(b"", list(self._messages))
        overdue = self._head_overdue
        if overdue is not None and not self._messages:  # this answer is written: now
            self._head_overdue = None
            overdue()

    def _answering(self) -> bool:
        """Whether a request before the head being read is still to be answered (counted:
        between aiohttp taking a request off its queue and handling it, neither its queue
        nor its flag says so, and a 431 went out before a chunked POST's answer)."""
        return self._answered < self._request_count and not self._force_close

    def _arm_head_deadline(self) -> None:
        loop = asyncio.get_running_loop()
        self._head_deadline = loop.call_later(self._header_timeout, self._head_timed_out)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        transport = self.transport
        if transport is None or not self._counting:
            return
        if self._answering():
            self._head_overdue = self._refuse_late_head
            return
        self._refuse_late_head()

    def _refuse_late_head(self) -> None:
        transport = self.transport
        if transport is None:
            return
        if self._heads.pending:
            # Best effort: a client that is still sending may not read it.
            _log.info(
                "request_head_timeout",
                peer=_peer(transport),
                bytes_received=self._heads.pending,
                header_timeout_seconds=self._header_timeout,
            )
            transport.write(_REQUEST_TIMEOUT)
        else:
            _log.debug("silent_connection_closed", peer=_peer(transport))
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's hook for a request it could not parse or a handler that raised: the
        relay's JSON error, and a log line without the request's text."""
        refusal: HttpRefusal
        if status >= 500:
            _log.error("request_failed", peer=request.remote, exc_info=exc)
            refusal = HttpRefusal(
                status, "relay_internal_error", "The relay failed to handle the request."
            )
        elif isinstance(exc, LineTooLong):
            _log.info("request_head_too_large", peer=request.remote, status=status)
            refusal = ClientRefused(
                status,
                "request_head_too_large",
                f"The request line or a header is longer than {self.max_line_size} bytes.",
            )
        else:
            error = type(exc).__name__ if exc is not None else None
            _log.info("bad_request", peer=request.remote, status=status, error=error)
            refusal = ClientRefused(status, "bad_request", "The request is not valid HTTP/1.1.")
        if request.writer.output_size > 0:
            raise ConnectionError("a response was partly sent; no error response can follow")
        response = error_response(refusal)
        response.force_close()
        return response

    def linger(self, *, seconds: float, max_bytes: int) -> asyncio.Future[None]:
        """Read and drop whatever the client still sends, then close: when it stops sending
        (quiet for LINGER_QUIET_SECONDS) or closes; reset it past ``max_bytes`` or
        ``seconds``. Done when the connection is closed."""
        transport = self.transport
        done = asyncio.get_running_loop().create_future()
        if transport is None:
            done.set_result(None)
            return done
        self._disarm_head_deadline()
        self._linger = _Linger(transport, done, seconds=seconds, max_bytes=max_bytes)
        if not transport.is_reading():
            transport.resume_reading()  # paused by flow control: the kernel buffer must drain
        return done


class _Linger:
    """The discarding state of a connection that is being closed after a protocol error."""

    __slots__ = ("transport", "done", "max_bytes", "discarded_bytes", "deadline", "quiet")

    def __init__(
        self,
        transport: asyncio.Transport,
        done: asyncio.Future[None],
        *,
        seconds: float,
        max_bytes: int,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.transport = transport
        self.done = done
        self.max_bytes = max_bytes
        self.discarded_bytes = 0
        self.deadline = loop.call_later(seconds, self.reset)
        self.quiet = loop.call_later(LINGER_QUIET_SECONDS, self.close)

    def discarded(self, size: int) -> None:
        if self.done.done():
            return  # closed or reset already: reads the transport delivered before it ended
        self.discarded_bytes += size
        if self.discarded_bytes > self.max_bytes:
            self.reset()
            return
        self.quiet.cancel()
        self.quiet = asyncio.get_running_loop().call_later(LINGER_QUIET_SECONDS, self.close)

    def close(self) -> None:
        self.transport.close()
        self.finish()

    def reset(self) -> None:
        _log.info("client_linger_reset", discarded_bytes=self.discarded_bytes)
        self.transport.abort()
        self.finish()

    def finish(self) -> None:
        self.deadline.cancel()
        self.quiet.cancel()
        if not self.done.done():
            self.done.set_result(None)


class ClientSocket(LazyHeartbeat, web.WebSocketResponse):
    """The client's WebSocket, with a heartbeat that costs nothing per read (`LazyHeartbeat`).

    aiohttp closes a socket whose frame is over ``max_msg_size`` with 1009, no reason, and
    at once drops the connection while the frame is still arriving: a reset that can destroy
    the close frame. Here the close carries a reason and the connection lingers
    (`RelayConnection.linger`) before it is closed."""

    __slots__ = (
        "_limit", "_linger_seconds", "_lingering", "_mid_frame", "_request", "logged_as_session",
        "message_budget",
    )  # fmt: skip

    def __init__(
        self,
        *,
        max_msg_size: int,
        linger_seconds: float,
        message_budget: frames.MessageBudget | None = None,
        **kwargs: Any,
    ) -> None:
        # aiohttp refuses a message of its max_msg_size bytes and more; the relay's limit is
        # the largest message it takes (a message of exactly max_message_bytes passes).
        super().__init__(max_msg_size=max_msg_size + 1, **kwargs)
        self._limit = max_msg_size
        self._linger_seconds = linger_seconds
        self._lingering: asyncio.Future[None] | None = None
        # Closed while a frame it refused is still arriving: the connection lingers.
        self._mid_frame = False
        # Where this socket's messages still arriving are counted: its team's budget, under
        # the process's (`RelayState.message_budget_for`).
        self.message_budget = message_budget
        self._request: web.BaseRequest | None = None
        # Its session logged `session_ended`, which stands for the access line (AccessLogger).
        self.logged_as_session = False

    async def prepare(self, request: web.BaseRequest) -> Any:
        self._request = request
        # aiohttp prepares a response again once the handler returns: only the first time
        # is an upgrade (set later, the protocol would keep this socket, a cycle per session).
        if self._payload_writer is None and isinstance(request.protocol, RelayConnection):
            request.protocol.upgrading = self  # its set_parser makes this socket's splitter
        return await super().prepare(request)

    async def close(
        self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        if code == WSCloseCode.MESSAGE_TOO_BIG and not message and not self.closed:
            # aiohttp's receive() closing after its reader refused an oversized frame.
            self._mid_frame = True
            message = self.too_big_reason.encode()
        elif code == WSCloseCode.TRY_AGAIN_LATER and not message and not self.closed:
            reader = self._reader
            if reader is not None and isinstance(reader.exception(), frames.MessageBufferFull):
                self._mid_frame = True  # its splitter refused a frame (a message budget)
                message = frames.MessageBufferFull.REASON.encode()
        elif code == WSCloseCode.POLICY_VIOLATION and not message and not self.closed:
            reader = self._reader
            if reader is not None and isinstance(reader.exception(), frames.MessageTooFragmented):
                self._mid_frame = True  # its splitter refused a frame (too many fragments)
                message = frames.MessageTooFragmented.REASON.encode()
        elif code in _PROTOCOL_ERRORS and not message and not self.closed:
            # aiohttp's receive() closing after its reader (or the splitter) found the
            # client's frames broken: the close says how (aiohttp's close has no reason),
            # and the rest it sends is read and dropped, so it reads the close, not a reset.
            reader = self._reader
            found = reader.exception() if reader is not None else None
            if isinstance(found, WebSocketError):
                self._mid_frame = True
                message = f"protocol error: {found}".encode()[:_MAX_REASON_BYTES]
        elif code == WSCloseCode.OK and self._closing and not self.closed:
            # aiohttp answering the client's close frame, whose code it takes as it came.
            sent = self._close_code
            if sent and not frames.is_sendable(sent):
                code, message = WSCloseCode.PROTOCOL_ERROR, frames.invalid_close_code(sent).encode()
        closed = await super().close(code=code, message=message, drain=drain)
        if self._lingering is not None:
            await self._lingering
        return closed

    @property
    def too_big_reason(self) -> str:
        return f"message too big: the limit is {self._limit} bytes"

    def discard_incoming(self, seconds: float) -> None:
        """Before the relay closes a client for its own fault: what it still sends is read
        and dropped, not parsed. aiohttp's close reads the client's messages until its close
        frame, without yielding while they are queued: a client flooding tiny frames held
        the event loop, every session's, for the whole close timeout, again on each
        reconnect."""
        protocol = self._request.protocol if self._request is not None else None
        if isinstance(protocol, RelayConnection) and self._lingering is None:
            self._mid_frame = True
            max_bytes = max(LINGER_MIN_BYTES, 2 * self._limit)
            self._lingering = protocol.linger(seconds=seconds, max_bytes=max_bytes)

    def _close_transport(self) -> None:
        protocol = self._request.protocol if self._request is not None else None
        if not self._mid_frame or not isinstance(protocol, RelayConnection):
            super()._close_transport()
            return
        if self._lingering is None:
            max_bytes = max(LINGER_MIN_BYTES, 2 * self._limit)
            self._lingering = protocol.linger(seconds=self._linger_seconds, max_bytes=max_bytes)


def _switches(message: Any) -> bool:
    """Whether aiohttp's parser switches protocols after this request (and its body): a
    WebSocket upgrade or CONNECT, as it decides."""
    if message.method == "CONNECT":
        return True
    wanted = message.headers.get("Upgrade", "")
    return bool(message.upgrade) and wanted.isascii() and wanted.lower() == "websocket"


def _body_length(message: Any) -> int | None:
    """What follows a parsed request's head: its body's length (0: none), None for a
    chunked body, `UPGRADE` for a parse error's entry (the connection is then answered and
    closed)."""
    headers = getattr(message, "headers", None)
    if headers is None:
        return UPGRADE
    if message.chunked:
        return None
    length = headers.get("Content-Length", "0").strip() or "0"
    return int(length) if length.isdigit() else UPGRADE


# Close codes of a client's broken frames; a close reason holds at most 123 bytes.
_PROTOCOL_ERRORS = frozenset({WSCloseCode.PROTOCOL_ERROR, WSCloseCode.INVALID_TEXT})
_MAX_REASON_BYTES = 123


class RelayServer(web.Server):
    """aiohttp's low-level server, making `RelayConnection`s."""

    def __init__(self, server: web.Server, *, header_timeout: float) -> None:
        super().__init__(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            **server._kwargs,
        )
        self._header_timeout = header_timeout

    def __call__(self) -> RequestHandler:
        return RelayConnection(
            self, loop=self._loop, header_timeout=self._header_timeout, **self._kwargs
        )


class RelayRunner(web.AppRunner):
    """An AppRunner whose server makes `RelayConnection`s."""

    def __init__(self, app: web.Application, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return RelayServer(server, header_timeout=self._header_timeout)


def _peer(transport: asyncio.BaseTransport | None) -> str | None:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return str(peer[0]) if isinstance(peer, tuple) else None


def _raw_answer(status: str, code: str, message: str) -> bytes:
    """A JSON error answer written straight to the transport (no request to answer yet),
    closing the connection."""
    body = orjson.dumps(
        {"error": {"type": "invalid_request_error", "code": code, "message": message}}
    )
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


_UNFRAMED = _raw_answer(
    "400 Bad Request",
    "bad_request",
    "The requests could not be followed: a chunked body that is not valid HTTP/1.1, a "
    "chunk line over four times max_header_bytes, or over 2 MiB of requests in flight.",
)
_REQUEST_TIMEOUT = _raw_answer(
    "408 Request Timeout",
    "request_head_timeout",
    "The request line and headers did not arrive in time.",
)


def _head_answer(limit: int) -> bytes:
    return _raw_answer(
        "431 Request Header Fields Too Large",
        "request_head_too_large",
        f"The request line and headers are longer than {limit} bytes in all.",
    )
