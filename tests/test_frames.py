"""The frame layer: frames forwarded inside the read callback, in order with the pump's.

Also pins the aiohttp internals `relay.session.frames` uses, so an aiohttp upgrade that moves
them fails here rather than in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import structlog.testing
from aiohttp import WSMsgType
from aiohttp.web_protocol import RequestHandler

from relay.edge.connection import RelayConnection
from relay.session import frames
from relay.session.pump import Bridge
from relay.state import STATE
from tests.cycles import collector_off, in_cycles, watch_sessions
from tests.helpers import ALPHA_KEY, FakeUpstream, b64, read_until, relay_config


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[bool]]:
    """What each direction's read-callback path decided, frame by frame."""
    decisions: dict[str, list[bool]] = {"in": [], "out": []}
    for direction, name in (("in", "_forward_in"), ("out", "_forward_out")):
        original = getattr(Bridge, name)

        def counted(self: Bridge, msg: Any, original: Any = original, d: str = direction) -> bool:
            try:
                took = bool(original(self, msg))
            except Exception:
                decisions[d].append(False)
                raise
            decisions[d].append(took)
            return took

        monkeypatch.setattr(Bridge, name, counted)
    return decisions


# 12 MB of 60 KB echoes: more than the kernel buffers between the relay and a test client.
_FLOOD = 200


def _append(seq: int) -> bytes:
    return orjson.dumps(
        {"type": "input_audio_buffer.append", "event_id": f"a{seq}", "audio": b64(b"\0" * 960)}
    )


async def _relay_on_echo(start_relay: Any, start_fake: Any, **policy: Any) -> tuple[Any, Any]:
    fake = FakeUpstream()
    upstream = await start_fake(fake.app())
    endpoint = str(upstream.make_url(""))
    config = relay_config(
        endpoint,
        deployments={
            "gpt-realtime": {
                "endpoint": endpoint,
                "credential": {"env": "TEST_AZURE_KEY"},
                "policy": {"allowed_events": ["input_audio_buffer.append", "session.update"]}
                | policy,
            }
        },
    )
    relay = await start_relay(config)
    return fake, relay


def _url(relay: Any) -> str:
    return f"http://127.0.0.1:{relay.port}/openai/v1/realtime?model=gpt-realtime"


