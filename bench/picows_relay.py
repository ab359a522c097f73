"""The floor for a Python relay: picows on both sides, frames forwarded inside its callbacks.

The bench's `picows` path. For every client it dials the upstream (the client's path and
query, the upstream's api-key, which the relay holds like the real relay holds Azure's),
then hands every frame to the other side as it arrives: text, binary and continuation
frames as they are (fragments stay fragments), close frames both ways. There is no task
switch per frame and nothing is parsed. Backpressure: when a side's write buffer passes
its high-water mark, the other side stops being read until it drains.

It is deliberately bare: no auth of its own, no policy, no metering, no logging per
session. It is what the relay's frame path could cost in Python, not a relay to deploy.

Run: ``python -m bench.picows_relay --upstream ws://127.0.0.1:N [--key-env VAR] [--port 0]``;
prints ``PORT <n>`` when listening and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    ws_connect,
    ws_create_server,
)

# Above the 8 MiB memory scenario with room (picows' default is 10 MiB).
MAX_FRAME_BYTES = 64 * 1024 * 1024
WRITE_HIGH_WATER = 256 * 1024
_DATA = (WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION)


class Side(WSListener):
    """One end of a forwarded session; ``peer`` is the other end's listener."""

    def __init__(self) -> None:
        self.transport: WSTransport | None = None
        self.peer: Side | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        transport.underlying_transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        peer = self.peer.transport if self.peer is not None else None
        if peer is None:
            return
        kind = frame.msg_type
        if kind in _DATA:
            peer.send(kind, frame.get_payload_as_memoryview(), frame.fin)
        elif kind is WSMsgType.CLOSE:
            peer.send_close(frame.get_close_code(), frame.get_close_message())

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        peer = self.peer.transport if self.peer is not None else None
        if peer is not None and not peer.is_disconnected:
            peer.disconnect()

    # Backpressure: this side's buffer is full, so stop reading what would fill it more.
    def pause_writing(self) -> None:
        peer = self.peer.transport if self.peer is not None else None
        if peer is not None:
            peer.underlying_transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer.transport if self.peer is not None else None
        if peer is not None:
            peer.underlying_transport.resume_reading()


class ClientSide(Side):
    """The client's end: on connect, dials the upstream; reads nothing until it is up."""

    def __init__(self, relay: Relay, path: str) -> None:
        super().__init__()
        self.relay = relay
        self.path = path

    def on_ws_connected(self, transport: WSTransport) -> None:
        super().on_ws_connected(transport)
        transport.underlying_transport.pause_reading()
        self.relay.spawn(self.dial())

    async def dial(self) -> None:
        client = self.transport
        assert client is not None
        upstream = Side()
        upstream.peer = self
        try:
            await ws_connect(
                lambda: upstream,
                self.relay.upstream + self.path,
                extra_headers=self.relay.headers,
                max_frame_size=MAX_FRAME_BYTES,
            )
        except Exception as exc:  # any failure to dial ends the client's session
            print(f"picows_relay: upstream dial failed: {type(exc).__name__}", file=sys.stderr)
            client.send_close(WSCloseCode.BAD_GATEWAY, b"upstream unavailable")
            client.disconnect()
            return
        if client.is_disconnected:
            if upstream.transport is not None:
                upstream.transport.disconnect()
            return
        self.peer = upstream
        client.underlying_transport.resume_reading()


class Relay:
    def __init__(self, upstream: str, api_key: str | None) -> None:
        self.upstream = upstream.rstrip("/")
        self.headers = {"api-key": api_key} if api_key else {}
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def listener(self, request: WSUpgradeRequest) -> ClientSide:
        return ClientSide(self, request.path.decode("latin-1"))


async def serve(host: str, port: int, relay: Relay) -> None:
    loop = asyncio.get_running_loop()
    server = await ws_create_server(
        relay.listener, host, port, max_frame_size=MAX_FRAME_BYTES, backlog=4096
    )
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.picows_relay", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", required=True, help="ws://host:port of the upstream")
    parser.add_argument("--key-env", help="environment variable holding the upstream api-key")
    args = parser.parse_args(argv)
    api_key = os.environ.get(args.key_env) if args.key_env else None
    from bench.upstream import run

    run(serve(args.host, args.port, Relay(args.upstream, api_key)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
