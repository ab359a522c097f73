"""Misbehaving peers, scripted at the WebSocket boundary."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct

from aiohttp import web
from aiohttp._websocket.helpers import websocket_mask

from tests.helpers import FakeUpstream

CREATED = '{"type":"session.created","event_id":"e0","session":{"type":"realtime"}}'
# 100 ms of 24 kHz PCM16 per delta, as the real service might send.
DELTA = (
    '{"type":"response.output_audio.delta","event_id":"e","response_id":"r","item_id":"i",'
    '"output_index":0,"content_index":0,"delta":"'
    + base64.b64encode(b"\x01" * 4800).decode()
    + '"}'
)


async def stall_after_created(ws: web.WebSocketResponse, fake: FakeUpstream) -> None:
    """Greets, then never reads again: pings go unanswered, nothing is closed."""
    await ws.send_str(CREATED)
    await asyncio.Event().wait()  # until the test server shuts down and cancels us


def send_after_created(payload: str | bytes | tuple[str, bytes]):
    """The script of an upstream that answers the client's first event with ``payload``: a
    text frame, a binary one (bytes), or ("text", bytes) for a text frame of any bytes."""

    async def script(ws: web.WebSocketResponse, fake: FakeUpstream) -> None:
        await ws.send_str(CREATED)
        await ws.receive()  # the client's first event
        if isinstance(payload, tuple):
            await ws.send_frame(payload[1], web.WSMsgType.TEXT)
        elif isinstance(payload, bytes):
            await ws.send_bytes(payload)
        else:
            await ws.send_str(payload)
        await ws.receive()  # until the relay closes

    return script


class Firehose:
    """Streams audio deltas as fast as TCP takes them, counting what it got out."""

    def __init__(self) -> None:
        self.sent_bytes = 0
        self.started = asyncio.Event()

    async def __call__(self, ws: web.WebSocketResponse, fake: FakeUpstream) -> None:
        await ws.send_str(CREATED)
        await ws.receive()  # the client's go
        self.started.set()
        transport = ws._writer.transport if ws._writer else None  # writes stop raising once
        while not ws.closed and transport is not None and not transport.is_closing():
            try:
                await ws.send_str(DELTA)
            except ConnectionError:
                break
            self.sent_bytes += len(DELTA)


async def raw_client(
    port: int, path: str, key: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket client on a bare socket: it reads only the handshake, then what the test
    asks for; a client that truly stops reading (aiohttp's reads in the background)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    nonce = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n"
        f"api-key: {key}\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def masked_text_frame(payload: bytes) -> bytes:
    """A client-to-server text frame (clients must mask)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        length = bytes([0x80 | n])
    elif n < 65536:
        length = bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        length = bytes([0x80 | 127]) + struct.pack("!Q", n)
    body = bytearray(payload)
    websocket_mask(mask, body)
    return bytes([0x81]) + length + mask + bytes(body)


async def silent_mid_response(ws: web.WebSocketResponse, fake: FakeUpstream) -> None:
    """Starts a response, then sends nothing more; answers pings, so the heartbeat is happy."""
    await ws.send_str(CREATED)
    await ws.receive()  # the client's response.create
    await ws.send_str('{"type":"response.created","event_id":"e1","response":{"id":"r1"}}')
    async for _ in ws:  # reads (and pongs) until the relay closes
        pass
