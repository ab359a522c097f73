"""The upstream handshake (relay/upstream/handshake.py) against real servers on 127.0.0.1:
aiohttp's WebSocket server, a raw one that answers what each test says, and TLS (trustme).

These also pin the aiohttp internals the dialer builds on (its response parser and protocol,
its frame reader and writer, the `ClientWebSocketResponse` constructor): an aiohttp upgrade
that changes them fails here, not in production.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import trustme
from aiohttp import WSMsgType, web
from aiohttp.client_proto import ResponseHandler
from prometheus_client import generate_latest
from yarl import URL

from relay.errors import UpstreamRefused
from relay.session import frames
from relay.state import STATE
from relay.upstream.credentials import ApiKeyCredential
from relay.upstream.dial import open_upstream
from relay.upstream.handshake import Dialer, HandshakeRefused, SocketOptions, UpstreamTarget
from tests.helpers import ALPHA_KEY, AZURE_KEY, UPGRADE, FakeUpstream, relay_config

PATH = "/openai/v1/realtime?model=az-gpt-realtime"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OPTIONS = SocketOptions(close_timeout=2.0, heartbeat=20.0, max_message_bytes=1 << 20)


async def serve(app: web.Application, ssl_context: ssl.SSLContext | None = None) -> Any:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    return runner, runner.addresses[0][1]


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., Awaitable[int]]]:
    runners: list[web.AppRunner] = []

    async def start(app: web.Application, ssl_context: ssl.SSLContext | None = None) -> int:
        runner, port = await serve(app, ssl_context)
        runners.append(runner)
        return int(port)

    yield start
    for runner in runners:
        await runner.cleanup()


# What a raw server answers a request head with (given its Sec-WebSocket-Key): bytes, then
# it waits for the client to close; SILENT, nothing; bytes ending in HANG_UP, those bytes
# and it closes at once.
RawAnswer = Callable[[bytes], bytes]
SILENT, HANG_UP = b"(silent)", b"(hang up)"


@dataclass
class RawServer:
    port: int
    # Set when the connection is closed; what came before a complete request head, if any.
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    partial_head: bytes | None = None
    head: bytes = b""  # the request head it read
    after: bytes = b""  # what it read after the head, till the client closed


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[RawAnswer], Awaitable[RawServer]]]:
    """A server that reads one request head and answers it."""
    servers: list[asyncio.Server] = []

    async def start(answer: RawAnswer) -> RawServer:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as closed_early:
                raw.partial_head = closed_early.partial
                writer.close()
                raw.closed.set()
                return
            key = next(
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            raw.head = head
            reply = answer(key)
            hang_up = reply.endswith(HANG_UP)
            if hang_up:
                reply = reply.removesuffix(HANG_UP)
            if reply != SILENT:
                writer.write(reply)
            if not hang_up:
                raw.after = await reader.read()  # until the client closes
            writer.close()
            raw.closed.set()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        raw = RawServer(server.sockets[0].getsockname()[1])
        return raw

    yield start
    for server in servers:
        server.close()


def accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def switching(key: bytes, accept_key: bytes | None = None) -> bytes:
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + (accept_key or accept(key)) + b"\r\n\r\n"
    )


def text_frame(payload: bytes) -> bytes:
    assert len(payload) < 126
    return bytes([0x81, len(payload)]) + payload


def target(port: int, scheme: str = "http", host: str = "127.0.0.1") -> UpstreamTarget:
    return UpstreamTarget.of(URL(f"{scheme}://{host}:{port}{PATH}"))


async def dial(port_or_target: int | UpstreamTarget, **kwargs: Any) -> Any:
    where = port_or_target if isinstance(port_or_target, UpstreamTarget) else target(port_or_target)
    dialer = kwargs.pop("dialer", None) or Dialer(ssl.create_default_context())
    return await open_upstream(
        dialer,
        where,
        ApiKeyCredential(AZURE_KEY),
        request_id="rs_0123456789abcdef",
        connect_timeout=kwargs.pop("connect_timeout", 5.0),
        options=replace(OPTIONS, heartbeat=kwargs.pop("heartbeat", OPTIONS.heartbeat)),
    )


async def test_a_session_runs_over_the_dialed_socket(servers):
    seen: dict[str, Any] = {}
    pinged, closed = asyncio.Event(), asyncio.Event()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        seen["path_qs"] = request.path_qs
        seen["headers"] = dict(request.headers)
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        await ws.send_str('{"type":"session.created"}')
        async for msg in ws:
            if msg.type is WSMsgType.PING:
                pinged.set()
                await ws.pong(msg.data)
            elif msg.type is WSMsgType.TEXT:
                await ws.send_str(msg.data)
        seen["close_code"], seen["close_reason"] = ws.close_code, msg.extra
        closed.set()
        return ws

    app = web.Application()
    app.router.add_get("/openai/v1/realtime", handler)
    port = await servers(app)
    upstream = await dial(port, heartbeat=0.1)

    created = await upstream.receive()
    assert (created.type, created.data) == (WSMsgType.TEXT, b'{"type":"session.created"}')
    await upstream.send_frame(b'{"type":"x"}', WSMsgType.TEXT)
    echoed = await upstream.receive()
    assert echoed.data == b'{"type":"x"}'  # bytes: frames are never decoded
    await pinged.wait()  # the heartbeat pings a quiet upstream
    await upstream.close(code=4001, message=b"bye")
    await closed.wait()

    assert seen["close_code"] == 4001
    assert upstream.close_code == 1000  # the server's close reply was read
    assert seen["path_qs"] == PATH
    headers = seen["headers"]
    assert headers["Host"] == f"127.0.0.1:{port}"
    assert headers["api-key"] == AZURE_KEY
    assert headers["x-ms-client-request-id"] == "rs_0123456789abcdef"
    assert "Sec-WebSocket-Extensions" not in headers  # no permessage-deflate


async def test_events_sent_with_the_101_are_not_lost(raw_server):
    close = bytes([0x88, 2]) + (1000).to_bytes(2, "big")
    raw = await raw_server(lambda key: switching(key) + text_frame(b'{"type":"first"}') + close)
    upstream = await dial(raw.port)
    first = await upstream.receive()
    assert first.data == b'{"type":"first"}'
    assert (await upstream.receive()).type is WSMsgType.CLOSE
    await raw.closed.wait()


def refused_with(status: str, body: bytes, *headers: bytes) -> bytes:
    head = [f"HTTP/1.1 {status}".encode(), *headers, b"Content-Length: %d" % len(body)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


# An upstream that echoes what it was sent (the key included) in its error body: the body is
# never read into an error, a log line or the client's answer (as with aiohttp's client).
ECHO = b'{"error":{"message":"bad request from api-key ' + AZURE_KEY.encode() + b'"}}'


@pytest.mark.parametrize(
    ("answer", "status", "code", "retry_after"),
    [
        (refused_with("429 Too Many", ECHO, b"Retry-After: 6.5"), 429, "upstream_rate_limited", "7"),
        (refused_with("429 Too Many", b""), 429, "upstream_rate_limited", "1"),
        (refused_with("401 Unauthorized", ECHO), 502, "upstream_auth_failed", None),
        (refused_with("403 Forbidden", ECHO), 502, "upstream_auth_failed", None),
        (refused_with("404 Not Found", ECHO), 502, "upstream_error", None),
        (refused_with("500 Internal Server Error", ECHO), 502, "upstream_error", None),
        (refused_with("503 Busy", b""), 502, "upstream_error", None),
        # Not followed (aiohttp's client would have, resending the key to wherever it points).
        (refused_with("307 Temporary Redirect", b"", b"Location: http://127.0.0.1:1/"), 502,
         "upstream_error", None),
        (refused_with("200 OK", b"ok"), 502, "upstream_not_websocket", None),
        (b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nbusy!\r\n0\r\n\r\n",
         502, "upstream_error", None),
        (b"NOT HTTP AT ALL\r\n\r\n", 502, "upstream_unavailable", None),
        (HANG_UP, 502, "upstream_unavailable", None),
        # Closed mid-handshake: in the status line, in the headers, before the blank line.
        (b"HTTP/1.1 10" + HANG_UP, 502, "upstream_unavailable", None),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: webso" + HANG_UP, 502,
         "upstream_unavailable", None),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n" + HANG_UP, 502,
         "upstream_unavailable", None),
    ],
)  # fmt: skip
async def test_an_answer_that_is_not_an_upgrade_is_refused_and_closed(
    raw_server, caplog, answer, status, code, retry_after
):
    raw = await raw_server(lambda key: answer)
    with structlog.testing.capture_logs() as logs, pytest.raises(UpstreamRefused) as refused:
        await dial(raw.port)
    assert (refused.value.status, refused.value.code) == (status, code)
    assert refused.value.retry_after == retry_after
    await raw.closed.wait()  # closed on the relay's side too: nothing leaks
    assert AZURE_KEY.encode() in raw.head  # it was sent, and is nowhere else
    assert AZURE_KEY not in told(refused.value) + repr(logs) + caplog.text


def told(error: BaseException) -> str:
    """Everything an error says, through its causes and contexts."""
    said: list[str] = []
    seen: BaseException | None = error
    while seen is not None:
        said += [str(seen), repr(seen), repr(getattr(seen, "__dict__", {}))]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(said)


@pytest.mark.parametrize(
    "bad",
    [
        lambda key: switching(key, accept_key=b"d3Jvbmc="),
        lambda key: switching(key).replace(b"Upgrade: websocket", b"Upgrade: h2c"),
        lambda key: switching(key).replace(b"Connection: Upgrade", b"Connection: close"),
        lambda key: switching(key).replace(b"Upgrade: websocket\r\n", b""),
        lambda key: switching(key).replace(b"Sec-WebSocket-Accept: " + accept(key) + b"\r\n", b""),
        lambda key: switching(key)[:-2] + b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
        lambda key: switching(key)[:-2] + b"Sec-WebSocket-Protocol: realtime\r\n\r\n",
    ],
    ids=[
        "wrong accept",
        "wrong upgrade",
        "wrong connection",
        "no upgrade",
        "no accept",
        "an extension not offered",
        "a subprotocol not offered",
    ],
)
async def test_a_101_that_is_not_a_valid_answer_is_refused(raw_server, bad):
    raw = await raw_server(bad)
    with pytest.raises(UpstreamRefused) as refused:
        await dial(raw.port)
    assert (refused.value.status, refused.value.code) == (502, "upstream_error")
    assert isinstance(refused.value.__cause__, HandshakeRefused)
    await raw.closed.wait()


async def test_a_session_start_that_times_out_drops_the_upstream_at_once(raw_server, start_relay):
    """An upstream silent after its 101 would not answer a close either: the client's 504
    waited close_timeout_seconds more for it."""
    raw = await raw_server(switching)
    config = relay_config(
        f"http://127.0.0.1:{raw.port}",
        upstream={"connect_timeout_seconds": 0.2},
        server={"close_timeout_seconds": 60},
    )
    relay = await start_relay(config)
    url = f"http://127.0.0.1:{relay.port}/openai/v1/realtime?model=gpt-realtime"
    async with aiohttp.ClientSession() as http:
        headers = {**UPGRADE, "api-key": ALPHA_KEY}
        async with http.get(url, headers=headers) as response:
            assert response.status == 504
            assert (await response.json())["error"]["code"] == "upstream_timeout"
    await raw.closed.wait()
    assert raw.after == b""  # dropped, with no close frame


async def test_a_silent_upstream_times_out_and_is_closed(raw_server):
    raw = await raw_server(lambda key: SILENT)
    with pytest.raises(UpstreamRefused) as refused:
        await dial(raw.port, connect_timeout=0.2)
    assert (refused.value.status, refused.value.code) == (504, "upstream_timeout")
    await raw.closed.wait()


async def test_a_name_that_does_not_resolve_is_refused():
    """DNS failure (.invalid never resolves, RFC 6761): 502, the resolver's error as cause."""
    with pytest.raises(UpstreamRefused) as refused:
        await dial(target(443, "wss", "relay-handshake-test.invalid"))
    assert (refused.value.status, refused.value.code) == (502, "upstream_unavailable")
    assert isinstance(refused.value.__cause__, socket.gaierror)
    assert AZURE_KEY not in told(refused.value)


