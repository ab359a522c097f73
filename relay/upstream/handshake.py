"""The upstream WebSocket handshake, without aiohttp's general-purpose HTTP client.

`ClientSession.ws_connect` builds a general HTTP request for every session (header
multidicts, cookie jar, auto headers, proxy and redirect handling, a connector's pool
bookkeeping, traces): on the set-up bench (`bench/setup_profile.py`) it was the largest single
cost of a session start. Here a backend's request head is built once (`UpstreamTarget`), the
connection is opened through happy eyeballs on a DNS answer cached like aiohttp caches it,
the 101 is parsed by aiohttp's own response parser and checked as aiohttp checks it (and for
an extension or subprotocol never offered, which RFC 6455 4.1 refuses), and the
socket handed back is aiohttp's own `ClientWebSocketResponse` on aiohttp's own frame reader
and writer: every frame after the handshake takes exactly the path it took before.

aiohttp internals used, pinned by tests/test_upstream_handshake.py: `client_proto.ResponseHandler`
(`set_response_params`, `read`, `set_parser`; and `data_received`'s upgraded branch, copied:
`_payload_parser`, `_payload_parser_failed`, `_payload`, `_read_timeout_handle`,
`_data_received_cb`), the queue class `aiohttp.client` builds
(`WebSocketDataQueue`, or the frame layer's replacement), `WebSocketReader`,
`WebSocketWriter`, the `ClientWebSocketResponse` constructor, its `_parser` and
`_on_data_received`, and the one thing it asks of the response it is given: `connection`
and `close()`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import aiohappyeyeballs
import aiohttp
import aiohttp.client
from aiohappyeyeballs import AddrInfoType
from aiohttp import ClientResponse, ClientWebSocketResponse
from aiohttp._websocket.reader import WebSocketReader
from aiohttp._websocket.writer import WebSocketWriter
from aiohttp.client_proto import ResponseHandler
from aiohttp.helpers import DEFAULT_CHUNK_SIZE
from yarl import URL

from relay.heartbeat import LazyHeartbeat
from relay.session import frames

UpstreamSocket = ClientWebSocketResponse[bool]
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# As aiohttp's connector: DNS answers kept 10 s, RFC 8305's 250 ms between attempts.
DNS_TTL_SECONDS = 10.0
HAPPY_EYEBALLS_DELAY = 0.25
_AI_ADDRCONFIG = getattr(socket, "AI_ADDRCONFIG", 0)


class HandshakeRefused(Exception):
    """The upstream answered the handshake without a valid upgrade."""

    def __init__(self, status: int, retry_after: str | None = None) -> None:
        super().__init__(f"upstream answered the handshake with HTTP {status}")
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class SocketOptions:
    close_timeout: float
    heartbeat: float
    max_message_bytes: int


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where an upstream WebSocket is, and the start of its request head (no credential:
    that is added per connection, a token may have been refreshed since)."""

    url: URL
    host: str
    port: int
    tls: bool
    head: bytes

    @classmethod
    def of(cls, url: URL) -> UpstreamTarget:
        """``url`` is ws://, wss://, http:// or https:// (the same as ws:// and wss://)."""
        tls = url.scheme in ("wss", "https")
        host, port = url.raw_host, url.port
        if host is None or port is None:
            raise ValueError(f"not an absolute URL with a host: {url.with_query(None)}")
        # No Sec-WebSocket-Extensions: permessage-deflate is never offered (base64 audio
        # barely compresses; deflate cost 2.5x the CPU per frame).
        head = (
            f"GET {url.raw_path_qs} HTTP/1.1\r\n"
            f"Host: {url.host_port_subcomponent}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        ).encode("ascii")
        return cls(url, host.strip("[]"), port, tls, head)


class Dialer:
    """Opens upstream WebSockets: one per process, holding the TLS context and DNS cache."""

    def __init__(self, ssl_context: ssl.SSLContext) -> None:
        self._ssl = ssl_context
        self._dns: dict[tuple[str, int], tuple[float, Sequence[AddrInfoType]]] = {}

    async def open(
        self, target: UpstreamTarget, headers: Mapping[str, str], options: SocketOptions
    ) -> UpstreamSocket:
        """The upgraded socket; HandshakeRefused for an answer that is not a valid 101, or
        OSError / aiohttp.ClientError / HttpProcessingError when the connection fails."""
        loop = asyncio.get_running_loop()
        proto = await self._connect(loop, target)
        try:
            return await _upgrade(proto, target, headers, options)
        except BaseException:
            proto.close()
            raise

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, target: UpstreamTarget
    ) -> ResponseHandler:
        addresses = await self._addresses(target)
        tls = self._ssl if target.tls else None
        hostname = target.host if target.tls else None
        family, _, proto, _, address = addresses[0]
        if len(addresses) == 1 and family == socket.AF_INET:
            # One IPv4 address (loopback, most endpoints): the loop's own connect costs
            # half of happy eyeballs' Python socket handling.
            _, handler = await loop.create_connection(
                lambda: _UpstreamProtocol(loop),
                address[0],
                address[1],
                family=family,
                proto=proto,
                ssl=tls,
                server_hostname=hostname,
            )
            return handler
        sock = await aiohappyeyeballs.start_connection(
            addresses, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1, loop=loop
        )
        try:
            _, handler = await loop.create_connection(
                lambda: _UpstreamProtocol(loop), sock=sock, ssl=tls, server_hostname=hostname
            )
        except BaseException:
            sock.close()
            raise
        return handler

    async def _addresses(self, target: UpstreamTarget) -> Sequence[AddrInfoType]:
        key = (target.host, target.port)
        now = time.monotonic()
        cached = self._dns.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        infos: Sequence[AddrInfoType] = await asyncio.get_running_loop().getaddrinfo(
            target.host, target.port, type=socket.SOCK_STREAM, flags=_AI_ADDRCONFIG
        )
        if not infos:
            raise OSError(f"no address for {target.host}")
        self._dns[key] = (now + DNS_TTL_SECONDS, infos)
        return infos


