"""Client faults: dead, half-open, slow, and protocol-breaking clients."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from aiohttp import WSMsgType
from structlog.contextvars import merge_contextvars

from relay.edge.auth import hash_key
from relay.state import STATE
from tests.faults.peers import CREATED, DELTA, Firehose, masked_text_frame, raw_client
from tests.faults.test_upstream_faults import outcomes, url
from tests.helpers import ALPHA_KEY, BETA_KEY, FakeUpstream, echo, read_until, relay_config


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_half_open_client_is_found_by_heartbeat(start_fake, start_relay):
    fake = FakeUpstream(script=echo)
    upstream = await start_fake(fake.app())
    relay = await start_relay(
        relay_config(str(upstream.make_url("")), server={"heartbeat_seconds": 0.2})
    )
    async with aiohttp.ClientSession() as own:
        # autoping off and never reading: the relay's pings go unanswered.
        ws = await own.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}, autoping=False)
        await fake.closed.wait()
        assert fake.close_code == 1001
        await ws.close()
    await relay.app[STATE].idle.wait()
    assert outcomes(relay) == {"client_lost": 1}


@pytest.mark.parametrize("pad", [0, 300_000], ids=["small", "large"])  # large: off the loop
async def test_invalid_utf8_closes_with_1007(start_fake, start_relay, http, pad):
    fake = FakeUpstream(script=echo)
    upstream = await start_fake(fake.app())
    relay = await start_relay(relay_config(str(upstream.make_url(""))))
    async with http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        frame = b'{"type":"response.create","p":"' + "é".encode() * pad + b'","x":"\xff\xfe"}'
        await ws.send_frame(frame, WSMsgType.TEXT)
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1007)
    await fake.closed.wait()
    assert fake.received == []  # never forwarded
    await relay.app[STATE].idle.wait()
    assert outcomes(relay) == {"client_invalid_utf8": 1}


async def echo_relay(start_fake, start_relay, **server: Any) -> tuple[FakeUpstream, Any]:
    """An echo upstream behind a relay (with these `[server]` settings)."""
    fake = FakeUpstream(script=echo)
    upstream = await start_fake(fake.app())
    return fake, await start_relay(relay_config(str(upstream.make_url("")), server=server))


async def echo_relay_of_4096(start_fake, start_relay) -> tuple[FakeUpstream, Any]:
    """An echo upstream behind a relay that takes messages of up to 4096 bytes."""
    return await echo_relay(start_fake, start_relay, max_message_bytes=4096)


@pytest.mark.parametrize("size", [4096 + 1, 64 * 1024 * 1024], ids=["limit+1", "64MiB"])
async def test_oversize_frame_closes_with_1009_and_a_reason(start_fake, start_relay, http, size):
    fake, relay = await echo_relay_of_4096(start_fake, start_relay)
    with structlog.testing.capture_logs() as logs:
        async with http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as ws:
            await read_until(ws, "session.created")
            await ws.send_str(append_of(size).decode())
            # The relay reads and drops the rest of the frame, so its close frame is not lost
            # to a reset while the frame is still arriving.
            msg = await ws.receive()
            assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1009)
            assert msg.extra == "message too big: the limit is 4096 bytes"
        await fake.closed.wait()
        await relay.app[STATE].idle.wait()
    assert fake.close_code == 1001
    assert outcomes(relay) == {"client_message_too_big": 1}
    # The log says what the client was told (aiohttp's words named its own limit, 4097).
    (ended,) = [e for e in logs if e["event"] == "session_ended"]
    assert ended["close_reason"] == msg.extra


async def test_a_message_of_exactly_the_limit_goes_through_both_ways(start_fake, start_relay, http):
    """`max_message_bytes` is the largest message taken: aiohttp refuses its own limit
    itself, and a message of exactly the configured size got 1009 "the limit is" that size."""
    _, relay = await echo_relay_of_4096(start_fake, start_relay)
    async with http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        event = append_of(4096).decode()
        await ws.send_str(event)
        assert (await ws.receive()).data == event  # up and echoed back down


async def send_part(ws: aiohttp.ClientWebSocketResponse, event: bytes) -> bytes:
    """Send the first 30,000 bytes of ``event``'s frame, in the read that carries an event
    whose echo says the relay has read them; return the rest of the frame."""
    frame = masked_text_frame(event)
    clear = masked_text_frame(b'{"type":"input_audio_buffer.clear"}')
    ws._writer.transport.write(clear + frame[:30_000])
    await read_until(ws, "input_audio_buffer.clear")
    return frame[30_000:]


def alpha_team(**tables: dict[str, Any]) -> dict[str, Any]:
    """Team alpha as `relay_config` writes it, with more tables (limits, policy)."""
    return {"keys": [hash_key(ALPHA_KEY)], "deployments": ["gpt-realtime"], **tables}


def append_of(size: int) -> bytes:
    prefix = b'{"type":"input_audio_buffer.append","audio":"'
    return prefix + b"A" * (size - len(prefix) - 2) + b'"}'


async def test_messages_arriving_past_the_process_budget_are_refused_with_1013(
    start_fake, start_relay, http
):
    fake = FakeUpstream(script=echo)
    upstream = await start_fake(fake.app())
    relay = await start_relay(
        relay_config(
            str(upstream.make_url("")),
            server={"max_message_bytes": 1_000_000, "message_buffer_bytes": 1_000_000},
        )
    )
    budget = relay.app[STATE].message_budget
    async with (
        http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as holder,
        http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as live,
        http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as refused,
    ):
        for ws in (holder, live, refused):
            await read_until(ws, "session.created")
        rest = await send_part(holder, append_of(990_000))
        assert budget.held == 990_000
        # Past the bound, a message of 64 KiB or less still goes through: live audio is
        # never refused for someone else's large messages.
        live._writer.transport.write(masked_text_frame(append_of(60_000)))
        assert (await live.receive()).data.encode() == append_of(60_000)
        # 100,000 more would pass 1,000,000: refused at its header, its client told why, the
        # rest of its frame read and dropped so that the close is not lost to a reset.
        with structlog.testing.capture_logs() as logs:
            refused._writer.transport.write(masked_text_frame(append_of(100_000)))
            msg = await refused.receive()
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1013)
        assert msg.extra == "relay busy: too many large messages arriving at once; try again later"
        [line] = [e for e in logs if e["event"] == "message_buffer_full"]
        assert (line["frame_bytes"], line["held_bytes"], line["limit_bytes"]) == (
            100_000,
            990_000,
            1_000_000,
        )
        # The holder's event, once whole, goes on; then there is room again.
        holder._writer.transport.write(rest)
        assert (await holder.receive()).data.encode() == append_of(990_000)
        assert budget.held == 0
        live._writer.transport.write(masked_text_frame(append_of(100_000)))
        assert (await live.receive()).data.encode() == append_of(100_000)
    await relay.app[STATE].idle.wait()
    assert outcomes(relay) == {"message_buffer_full": 1, "client_closed": 2}
    large = [len(m) for m in fake.received if len(m) > 50_000]
    assert large == [60_000, 990_000, 100_000]
    assert budget.held == 0


async def test_a_team_holds_no_more_than_its_part_of_the_buffer(start_fake, start_relay, http):
    fake = FakeUpstream(script=echo)
    upstream = await start_fake(fake.app())
    alpha = alpha_team(limits={"message_buffer_bytes": 100_000})
    relay = await start_relay(
        relay_config(
            str(upstream.make_url("")),
            server={"max_message_bytes": 100_000, "message_buffer_bytes": 1_000_000},
            teams={"alpha": alpha},
        )
    )
    state = relay.app[STATE]
    beta_url = url(relay).replace("gpt-realtime", "other")
    async with (
        http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as holder,
        http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as refused,
        http.ws_connect(beta_url, headers={"api-key": BETA_KEY}) as beta,
    ):
        for ws in (holder, refused, beta):
            await read_until(ws, "session.created")
        rest = await send_part(holder, append_of(90_000))
        assert state.team_message_budgets["alpha"].held == state.message_budget.held == 90_000
        registry = state.metrics.registry
        held = {  # whose clients hold the buffer, for the SRE the alert wakes
            team: registry.get_sample_value("relay_message_buffer_team_bytes", {"team": team})
            for team in ("alpha", "beta")
        }
        assert held == {"alpha": 90_000, "beta": 0}
        # Alpha's next large message would pass its 100,000: refused, with room in the process.
        refused._writer.transport.write(masked_text_frame(append_of(70_000)))
        msg = await refused.receive()
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1013)
        # Another team's goes through.
        beta._writer.transport.write(masked_text_frame(append_of(90_000)))
        assert (await beta.receive()).data.encode() == append_of(90_000)
        holder._writer.transport.write(rest)
        assert (await holder.receive()).data.encode() == append_of(90_000)
    await state.idle.wait()
    assert state.message_budget.held == 0
    assert outcomes(relay)["message_buffer_full"] == 1


async def test_frames_sent_with_the_request_are_counted_too(start_fake, start_relay):
    fake = FakeUpstream(script=echo)
    upstream = await start_fake(fake.app())
    relay = await start_relay(relay_config(str(upstream.make_url(""))))
    budget = relay.app[STATE].message_budget
    # A client that does not wait for the 101: its first frames arrive with the request,
    # before the relay has a WebSocket reader for them.
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    held = masked_text_frame(append_of(60_000))
    writer.write(
        "GET /openai/v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: x\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\napi-key: {ALPHA_KEY}\r\n\r\n".encode()
        + masked_text_frame(b'{"type":"input_audio_buffer.clear"}')
        + held[:30_000]
    )
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    while b"input_audio_buffer.clear" not in await server_frame(reader):
        pass
    assert budget.held == 60_000
    writer.write(held[30_000:])
    while b"input_audio_buffer.append" not in await server_frame(reader):
        pass
    assert budget.held == 0
    writer.close()


async def test_a_large_event_over_the_teams_size_is_refused_before_it_is_read(
    start_fake, start_relay, http
):
    fake = FakeUpstream(script=echo)
    upstream = await start_fake(fake.app())
    alpha = alpha_team(policy={"max_frame_bytes": 300_000})
    relay = await start_relay(relay_config(str(upstream.make_url("")), teams={"alpha": alpha}))
    async with http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        # Crafted to be slow to read: an escaped second `type` makes the relay parse it all,
        # 40,000 tiny objects, and it is not even valid JSON. Refused for its size, unread.
        crafted = (
            b'{"event_id":"evt_big","type":"conversation.item.create","\\u0074ype":['
            + b'{"a":1},' * 40_000
        )
        ws._writer.transport.write(masked_text_frame(crafted))
        [error] = await read_until(ws, "error")
        assert error["error"]["message"].startswith(f"The event is {len(crafted)} bytes")
        assert error["error"]["event_id"] == "evt_big"
        await ws.send_str('{"type":"input_audio_buffer.clear"}')  # the session goes on
        await read_until(ws, "input_audio_buffer.clear")
    assert all(len(m) < 1000 for m in fake.received)


async def server_frame(reader: asyncio.StreamReader) -> bytes:
    """The payload of the next frame from the relay (unmasked, under 64 KiB)."""
    head = await reader.readexactly(2)
    length = head[1] & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    return await reader.readexactly(length)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"not json at all", "invalid_json"),
        (b"[1,2,3]", "invalid_event"),
        (b'"just a string"', "invalid_event"),
        (b'{"event_id":"no-type"}', "missing_event_type"),
    ],
)
async def test_bad_events_get_errors_and_the_session_goes_on(
    start_fake, start_relay, http, frame, code
):
    fake = FakeUpstream(script=echo)
    upstream = await start_fake(fake.app())
    relay = await start_relay(relay_config(str(upstream.make_url(""))))
    async with http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        await ws.send_frame(frame, WSMsgType.TEXT)
        [error] = await read_until(ws, "error")
        assert error["error"]["code"] == code
        assert error["error"]["type"] == "invalid_request_error"
        await ws.send_str('{"type":"input_audio_buffer.clear"}')
        await read_until(ws, "input_audio_buffer.clear")  # echoed: still relaying
    assert fake.received == [b'{"type":"input_audio_buffer.clear"}']


async def test_slow_client_is_bounded_and_closed_while_others_keep_their_latency(
    start_fake, start_relay
):
    firehose = Firehose()
    fast_upstream = await start_fake(FakeUpstream(script=firehose).app())
    echo_upstream = await start_fake(FakeUpstream(script=echo).app())
    config = relay_config(
        str(fast_upstream.make_url("")),
        server={
            "stall_timeout_seconds": 1.0,
            "close_timeout_seconds": 0.5,
            "client_send_buffer_bytes": 65536,
        },
        deployments={
            "other": {
                "endpoint": str(echo_upstream.make_url("")),
                "credential": {"env": "TEST_AZURE_KEY"},
            }
        },
        teams={
            "alpha": {
                "keys": [hash_key(ALPHA_KEY)],
                "deployments": ["gpt-realtime", "other"],
            }
        },
    )
    relay = await start_relay(config)
    state = relay.app[STATE]
    path = "/openai/v1/realtime?model=gpt-realtime"
    _, slow = await raw_client(relay.port, path, ALPHA_KEY)
    slow.write(masked_text_frame(b'{"type":"response.create"}'))  # go; then never read
    await firehose.started.wait()
    async with aiohttp.ClientSession() as http:
        [bridge] = state.bridges

        # Meanwhile a healthy session on the same relay measures its round trips.
        other_url = str(relay.make_url("/openai/v1/realtime?model=other"))
        async with http.ws_connect(other_url, headers={"api-key": ALPHA_KEY}) as ws:
            await read_until(ws, "session.created")
            round_trips, held, sent_while_live = [], [], 0
            while bridge in state.bridges:
                if bridge.ending is None:
                    sent_while_live = firehose.sent_bytes
                sent = time.perf_counter()
                await ws.send_str('{"type":"input_audio_buffer.clear"}')
                await ws.receive()
                round_trips.append(time.perf_counter() - sent)
                if bridge.client_transport is not None:
                    held.append(bridge.client_transport.get_write_buffer_size())
                await asyncio.sleep(0.005)  # pace the probe: 200 round trips a second
    slow.close()
    await state.idle.wait()

    round_trips.sort()
    p99 = round_trips[int(len(round_trips) * 0.99) - 1]
    assert len(round_trips) > 50
    assert p99 < 0.05, f"healthy session p99 round trip {p99 * 1000:.1f} ms during the stall"
    # What the relay holds for the slow client stays bounded: aiohttp's write buffer stops
    # at its high-water mark, and TCP backpressure stopped the upstream.
    assert max(held) < 512 * 1024, max(held)
    # (The close handshake then reads and drops what the upstream still sends.)
    assert sent_while_live < 16 * 1024 * 1024, sent_while_live
    assert outcomes(relay)["client_stalled"] == 1


def rate_limited_relay(upstream, **policy):
    endpoint = str(upstream.make_url(""))
    return relay_config(
        endpoint,
        deployments={
            "gpt-realtime": {
                "endpoint": endpoint,
                "credential": {"env": "TEST_AZURE_KEY"},
                "policy": policy,
            }
        },
    )


async def test_events_over_the_rate_are_throttled_not_dropped(start_fake, start_relay, http):
    fake = FakeUpstream(script=echo)
    upstream = await start_fake(fake.app())
    relay = await start_relay(rate_limited_relay(upstream, max_events_per_second=50, event_burst=3))
    with structlog.testing.capture_logs() as logs:
        async with http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as ws:
            await read_until(ws, "session.created")
            for i in range(12):
                await ws.send_str(f'{{"type":"input_audio_buffer.clear","event_id":"c{i}"}}')
            echoed = [orjson.loads((await ws.receive()).data)["event_id"] for _ in range(12)]
    assert echoed == [f"c{i}" for i in range(12)]  # every one, in order, none refused
    assert [e["event"] for e in logs].count("client_throttled") == 1


async def test_events_over_the_rate_are_refused_then_the_flood_is_closed(
    start_fake, start_relay, http
):
    fake = FakeUpstream(script=echo)
    upstream = await start_fake(fake.app())
    relay = await start_relay(
        rate_limited_relay(
            upstream,
            max_events_per_second=1,
            event_burst=3,
            max_violations=4,
            on_rate_exceeded="refuse",
        )
    )
    async with http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        for i in range(10):
            await ws.send_str(f'{{"type":"input_audio_buffer.clear","event_id":"c{i}"}}')
        codes, ids = [], []
        while (msg := await ws.receive()).type is WSMsgType.TEXT:
            event = orjson.loads(msg.data)
            if event["type"] == "error":
                codes.append(event["error"]["code"])
                ids.append(event["error"]["event_id"])
        assert codes == ["rate_limit_exceeded"] * 5 + ["too_many_violations"]
        # Each refusal names the event it dropped (SDKs match their requests by it).
        assert ids[:5] == ["c3", "c4", "c5", "c6", "c7"]
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1008)
    # The burst passed; the rest was refused until persistent abuse closed the session.
    await fake.closed.wait()
    assert [orjson.loads(e)["event_id"] for e in fake.received] == ["c0", "c1", "c2"]


async def test_a_ping_flood_is_answered_at_the_cap(start_fake, start_relay, http):
    upstream = await start_fake(FakeUpstream(script=echo).app())
    relay = await start_relay(
        relay_config(str(upstream.make_url("")), server={"max_pings_per_second": 40})
    )
    with structlog.testing.capture_logs() as logs:
        async with http.ws_connect(
            url(relay), headers={"api-key": ALPHA_KEY}, autoping=False
        ) as ws:
            await read_until(ws, "session.created")
            for i in range(120):
                await ws.ping(str(i).encode())
            pongs = [(await ws.receive()) for _ in range(120)]
            assert [p.type for p in pongs] == [WSMsgType.PONG] * 120
            assert [p.data for p in pongs] == [str(i).encode() for i in range(120)]
    assert {"event": "client_throttled", "what": "pings"}.items() <= next(
        e for e in logs if e["event"] == "client_throttled"
    ).items()


async def test_a_client_closed_for_its_own_fault_has_what_it_sends_next_dropped(
    start_fake, start_relay, http, monkeypatch
):
    """Closed for too many violations, a client flooding tiny frames kept every session's
    event loop busy for the whole close timeout (aiohttp's close reads to the client's
    close frame without yielding while messages are queued: a victim's round trip went
    from 0.5 to 36-51 ms; now 0.6). What it sends after the close is dropped unread."""
    from relay.edge.connection import ClientSocket

    discarded: list[float] = []
    real = ClientSocket.discard_incoming

    def noted(self: ClientSocket, seconds: float) -> None:
        discarded.append(seconds)
        real(self, seconds)

    monkeypatch.setattr(ClientSocket, "discard_incoming", noted)
    upstream = await start_fake(FakeUpstream().app())
    endpoint = str(upstream.make_url(""))
    deployment = {
        "endpoint": endpoint,
        "credential": {"env": "TEST_AZURE_KEY"},
        "policy": {"max_violations": 1},
    }
    relay = await start_relay(
        relay_config(
            endpoint,
            server={"close_timeout_seconds": 1.0},
            deployments={"gpt-realtime": deployment},
        )
    )
    async with http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        for _ in range(3):
            await ws.send_bytes(b"not text")
        with contextlib.suppress(ConnectionError):
            for _ in range(2000):  # the flood after the close
                await ws.pong()
        events = await read_until(ws, "error")
        while events[-1]["error"]["code"] != "too_many_violations":
            events = await read_until(ws, "error")
        closed = await ws.receive()
        assert (closed.type, closed.data) == (aiohttp.WSMsgType.CLOSE, 1008)
    await relay.app[STATE].idle.wait()
    assert discarded == [1.0]


async def test_a_message_in_too_many_fragments_is_refused_with_1008(start_fake, start_relay):
    """One client sending a message in 1-byte fragments held every session's event loop
    80-290 ms at a time, until 32 MiB of payload (about 32 million frames) closed it."""
    from relay.session.frames import MAX_FRAGMENTS, MessageTooFragmented
    from tests.unit.test_splitter import frame

    relay = await start_relay(
        relay_config(str((await start_fake(FakeUpstream().app())).make_url("")))
    )
    reader, writer = await raw_client(
        relay.port, "/openai/v1/realtime?model=gpt-realtime", ALPHA_KEY
    )
    more = frame(0, b"b", fin=False, masked=True)
    writer.write(frame(1, b"a", fin=False, masked=True) + more * (MAX_FRAGMENTS + 10))
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    while True:  # the server's frames (unmasked, short): until its close
        head = await reader.readexactly(2)
        size = head[1] & 0x7F
        if size == 126:
            size = int.from_bytes(await reader.readexactly(2), "big")
        elif size == 127:
            size = int.from_bytes(await reader.readexactly(8), "big")
        payload = await reader.readexactly(size)
        if head[0] & 0x0F == 8:
            break
    assert int.from_bytes(payload[:2], "big") == 1008
    assert payload[2:].decode() == MessageTooFragmented.REASON
    writer.close()
    await relay.app[STATE].idle.wait()
    assert outcomes(relay) == {"client_message_too_fragmented": 1}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        # RFC 6455 5.1: a client's frames must be masked. aiohttp's reader took this one,
        # and the upstream got it.
        (
            b"\x81\x0f" + b'{"type":"x.y"}' + b" ",
            "protocol error: a client's frames must be masked",
        ),
        # A reserved bit without an extension: closed 1002 with no reason before.
        (b"\xc1\x80\x00\x00\x00\x00", "protocol error: Received frame with non-zero reserved bits"),
    ],
    ids=["unmasked", "reserved-bit"],
)
async def test_a_broken_frame_closes_1002_saying_what_broke(
    start_fake, start_relay, http, raw, reason
):
    fake = FakeUpstream(script=echo)
    upstream = await start_fake(fake.app())
    relay = await start_relay(relay_config(str(upstream.make_url(""))))
    async with http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        ws._writer.transport.write(raw)
        msg = await ws.receive()
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1002, reason)
    await fake.closed.wait()
    assert fake.received == []  # nothing of it went upstream


class CancellableAnswer:
    """A response streamed as fast as TCP takes it, until it is cancelled: then its
    `response.done`, with the usage the service bills for what it generated."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()

    async def __call__(self, ws: Any, fake: FakeUpstream) -> None:
        await ws.send_str(CREATED)
        await ws.receive()  # the client's response.create
        self.asked.set()
        await ws.send_str('{"type":"response.created","response":{"id":"r1"}}')
        cancelled = asyncio.Event()

        async def read() -> None:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT and '"response.cancel"' in msg.data:
                    cancelled.set()

        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(read())
            while not cancelled.is_set() and not ws.closed:
                try:
                    await ws.send_str(DELTA)
                except ConnectionError:
                    break
            usage = {"total_tokens": 900, "input_tokens": 100, "output_tokens": 800,
                     "input_token_details": {"text_tokens": 100, "audio_tokens": 0},
                     "output_token_details": {"text_tokens": 0, "audio_tokens": 800}}  # fmt: skip
            done = {"id": "r1", "status": "cancelled", "usage": usage}
            await ws.send_str(orjson.dumps({"type": "response.done", "response": done}).decode())


