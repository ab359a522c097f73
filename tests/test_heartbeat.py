"""The heartbeat that costs nothing per read (relay/heartbeat.py), on both of a session's
sockets, over real sockets on 127.0.0.1. A quiet peer is pinged and kept while it answers;
a busy one is never pinged; one that stops answering is closed (that last case is in the
fault suites: `test_half_open_client_is_found_by_heartbeat`,
`test_stalled_upstream_is_found_by_heartbeat`).

These also pin the aiohttp internals the heartbeat overrides: an aiohttp upgrade that
renames them fails here, not in production.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from relay.edge.connection import ClientSocket
from relay.heartbeat import LazyHeartbeat
from tests.helpers import ALPHA_KEY, FakeUpstream, echo, read_until, relay_config
from tests.test_upstream_handshake import dial, servers  # noqa: F401 (a fixture)

# Long enough that a loop stall on a busy CI machine cannot make a pong late (the deadline
# is half a heartbeat), or leave a busy peer a heartbeat without a frame.
HEARTBEAT = 0.4


@pytest.mark.parametrize("socket_class", [web.WebSocketResponse, aiohttp.ClientWebSocketResponse])
def test_the_aiohttp_internals_it_overrides_are_there(socket_class: type) -> None:
    for name in ("_on_data_received", "_send_heartbeat", "_pong_not_received", "_reset_heartbeat"):
        assert callable(getattr(socket_class, name, None)), name
    # The timers' handles it clears (the behaviour tests below fail if these stop working).
    names = socket_class._reset_heartbeat.__code__.co_names
    assert "_heartbeat_cb" in names and "_cancel_pong_response_cb" in names
    assert "_pong_response_cb" in socket_class._cancel_pong_response_cb.__code__.co_names
    assert issubclass(ClientSocket, LazyHeartbeat)


async def test_a_quiet_upstream_that_answers_is_pinged_and_kept(servers):  # noqa: F811
    pings = 0
    three_pings = asyncio.Event()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        nonlocal pings
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        await ws.send_str('{"type":"session.created"}')
        async for msg in ws:
            if msg.type is WSMsgType.PING:
                pings += 1
                await ws.pong(msg.data)
                if pings == 3:
                    three_pings.set()
            elif msg.type is WSMsgType.TEXT:
                await ws.send_str(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/openai/v1/realtime", handler)
    upstream = await dial(await servers(app), heartbeat=HEARTBEAT)
    created = await upstream.receive()
    assert created.type is WSMsgType.TEXT
    # The socket's protocol calls the lazy flag per read, not aiohttp's re-arming callback.
    assert upstream._reader._protocol._data_received_cb == upstream._on_data_received
    assert isinstance(upstream, LazyHeartbeat)
    assert upstream._heartbeat_reset_handle is None  # nothing scheduled by the read
    receiving = asyncio.ensure_future(upstream.receive())  # pongs are read while it waits
    await three_pings.wait()
    assert not upstream.closed and not receiving.done()
    await upstream.send_frame(b'{"type":"x"}', WSMsgType.TEXT)
    assert (await receiving).data == b'{"type":"x"}'
    await upstream.close()


async def test_a_busy_upstream_is_never_pinged(servers):  # noqa: F811
    frames = 25
    pings = 0

    async def handler(request: web.Request) -> web.WebSocketResponse:
        nonlocal pings
        ws = web.WebSocketResponse(autoping=False)  # it would never answer a ping
        await ws.prepare(request)

        async def talk() -> None:
            for i in range(frames):
                await ws.send_str(f'{{"type":"delta","n":{i}}}')
                # The cadence under test: a frame every tenth of a heartbeat, 2.5 heartbeats.
                await asyncio.sleep(HEARTBEAT / 10)
            await ws.close()

        talking = asyncio.ensure_future(talk())
        async for msg in ws:
            if msg.type is WSMsgType.PING:
                pings += 1
        await talking
        return ws

    app = web.Application()
    app.router.add_get("/openai/v1/realtime", handler)
    upstream = await dial(await servers(app), heartbeat=HEARTBEAT)
    received = [await upstream.receive() for _ in range(frames)]
    assert all(msg.type is WSMsgType.TEXT for msg in received)
    assert (await upstream.receive()).type is WSMsgType.CLOSE
    assert upstream.close_code == 1000  # the server's close, not a heartbeat's
    assert pings == 0


def relay_url(relay: Any) -> str:
    return str(relay.make_url("/openai/v1/realtime?model=gpt-realtime"))


async def test_a_quiet_client_that_answers_is_pinged_and_kept(start_fake, start_relay):
    fake = FakeUpstream(script=echo)
    upstream = await start_fake(fake.app())
    relay = await start_relay(
        relay_config(str(upstream.make_url("")), server={"heartbeat_seconds": HEARTBEAT})
    )
    async with aiohttp.ClientSession() as own:
        ws = await own.ws_connect(relay_url(relay), headers={"api-key": ALPHA_KEY}, autoping=False)
        await read_until(ws, "session.created")
        pings = 0
        while pings < 3:
            msg = await ws.receive()
            assert msg.type is WSMsgType.PING, msg
            pings += 1
            await ws.pong(msg.data)
        await ws.send_str('{"type":"input_audio_buffer.clear"}')
        echoed = await ws.receive()
        assert echoed.type is WSMsgType.TEXT and "input_audio_buffer.clear" in echoed.data
        await ws.close()
    assert fake.received == [b'{"type":"input_audio_buffer.clear"}']