async def test_a_connect_that_is_never_answered_times_out():
    """A listener whose accept queue is full drops the SYN: the TCP connect itself hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname())  # fills the queue
    try:
        with pytest.raises(UpstreamRefused) as refused:
            await dial(listener.getsockname()[1], connect_timeout=0.3)
        assert (refused.value.status, refused.value.code) == (504, "upstream_timeout")
    finally:
        filler.close()
        listener.close()


async def test_a_header_value_with_a_line_break_is_never_sent(raw_server):
    raw = await raw_server(lambda key: switching(key))
    dialer = Dialer(ssl.create_default_context())
    with pytest.raises(ValueError, match="line break"):
        await dialer.open(target(raw.port), {"api-key": "a\r\nX-Injected: 1"}, OPTIONS)
    await raw.closed.wait()
    assert raw.partial_head == b""  # the connection closed with nothing sent


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    return context


async def test_tls_with_the_configured_ca_and_a_resolved_name(servers, ca):
    """wss:// to a name (localhost: resolved, possibly to ::1 and 127.0.0.1, the server on
    the second only), verified against the CA the relay was given."""
    fake = FakeUpstream()
    port = await servers(fake.app(), tls_server_context(ca))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    dialer = Dialer(client_context)
    for _ in range(2):  # the second from the DNS cache
        upstream = await dial(target(port, "wss", "localhost"), dialer=dialer)
        assert (await upstream.receive()).data.startswith(b'{"type":"session.created"')
        await upstream.send_frame(b'{"type":"x"}', WSMsgType.TEXT)
        assert (await upstream.receive()).data == b'{"type":"x"}'
        await upstream.close()
    assert fake.requests[0]["headers"]["Host"] == f"localhost:{port}"


async def test_tls_with_an_untrusted_certificate_is_refused(servers, ca):
    port = await servers(FakeUpstream().app(), tls_server_context(ca))
    with pytest.raises(UpstreamRefused) as refused:
        await dial(target(port, "wss", "localhost"))
    assert (refused.value.status, refused.value.code) == (502, "upstream_unavailable")


async def test_tls_with_a_certificate_for_another_name_is_refused(servers, ca):
    port = await servers(FakeUpstream().app(), tls_server_context(ca))  # a cert for localhost
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with pytest.raises(UpstreamRefused) as refused:
        await dial(target(port, "wss", "127.0.0.1"), dialer=Dialer(context))
    assert (refused.value.status, refused.value.code) == (502, "upstream_unavailable")
    assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)


async def test_tls_to_a_server_that_does_not_speak_it_is_refused(servers):
    port = await servers(FakeUpstream().app())  # answers the ClientHello with a plain 400
    with pytest.raises(UpstreamRefused) as refused:
        await dial(target(port, "wss"))
    assert (refused.value.status, refused.value.code) == (502, "upstream_unavailable")
    assert isinstance(refused.value.__cause__, ssl.SSLError)


async def test_a_refused_handshake_tells_the_client_nothing_the_upstream_said(
    raw_server, start_relay, caplog
):
    """Through the relay: an upstream 403 whose body echoes the key becomes the relay's own
    JSON refusal; the key is in no response, log line or metric."""
    raw = await raw_server(lambda key: refused_with("403 Forbidden", ECHO))
    relay = await start_relay(relay_config(f"http://127.0.0.1:{raw.port}"))
    url = f"ws://127.0.0.1:{relay.port}/openai/v1/realtime?model=gpt-realtime"
    upgrade = {**UPGRADE, "api-key": ALPHA_KEY}
    with structlog.testing.capture_logs() as logs:
        async with aiohttp.ClientSession() as http, http.get(url, headers=upgrade) as response:
            body = await response.json()
    metrics = generate_latest(relay.app[STATE].metrics.registry).decode()
    assert response.status == 502
    assert body["error"]["code"] == "upstream_auth_failed"
    assert 'code="upstream_auth_failed"' in metrics
    assert "upstream_connect_failed" in repr(logs)
    said = f"{body} {dict(response.headers)} {metrics} {logs!r} {caplog.text}"
    assert AZURE_KEY not in said and "bad request from" not in said


async def test_the_relay_dials_a_tls_upstream_with_its_ca_file(
    servers, ca, start_relay, tmp_path: Path
):
    fake = FakeUpstream()
    port = await servers(fake.app(), tls_server_context(ca))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    config = relay_config(f"https://localhost:{port}", upstream={"ca_file": str(ca_file)})
    relay = await start_relay(config)
    url = f"ws://127.0.0.1:{relay.port}/openai/v1/realtime?model=gpt-realtime"
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(url, headers={"api-key": ALPHA_KEY}) as client,
    ):
        created = await client.receive_json()
        assert created["type"] == "session.created"
    assert fake.requests[0]["path"] == "/openai/v1/realtime"


async def test_the_frame_layer_can_arm_a_dialed_socket(raw_server):
    """The dialer builds the queue class aiohttp's client builds, so the frame layer's
    replacement (installed when relay.app is imported) forwards upstream frames too."""
    frames.install()
    close = bytes([0x88, 2]) + (1000).to_bytes(2, "big")
    raw = await raw_server(lambda key: switching(key) + close)
    upstream = await dial(raw.port)
    assert isinstance(frames.queue_of(upstream), frames.ForwardingQueue)
    assert (await upstream.receive()).type is WSMsgType.CLOSE
    await raw.closed.wait()


def test_an_upgraded_upstreams_bytes_go_to_the_reader_as_aiohttp_sends_them():
    """The upstream protocol hands an upgraded socket's bytes to the WebSocket reader itself,
    as aiohttp's `ResponseHandler.data_received` does when no read timeout is armed. This
    fails when aiohttp's branch changes, so the copy is reviewed."""
    theirs = " ".join(inspect.getsource(ResponseHandler.data_received).split())
    assert "if self._payload_parser_failed:" in theirs
    assert "if data: self._reschedule_timeout()" in theirs
    assert (
        "if self._payload_parser is not None: if self._data_received_cb is not None: "
        "self._data_received_cb() "
    ) in theirs
    assert (
        "protocol_error, _ = self._payload_parser.feed_data(data) if protocol_error: "
        "self._payload = None self._payload_parser = None self._payload_parser_failed = True "
        "return"
    ) in theirs
    # With no timeout armed, rescheduling it does nothing but set its handle to None again.
    reschedule = " ".join(inspect.getsource(ResponseHandler._reschedule_timeout).split())
    assert "if timeout: self._read_timeout_handle = self._loop.call_later(" in reschedule
    assert "else: self._read_timeout_handle = None" in reschedule