@pytest.mark.parametrize("end", ["stalled", "drain"])
async def test_a_response_the_relay_cuts_is_billed(start_fake, start_relay, end):
    """Cut by the relay (a client too slow to read, a drain past its grace), a response
    was never cancelled nor read to its `response.done`: the service billed it, and the
    team's spend and budget never saw it."""
    answer = CancellableAnswer()
    upstream = await start_fake(FakeUpstream(script=answer).app())
    prices = {"input_text": 4.0, "output_audio": 64.0}
    deployment = {"endpoint": str(upstream.make_url("")), "credential": {"env": "TEST_AZURE_KEY"}}
    config = relay_config(
        str(upstream.make_url("")),
        server={"stall_timeout_seconds": 0.5, "close_timeout_seconds": 1.0,
                "client_send_buffer_bytes": 65536, "drain_grace_seconds": 0.2},
        deployments={"gpt-realtime": {**deployment, "prices": prices}},
    )  # fmt: skip
    relay = await start_relay(config)
    state = relay.app[STATE]
    _, slow = await raw_client(relay.port, "/openai/v1/realtime?model=gpt-realtime", ALPHA_KEY)
    with structlog.testing.capture_logs(processors=[merge_contextvars]) as logs:
        slow.write(masked_text_frame(b'{"type":"response.create"}'))  # then never read
        if end == "drain":
            await answer.asked.wait()
            await relay.app.shutdown()
        await state.idle.wait()
    slow.close()
    (ended,) = [e for e in logs if e["event"] == "session_ended"]
    assert ended["outcome"] == ("client_stalled" if end == "stalled" else "relay_shutting_down")
    assert ended["responses"] == 1 and ended["tokens"]["output_audio"] == 800
    assert ended["cost_usd"] == pytest.approx((100 * 4 + 800 * 64) / 1e6)
    assert not [e for e in logs if e["event"] == "response_unsettled"]


