"""Churn: thousands of sessions opened and closed, some abruptly; nothing is left behind."""

from __future__ import annotations

import asyncio
import gc
import os
import tracemalloc
from collections import Counter

import aiohttp
import pytest

from relay.edge.connection import ClientSocket, RelayConnection
from relay.ops.metrics import SessionMeter
from relay.session.pump import Bridge
from relay.state import STATE
from relay.upstream.handshake import _UpstreamSocket
from tests.cycles import collector_off
from tests.faults.test_upstream_faults import outcomes, url
from tests.helpers import ALPHA_KEY, read_until, relay_config

SESSIONS = 2000
CONCURRENCY = 50
# A session's objects on the relay's side (the test's client has its own sockets, and
# asyncio's selector transports, unlike uvloop's, are cycles of their own).
RELAY_SIDE = (Bridge, ClientSocket, RelayConnection, _UpstreamSocket, SessionMeter)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def one_session(http: aiohttp.ClientSession, relay, i: int) -> None:
    ws = await http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY})
    await read_until(ws, "session.created")
    if i % 3 == 0:
        ws._response.connection.transport.abort()  # vanish without a close frame
        await ws.close()
    elif i % 3 == 1:
        await ws.send_str('{"type":"input_audio_buffer.clear"}')
        await read_until(ws, "input_audio_buffer.cleared")
        await ws.close()
    else:
        await ws.close(code=4000, message=b"bye")


@pytest.mark.timeout(240)  # 2,200 sessions: about 40 s on a quiet 2-core machine
async def test_churn_leaves_no_tasks_sockets_or_memory_behind(simulator, start_relay):
    relay = await start_relay(relay_config(simulator.url))
    state = relay.app[STATE]

    async def run(count: int) -> None:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            queue = iter(range(count))

            async def worker() -> None:
                for i in queue:
                    await one_session(http, relay, i)

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        await state.idle.wait()

    await run(200)  # warm-up: caches, pools and arenas reach their steady size
    gc.collect()
    tasks, fds = len(asyncio.all_tasks()), open_fds()
    # With the collector off, what it would have freed: nothing of the relay's side of a
    # session may be in a cycle (under churn, passes of tens of thousands of objects).
    with collector_off() as unreachable:
        await run(SESSIONS // 2)
        cycles = Counter(type(o).__name__ for o in unreachable() if isinstance(o, RELAY_SIDE))
    assert not cycles, f"left to the cycle collector: {dict(cycles)}"
    gc.collect()
    # A leak grows with sessions: what the second half allocates and keeps must be ~nothing.
    tracemalloc.start()
    await run(SESSIONS // 2)
    gc.collect()
    kept, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(asyncio.all_tasks()) <= tasks
    assert open_fds() <= fds + 2
    # A session is forgotten when its handler's task is done, so at `idle` none should be
    # held (test_a_session_is_not_held_once_idle); the bound keeps the one a cancelled
    # handler's traceback might still hold. None accumulate.
    assert len([o for o in gc.get_objects() if isinstance(o, Bridge)]) <= 1
    assert kept < 2 * 1024 * 1024, f"{kept / 2**20:.2f} MiB kept after {SESSIONS // 2} sessions"
    ended = outcomes(relay)
    assert sum(ended.values()) == SESSIONS + 200
    assert set(ended) <= {"client_closed", "client_lost"}


async def test_a_session_is_not_held_once_idle(simulator, start_relay):
    """A client that vanishes gets its handler cancelled by aiohttp; the CancelledError's
    traceback holds the session's frames until the handler's task is done. `idle` (what a
    drain waits for) is set only then: no Bridge is left to find."""
    relay = await start_relay(relay_config(simulator.url))
    state = relay.app[STATE]
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(one_session(http, relay, i) for i in range(0, 60, 3)))
    await state.idle.wait()
    gc.collect()
    assert [o for o in gc.get_objects() if isinstance(o, Bridge)] == []
