"""The bench upstream: a realtime service that echoes audio, as cheaply as Python allows.

It speaks just enough of the GA realtime protocol for the relay to start a session:
`session.created` on connect, `session.updated` (the merged session) for a `session.update`.
Every `input_audio_buffer.append` comes straight back as a `response.output_audio.delta`
carrying the same base64 audio, with the append's `event_id` (the load generator's send
timestamp) as its `response_id`. The echo is built by slicing bytes, never by parsing JSON:
this process is the physical limit the paths are compared against.

Run: ``python -m bench.upstream [--port 0] [--key-env VAR] [--tls-cert PEM --tls-key PEM]``;
prints ``PORT <n>`` when listening (and ``TLS_PORT <n>`` for a second, TLS listener, which
peers that only dial wss:// need: LiteLLM's Azure route) and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import ssl
import sys
from typing import Any, cast

import orjson

from bench.wsframes import (
    HEAD_END,
    MAX_HEAD_BYTES,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    ProtocolError,
    accept_key,
    frame_header,
    parse_head,
    server_frame,
)

_APPEND = b'{"type":"input_audio_buffer.append"'
_UPDATE_PREFIXES = (b'{"type":"session.update"', b'{"type": "session.update"')
# Azure's realtime routes: GA (`?model=`) and preview (`?api-version=...&deployment=`).
_REALTIME_ROUTES = ("GET /openai/v1/realtime?", "GET /openai/realtime?")
_EVENT_ID = b'"event_id":"'
_AUDIO = b'"audio":"'
_DELTA_HEAD = b'{"type":"response.output_audio.delta","event_id":"e","response_id":"'
_DELTA_MID = b'","item_id":"i","output_index":0,"content_index":0,"delta":"'
_DELTA_TAIL = b'"}'
_WRITE_HIGH_WATER = 256 * 1024


def echo_delta(append: bytes) -> bytes | None:
    """The delta frame (header included) echoing an append, or None if it is not one."""
    start = append.find(_EVENT_ID, 0, 256)
    if start == -1:
        return None
    start += len(_EVENT_ID)
    end = append.find(b'"', start)
    audio = append.find(_AUDIO, end)
    if end == -1 or audio == -1:
        return None
    audio += len(_AUDIO)
    audio_end = append.find(b'"', audio)
    if audio_end == -1:
        return None
    view = memoryview(append)
    length = (
        len(_DELTA_HEAD) + (end - start) + len(_DELTA_MID) + (audio_end - audio) + len(_DELTA_TAIL)
    )
    return b"".join(
        (
            frame_header(OP_TEXT, length, masked=False),
            _DELTA_HEAD,
            view[start:end],
            _DELTA_MID,
            view[audio:audio_end],
            _DELTA_TAIL,
        )
    )


def initial_session(session_id: str, model: str) -> dict[str, Any]:
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": model,
        "output_modalities": ["audio"],
        "instructions": "",
        "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None},
            "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy"},
        },
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
    }


def merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value


class EchoConnection(asyncio.Protocol):
    """One client (the relay, nginx or the load generator itself) of the echo upstream."""

    def __init__(self, api_key: str | None) -> None:
        self._api_key = api_key
        self._transport: asyncio.Transport | None = None
        self._head = bytearray()
        self._reader: FrameReader | None = None
        self._session: dict[str, Any] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)

    # Backpressure: a peer that does not read stops this connection being read.
    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        reader = self._reader
        if reader is None:
            data = self._handshake(data)
            reader = self._reader
            if reader is None or not data:
                return
        try:
            messages = reader.feed(data)
        except ProtocolError:
            transport.abort()
            return
        for opcode, payload in messages:
            if opcode == OP_TEXT:
                if payload.startswith(_APPEND):
                    frame = echo_delta(payload)
                    if frame is not None:
                        transport.write(frame)
                        continue
                if payload.startswith(_UPDATE_PREFIXES):
                    self._session_update(payload)
            elif opcode == OP_PING:
                transport.write(server_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                transport.write(server_frame(OP_CLOSE, payload[:2]))
                transport.close()
                return

    def _handshake(self, data: bytes) -> bytes:
        """Take the upgrade request; the bytes after it, or b"" while it is incomplete."""
        transport = self._transport
        assert transport is not None
        self._head += data
        end = self._head.find(HEAD_END)
        if end == -1:
            if len(self._head) > MAX_HEAD_BYTES:
                transport.abort()
            return b""
        line, headers = parse_head(bytes(self._head[:end]))
        rest = bytes(self._head[end + len(HEAD_END) :])
        self._head = bytearray()
        key = headers.get("sec-websocket-key")
        if not line.startswith("GET ") or key is None:
            transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            transport.close()
            return b""
        if not line.startswith(_REALTIME_ROUTES):
            transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            transport.close()
            return b""
        if self._api_key is not None and headers.get("api-key") != self._api_key:
            transport.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
            transport.close()
            return b""
        accept = accept_key(key.encode())
        self._session = initial_session("sess_" + secrets.token_hex(6), "bench")
        created = {"type": "session.created", "event_id": "c", "session": self._session}
        transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            + server_frame(OP_TEXT, orjson.dumps(created))
        )  # fmt: skip
        self._reader = FrameReader(masked=True)
        return rest

    def _session_update(self, payload: bytes) -> None:
        assert self._transport is not None
        event = orjson.loads(payload)
        update = event.get("session")
        if isinstance(update, dict):
            merge(self._session, update)
        reply = {"type": "session.updated", "event_id": "u", "session": self._session}
        self._transport.write(server_frame(OP_TEXT, orjson.dumps(reply)))


async def serve(
    host: str, port: int, api_key: str | None, tls: ssl.SSLContext | None = None
) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    listeners = [("PORT", port, None)] + ([("TLS_PORT", 0, tls)] if tls is not None else [])
    for label, wanted, context in listeners:
        server = await loop.create_server(
            lambda: EchoConnection(api_key),
            host,
            wanted,
            backlog=4096,
            reuse_address=True,
            ssl=context,
        )
        servers.append(server)
        print(f"{label} {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for server in servers:
            server.close()


def run(main: Any) -> None:
    """Run a coroutine on uvloop where it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--key-env", help="environment variable holding the api-key to require")
    parser.add_argument("--tls-cert", help="PEM certificate chain: also listen with TLS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    args = parser.parse_args(argv)
    api_key = os.environ.get(args.key_env) if args.key_env else None
    tls = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    run(serve(args.host, args.port, api_key, tls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