async def test_a_close_without_a_status_is_passed_on_as_a_normal_close(
    start_fake, start_relay, http
):
    fake, relay = await echo_relay(start_fake, start_relay)
    with structlog.testing.capture_logs() as logs:
        async with http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as ws:
            await read_until(ws, "session.created")
            ws._writer.transport.write(b"\x88\x80\x00\x00\x00\x00")  # close, no status
            msg = await ws.receive()
            assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1000)
        await fake.closed.wait()
        await relay.app[STATE].idle.wait()
    assert fake.close_code == 1000  # not 1001 "client went away"
    (ended,) = [e for e in logs if e["event"] == "session_ended"]
    assert (ended["outcome"], ended["close_code"]) == ("client_closed", 1005)


@pytest.mark.parametrize("code", [1005, 1006, 1015, 2999, 5000])
async def test_a_close_with_a_code_no_endpoint_may_send_is_a_protocol_error(
    start_fake, start_relay, http, code
):
    """RFC 6455 7.4: aiohttp took 1006, 1015 and 5000 up as a normal close; the relay answers 1002 and
    logs the session as lost, and the upstream gets "client went away"."""
    fake, relay = await echo_relay(start_fake, start_relay)
    with structlog.testing.capture_logs() as logs:
        async with http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as ws:
            await read_until(ws, "session.created")
            status = code.to_bytes(2, "big")
            ws._writer.transport.write(b"\x88\x82\x00\x00\x00\x00" + status)  # masked by 0
            msg = await ws.receive()
            assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1002)
            assert msg.extra == f"protocol error: Invalid close code: {code}"
        await fake.closed.wait()
        await relay.app[STATE].idle.wait()
    assert fake.close_code == 1001
    (ended,) = [e for e in logs if e["event"] == "session_ended"]
    assert (ended["outcome"], ended["close_code"]) == ("client_lost", 1002)