async def _upgrade(
    proto: ResponseHandler,
    target: UpstreamTarget,
    headers: Mapping[str, str],
    options: SocketOptions,
) -> UpstreamSocket:
    loop = asyncio.get_running_loop()
    transport = proto.transport
    assert transport is not None
    proto.set_response_params(read_until_eof=False)
    key = base64.b64encode(os.urandom(16))
    transport.write(
        b"".join((target.head, _header_lines(headers), b"Sec-WebSocket-Key: ", key, b"\r\n\r\n"))
    )
    message, _ = await proto.read()
    if message.code != 101:
        raise HandshakeRefused(message.code, message.headers.get("Retry-After"))
    answer = message.headers
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()
    if (
        answer.get("Upgrade", "").lower() != "websocket"
        or answer.get("Connection", "").lower() != "upgrade"
        or answer.get("Sec-WebSocket-Accept", "") != accept
        # Neither was offered (RFC 6455 4.1): a compressed frame would end the session later.
        or "Sec-WebSocket-Extensions" in answer
        or "Sec-WebSocket-Protocol" in answer
    ):
        raise HandshakeRefused(101)
    # The queue class aiohttp's own client builds, looked up now: the frame layer replaces
    # it (`relay.session.frames.install`) to forward inside the read callback.
    queue_class = aiohttp.client.WebSocketDataQueue  # type: ignore[attr-defined]
    reader = queue_class(proto, DEFAULT_CHUNK_SIZE, loop=loop)
    writer = WebSocketWriter(proto, transport, use_mask=True)
    upstream: UpstreamSocket = _UpstreamSocket(
        reader,
        writer,
        None,  # no subprotocol
        cast(ClientResponse, _Connection(proto)),
        aiohttp.ClientWSTimeout(ws_receive=None, ws_close=options.close_timeout),
        True,  # autoclose
        True,  # autoping
        loop,
        heartbeat=options.heartbeat,
    )
    # The reader refuses a message of its size and more: the largest taken is the limit.
    refused_from = options.max_message_bytes + 1
    upstream._parser = WebSocketReader(reader, refused_from, compress=False, decode_text=False)
    if isinstance(proto, _UpstreamProtocol):  # before the first byte goes to the reader
        proto.large_frames = frames.splitter(reader, masked=False, max_size=refused_from)
    # Bytes that came with the 101 (the service's session.created) are parsed now.
    proto.set_parser(upstream._parser, reader, data_received_cb=upstream._on_data_received)
    return upstream


def abort(upstream: UpstreamSocket) -> None:
    """Drop the connection at once, discarding what waits to be written: an upstream that
    stopped reading never takes a close frame, and a graceful close would wait for it for
    ever (the session, its slot and its socket with it)."""
    # The writer's: aiohttp's protocol forgets its transport once asked to close it.
    writer = upstream._writer
    transport = writer.transport if writer is not None else None
    if transport is not None:
        transport.abort()


def _header_lines(headers: Mapping[str, str]) -> bytes:
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    if lines.count("\r") != len(headers) or lines.count("\n") != len(headers):
        # A value holding a line break would split the request (aiohttp refuses it too).
        raise ValueError("a header value holds a line break")
    return lines.encode("latin-1")


class _UpstreamProtocol(ResponseHandler):
    """aiohttp's client protocol. Once upgraded (its parser is the WebSocket reader) and with
    no read timeout armed (none is set on an upstream socket), its bytes go to the reader as
    `ResponseHandler.data_received` sends them, with one call fewer per frame."""

    # Made before the first byte goes to the WebSocket reader (`_upgrade`).
    large_frames: frames.Splitter | None = None

    def connection_lost(self, exc: BaseException | None) -> None:
        # The splitter holds the socket's queue, which holds this protocol: a cycle that
        # would leave every closed session to the cycle collector.
        self.large_frames = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        parser: Any = self._payload_parser  # aiohttp types it as its initial None
        if parser is None or self._read_timeout_handle is not None:
            # Bytes the reader gets without the splitter: it would lose its place in the
            # frames (none do today: the 101 is read before the splitter is made, and no
            # read timeout is set on an upstream socket).
            self.large_frames = None
            super().data_received(data)
            return
        callback = self._data_received_cb
        if callback is not None:
            callback()
        protocol_error, _ = frames.feed(parser, data, self.large_frames)
        if protocol_error:
            self._payload = None
            self._payload_parser = None
            self._payload_parser_failed = True


class _UpstreamSocket(LazyHeartbeat, ClientWebSocketResponse):
    """aiohttp's client socket, with a heartbeat that costs nothing per read."""


class _Connection:
    """What `ClientWebSocketResponse` uses of its `ClientResponse`: ``connection`` (None:
    the connector's defaults apply) and ``close()`` (closes the socket)."""

    __slots__ = ("_proto",)
    connection = None

    def __init__(self, proto: ResponseHandler) -> None:
        self._proto = proto

    def close(self) -> None:
        self._proto.close()

    def __del__(self) -> None:
        # aiohttp's ClientResponse, which this stands in for, closes a connection still
        # open when it is collected; so does this, rather than leaving the socket to the
        # transport's finaliser (an unclosed-transport warning, and the fd held till then).
        if self._proto.transport is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._proto.close()