async def test_audio_frames_take_the_callback_path_both_ways(start_relay, start_fake, http, taken):
    fake, relay = await _relay_on_echo(start_relay, start_fake)
    async with http.ws_connect(_url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        for seq in range(200):
            await ws.send_str(_append(seq).decode())
            echoed = orjson.loads((await ws.receive()).data)
            assert echoed["event_id"] == f"a{seq}"
    assert fake.received == [_append(seq) for seq in range(200)]
    # Paced frames arrive while the pumps wait: nearly all of them are forwarded in the
    # callback (a few may land while a pump is still finishing the frame before).
    assert sum(taken["in"]) >= 190
    assert sum(taken["out"]) >= 190


async def test_declined_frames_keep_their_place(start_relay, start_fake, http, taken):
    """A refused event (the pump answers it) and a rewritten one sit between audio frames
    sent back to back: the upstream gets everything in the order the client sent it."""
    fake, relay = await _relay_on_echo(
        start_relay, start_fake, locked=["instructions"], max_violations=1000
    )
    sent: list[bytes] = []
    refused = orjson.dumps({"type": "response.create", "event_id": "no"})
    rewrite = orjson.dumps({"type": "session.update", "session": {"instructions": "x"}})
    async with http.ws_connect(_url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        for seq in range(300):
            frame = _append(seq)
            await ws.send_str(frame.decode())
            sent.append(frame)
            if seq % 50 == 10:
                await ws.send_str(refused.decode())
            if seq % 50 == 30:
                await ws.send_str(rewrite.decode())
                sent.append(b"rewritten")
        errors = 0
        echoed = 0
        while echoed < len(sent):
            event = orjson.loads((await ws.receive()).data)
            if event["type"] == "error":
                errors += 1
            else:
                echoed += 1
    assert errors == 6
    got = [b"rewritten" if f.startswith(b'{"type":"session.update"') else f for f in fake.received]
    assert got == sent
    assert True in taken["in"] and False in taken["in"]


async def test_a_client_that_stops_reading_stops_the_callback_path(
    start_relay, start_fake, http, taken, monkeypatch
):
    """The callback path writes only while the client's transport takes data; past its
    high-water mark the pump takes over and waits for the drain (backpressure)."""
    waited = asyncio.Event()
    drained = Bridge._drained

    async def drained_seen(self: Bridge, direction: str, ws: Any) -> None:
        if direction == "out":
            waited.set()
        await drained(self, direction, ws)

    monkeypatch.setattr(Bridge, "_drained", drained_seen)
    big = [_append(seq)[:-2] + b"A" * 60_000 + b'"}' for seq in range(_FLOOD)]

    async def flood(ws: Any, fake: FakeUpstream) -> None:
        await ws.send_str('{"type":"session.created","event_id":"e0","session":{}}')
        await ws.receive()  # the client's go
        for frame in big:
            await ws.send_str(frame.decode())
        await ws.receive()

    fake = FakeUpstream(script=flood)
    upstream = await start_fake(fake.app())
    relay = await start_relay(relay_config(str(upstream.make_url(""))))
    async with http.ws_connect(_url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        await ws.send_str(_append(0).decode())
        await waited.wait()  # the client's buffers filled: the pump waits for its drain
        for frame in big:
            msg = await ws.receive()
            assert msg.type is WSMsgType.TEXT and msg.data == frame.decode()
    assert 0 < sum(taken["out"]) < _FLOOD  # the rest went through the pump


async def test_the_aiohttp_internals_the_frame_layer_uses(start_fake, http):
    """Fails when an aiohttp upgrade moves what relay.session.frames relies on."""
    frames.install()
    accepted: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def handler(request: Any) -> Any:
        ws = aiohttp.web.WebSocketResponse()
        await ws.prepare(request)
        accepted.set_result(ws)
        async for _ in ws:
            pass
        return ws

    app = aiohttp.web.Application()
    app.router.add_get("/", handler)
    server = await start_fake(app)
    async with http.ws_connect(server.make_url("/")) as client:
        server_ws = await accepted
        for ws in (client, server_ws):
            queue = frames.queue_of(ws)
            assert isinstance(queue, frames.ForwardingQueue)
            assert hasattr(queue, "_buffer") and not queue._buffer
            writer = ws._writer
            assert callable(writer._write_websocket_frame)
            assert writer._closing is False and not writer.compress
            assert writer.transport is not None and writer.protocol.writing_paused is False
            assert callable(writer.protocol._drain_helper)
            assert ws._closing is False
            assert ws._exception is None and ws.exception() is None  # `forget_error`
            assert frames.writable(ws) and not frames.paused(ws)
            assert isinstance(writer._output_size, int) and isinstance(writer._limit, int)
        assert client._writer.use_mask is True and server_ws._writer.use_mask is False
        assert isinstance(client._writer.get_random_bits(), int)
        # An armed queue gets the message first; a declined one is queued as usual.
        taken: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        queue = frames.queue_of(client)
        frames.arm(queue, lambda msg: taken.set_result(msg.data) or True)
        await server_ws.send_str("taken")
        assert await taken == "taken"  # this client decodes text
        frames.arm(queue, lambda msg: False)
        await server_ws.send_str("declined")
        msg = await client.receive()
        assert msg.data == "declined"
        assert queue.forward is None  # disarmed by the decline

        def broken(msg: Any) -> bool:
            raise KeyError("a bug")

        frames.arm(queue, broken)
        with structlog.testing.capture_logs() as logs:
            await server_ws.send_str("after a bug")
            msg = await client.receive()
        assert msg.data == "after a bug"  # queued for the pump, not lost
        assert {"event": "frame_callback_failed", "error": "KeyError", "log_level": "error"} in logs


async def test_a_lost_connection_keeps_no_callback_to_its_socket(
    start_relay, start_fake, http, monkeypatch
):
    """aiohttp leaves each socket's heartbeat callback (a bound method of the socket) on its
    connection's protocol, a reference cycle that only the cycle collector frees: under
    set-up churn it freed tens of thousands of objects a pass (120-170 ms pauses). The frame
    layer drops it when the connection is lost, on both of a session's connections."""
    fake, relay = await _relay_on_echo(start_relay, start_fake)
    protocols: list[Any] = []
    run = Bridge.run

    async def watched(self: Bridge) -> Any:
        protocols.extend(ws._writer.protocol for ws in (self.client, self.upstream))
        return await run(self)

    monkeypatch.setattr(Bridge, "run", watched)
    async with http.ws_connect(_url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        assert all(p._data_received_cb is not None for p in protocols)  # heartbeats on
        assert all(p.large_frames is not None for p in protocols)  # splitters made
        await ws.send_str(_append(1).decode())
        await ws.receive()
    await relay.app[STATE].idle.wait()
    for _ in range(100_000):  # the connections are lost over a few loop passes
        if all(p.transport is None for p in protocols):
            break
        await asyncio.sleep(0)  # one loop pass, not a wait for time
    assert len(protocols) == 2 and all(p.transport is None for p in protocols)
    assert [p._data_received_cb for p in protocols] == [None, None]
    assert [p.large_frames for p in protocols] == [None, None]  # the splitters, likewise


@pytest.mark.parametrize("ending", ["closed", "vanished"])
async def test_a_finished_session_is_freed_without_the_cycle_collector(
    start_relay, start_fake, http, monkeypatch, ending
):
    """A session's objects (both sockets, both protocols, the bridge) go when the last
    reference does. A cycle among them would leave every session to the cycle collector,
    whose passes under set-up churn took 17-28 ms (the set-up p99 at 16 connectors). Two
    were found: the client socket, kept on its protocol as `upgrading` when aiohttp
    prepared it a second time after the handler returned; and, when a client vanished, the
    error aiohttp keeps on the socket, whose traceback holds the socket (`forget_error`)."""
    fake, relay = await _relay_on_echo(start_relay, start_fake)
    watched = watch_sessions(monkeypatch)
    with collector_off() as unreachable:
        async with http.ws_connect(_url(relay), headers={"api-key": ALPHA_KEY}) as ws:
            await read_until(ws, "session.created")
            await ws.send_str(_append(1).decode())
            await ws.receive()
            if ending == "vanished":
                ws._response.connection.transport.abort()  # no close frame
        await relay.app[STATE].idle.wait()
        await asyncio.sleep(0)  # one loop pass: the connections are lost
        left = in_cycles(unreachable(), watched)
    assert len(watched) == 5 and left == []


async def _recording_server(start_fake: Any, max_msg_size: int) -> tuple[Any, Any, Any]:
    """A WebSocket server at "/": its URL, the texts it receives, and its sockets."""
    received: asyncio.Queue[str] = asyncio.Queue()
    sockets: asyncio.Queue[Any] = asyncio.Queue()

    async def handler(request: Any) -> Any:
        ws = aiohttp.web.WebSocketResponse(max_msg_size=max_msg_size)
        await ws.prepare(request)
        await sockets.put(ws)
        async for msg in ws:
            await received.put(msg.data)
        return ws

    app = aiohttp.web.Application()
    app.router.add_get("/", handler)
    server = await start_fake(app)
    return server.make_url("/"), received, sockets


async def test_large_frames_to_the_upstream_are_masked_in_one_buffer(start_fake, http):
    """The relay's own masked writes (above 64 KiB) reach a WebSocket server as the same text,
    by the callback path's write and the pump's send, and at both ends of the size range."""
    where, received, _ = await _recording_server(start_fake, 16 * 1024 * 1024)
    async with http.ws_connect(where) as client:
        for size in (frames.ONE_COPY_ABOVE + 1, frames.ONE_COPY_ABOVE + 7, 3 * 1024 * 1024 + 2):
            text = bytes(range(48, 58)) * (size // 10) + b"x" * (size % 10)
            frames.write_text(client, text)
            assert await received.get() == text.decode()
            await frames.send_text(client, text)
            assert await received.get() == text.decode()
        await frames.send_text(client, b"small")  # aiohttp's own writer
        assert await received.get() == "small"
        await client.close()
        with pytest.raises(ConnectionError):
            await frames.send_text(client, b"y" * (frames.ONE_COPY_ABOVE + 1))


async def test_a_large_message_goes_in_fragments_and_other_sends_wait_for_its_end(start_fake, http):
    """A masked message of LARGE_FRAME and more is written as fragments, waiting for the
    drain between them; a data frame sent meanwhile (the renewal's switch marker) goes
    after the message's last fragment, never between two of them."""
    where, received, sockets = await _recording_server(start_fake, 16 * 1024 * 1024)
    async with http.ws_connect(where) as client:
        on_server = await sockets.get()
        client._writer.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 16384
        )
        on_server._req.transport.pause_reading()  # the peer stops reading: the drain waits
        big = bytes(range(65, 91)) * (3 * frames.LARGE_FRAME // 26)
        async with asyncio.TaskGroup() as tasks:
            sending = tasks.create_task(frames.send_text(client, big))
            await asyncio.sleep(0)  # one loop pass: it writes until its transport pauses
            assert id(client) in frames._FRAGMENTED and not sending.done()
            marker = tasks.create_task(frames.send_text(client, b"marker"))
            await asyncio.sleep(0)  # one loop pass: the marker finds the message unfinished
            assert not marker.done()
            on_server._req.transport.resume_reading()
        assert await received.get() == big.decode()
        assert await received.get() == "marker"
        assert frames._FRAGMENTED == {}


# Each side of every header length boundary (RFC 6455 5.2: 7-bit, 16-bit and 64-bit lengths).
_BOUNDARY_SIZES = (0, 1, 125, 126, 127, 65535, 65536, 65537, frames.ONE_COPY_ABOVE + 1)


async def test_callback_writes_frame_every_length_both_masked_and_not(start_fake, http):
    """`write_text` frames payloads itself: a client's (masked) and a server's (not) reach an
    aiohttp peer as the same text at every header length, and report the transport's pause."""
    where, to_server, server_sockets = await _recording_server(start_fake, 1 << 20)
    async with http.ws_connect(where, max_msg_size=1 << 20) as client:
        on_server = await server_sockets.get()
        for size in _BOUNDARY_SIZES:
            text = bytes(range(97, 123)) * (size // 26) + b"z" * (size % 26)
            assert frames.write_text(client, text) is False  # nothing waits on loopback
            assert await to_server.get() == text.decode()
            assert frames.write_text(on_server, text) is False
            echoed = await client.receive()
            assert (echoed.type, echoed.data) == (aiohttp.WSMsgType.TEXT, text.decode())
        # Paused is the protocol's flag, read at once after the write.
        on_server._writer.protocol._paused = True
        assert frames.write_text(on_server, b"{}") is True
        on_server._writer.protocol._paused = False
        assert (await client.receive()).data == "{}"
        await client.close()


async def test_a_large_event_reaches_the_upstream_unchanged(start_relay, start_fake, http):
    fake, relay = await _relay_on_echo(start_relay, start_fake)
    event = orjson.dumps(
        {"type": "input_audio_buffer.append", "event_id": "big", "audio": b64(b"\1" * 600_000)}
    )
    async with http.ws_connect(_url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        await ws.send_str(event.decode())
        echoed = orjson.loads((await ws.receive()).data)
        assert echoed["event_id"] == "big"
    assert fake.received == [event]


async def test_a_large_event_is_filled_past_the_reader_both_ways(
    start_relay, start_fake, http, monkeypatch
):
    """An event of LARGE_FRAME and more is filled by the connection's splitter, on the
    client's connection and on the upstream's (the echo), and reaches each side whole."""
    filled: list[int] = []
    feed_parts = frames._feed_parts

    def counted(parser: Any, parts: Any, splitter: Any) -> tuple[bool, bytes]:
        filled.extend(len(part) for is_message, part in parts if is_message)
        return feed_parts(parser, parts, splitter)

    monkeypatch.setattr(frames, "_feed_parts", counted)
    fake, relay = await _relay_on_echo(start_relay, start_fake)
    audio = b64(bytes(range(256)) * (2 * frames.LARGE_FRAME // 256))
    event = orjson.dumps({"type": "input_audio_buffer.append", "event_id": "big", "audio": audio})
    async with http.ws_connect(_url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        await ws.send_str(event.decode())
        echoed = (await ws.receive()).data
        assert orjson.loads(echoed)["audio"] == audio
    assert fake.received == [event]
    assert filled == [len(event), len(echoed)]


def test_an_upgraded_connections_bytes_go_to_the_reader_as_aiohttp_sends_them():
    """`RelayConnection.data_received` hands an upgraded connection's bytes to the WebSocket
    reader itself, as aiohttp's `RequestHandler.data_received` does (one call fewer per
    frame). This fails when aiohttp's upgraded branch changes, so the copy is reviewed."""
    ours = inspect.getsource(RelayConnection.data_received)
    theirs = " ".join(inspect.getsource(RequestHandler.data_received).split())
    assert "if self._force_close or self._close: return" in theirs
    assert (
        "elif data: if self._data_received_cb is not None: self._data_received_cb() "
        "eof, tail = self._payload_parser.feed_data(data) if eof: self.close()"
    ) in theirs
    assert theirs.endswith("if eof: self.close()")  # nothing after it for upgraded bytes
    assert "frames.feed(parser, data, self.large_frames)" in ours  # writes batched, large split


class _Writes:
    """A transport that records each write: a `write` as one chunk, a `writelines` as its
    chunks together (uvloop sends those in one `writev`)."""

    def __init__(self) -> None:
        self.calls: list[list[bytes]] = []

    def write(self, data: bytes) -> None:
        self.calls.append([bytes(data)])

    def writelines(self, chunks: list[bytes]) -> None:
        self.calls.append([bytes(chunk) for chunk in chunks])

    def is_closing(self) -> bool:
        return False


class _Peer:
    """What `write_text` and `writable` use of a server-side socket (unmasked writes)."""

    def __init__(self) -> None:
        self._closing = False
        self._writer = type(
            "Writer",
            (),
            {
                "use_mask": False,
                "_closing": False,
                "compress": 0,
                "transport": _Writes(),
                "protocol": type("Protocol", (), {"_paused": False})(),
            },
        )()


async def test_a_read_of_several_frames_reaches_the_peer_in_one_write():
    """Frames that arrive in one read (a relay that fell behind, a client sending in bursts)
    are written to the peer together when the read is parsed, in order; a lone frame in a
    write of its own. If the peer is then past its high-water mark, the reading side's
    callback is disarmed (its pump waits for the drain), as after a single write."""
    from aiohttp._websocket.reader import WebSocketReader

    protocol = type("Protocol", (), {"_reading_paused": False, "pause_reading": print})()
    queue = frames.ForwardingQueue(protocol, 1 << 16, loop=asyncio.get_running_loop())
    reader = WebSocketReader(queue, 1 << 20, compress=False, decode_text=False)
    peer = _Peer()

    def forward(msg: Any) -> bool:
        assert frames.writable(peer)
        assert frames.write_text(peer, msg.data) is False  # batched: `feed` looks after
        return True

    payloads = [_append(seq) for seq in range(5)]
    framed = [bytes(frames._text_frame(p, True, 0x1020304 + seq)) for seq, p in enumerate(payloads)]
    frames.arm(queue, forward)
    frames.feed(reader, b"".join(framed))
    frames.feed(reader, framed[0])
    unmasked = [bytes(frames._text_frame(p, False, 0)) for p in payloads]
    assert peer._writer.transport.calls == [unmasked, unmasked[:1]]
    assert queue.forward is forward and not queue._buffer

    peer._writer.protocol._paused = True
    frames.feed(reader, b"".join(framed[:2]))
    assert len(peer._writer.transport.calls) == 3  # the read's frames still go, together
    assert queue.forward is None  # and the next ones wait in the queue for the pump
    frames.feed(reader, framed[2])
    assert len(peer._writer.transport.calls) == 3 and len(queue._buffer) == 1
    # Outside a read (the pump's writes), a write is at once and reports the mark itself.
    assert frames.write_text(peer, payloads[0]) is True
    assert peer._writer.transport.calls[-1] == unmasked[:1]


async def test_frames_sent_in_one_segment_reach_the_upstream_in_order(
    start_relay, start_fake, http, taken
):
    """A client's burst (ten appends in one TCP write, so the relay reads them together)
    goes through the read callback and reaches the upstream whole and in order."""
    fake, relay = await _relay_on_echo(start_relay, start_fake)
    async with http.ws_connect(_url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        for burst in range(3):
            payloads = [_append(burst * 10 + seq) for seq in range(10)]
            ws._writer.transport.write(
                b"".join(bytes(frames._text_frame(p, True, 0x5A5A5A5A)) for p in payloads)
            )
            for payload in payloads:
                echoed = orjson.loads((await ws.receive()).data)
                assert echoed["event_id"] == orjson.loads(payload)["event_id"]
    assert fake.received == [_append(seq) for seq in range(30)]
    assert sum(taken["in"]) >= 25


async def test_a_drain_wait_outlives_another_waiters_cancellation():
    """aiohttp's drain waiters share one future (`_drain_waiter`): a close that timed out
    waiting cancelled it, and with it the upstream pump's wait, which tore the session
    down before it could bill the response it cut. `frames._drain` waits on alone."""
    from aiohttp.base_protocol import BaseProtocol

    from relay.session.frames import _drain

    protocol = BaseProtocol(asyncio.get_running_loop())
    protocol.transport = object()  # connected: only whether it is None is read
    protocol.pause_writing()

    async def close_that_times_out() -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0):
                await protocol._drain_helper()

    async with asyncio.TaskGroup() as tasks:
        pump = tasks.create_task(_drain(protocol))
        await asyncio.sleep(0)  # the pump waits on the shared future first
        await close_that_times_out()
        await asyncio.sleep(0)  # the pump sees the cancelled future, and waits again
        assert not pump.done()
        protocol.resume_writing()
