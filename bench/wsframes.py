"""Just enough RFC 6455 for the bench's own peers: the echo upstream and the load generator.

Both ends of a measured path are ours, so they can be cheaper than any library: no
validation beyond what the bench needs, no per-frame futures, one `write` per frame. The
proxies under test (nginx, the relay) sit between them and do the real protocol work.
"""

from __future__ import annotations

import base64
import hashlib
import random
import struct
from collections.abc import Callable

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Largest message either peer accepts: above the 5 MiB large-frame scenario with room.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
HEAD_END = b"\r\n\r\n"
MAX_HEAD_BYTES = 65536


def _mask_python(mask: bytes, data: bytearray) -> None:
    n = len(data)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    data[:] = (int.from_bytes(data, "little") ^ key).to_bytes(n, "little")


def _load_mask() -> Callable[[bytes, bytearray], None]:
    try:  # aiohttp's C (Cython) masking, when built: about 50x the pure-Python speed
        from aiohttp._websocket.helpers import websocket_mask
    except ImportError:  # pragma: no cover - aiohttp always ships it today
        return _mask_python
    return websocket_mask


mask_in_place = _load_mask()


class ProtocolError(Exception):
    """The peer sent something this minimal implementation does not take."""


def accept_key(key: bytes) -> bytes:
    """The `Sec-WebSocket-Accept` value for a `Sec-WebSocket-Key`."""
    return base64.b64encode(hashlib.sha1(key.strip() + _GUID).digest())


def new_client_key() -> bytes:
    return base64.b64encode(random.randbytes(16))


def upgrade_request(host: str, port: int, path: str, headers: dict[str, str]) -> bytes:
    """A client's WebSocket upgrade request, with a fresh key and ``headers`` added."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {new_client_key().decode()}\r\n{extra}\r\n"
    ).encode()


def frame_header(opcode: int, length: int, *, masked: bool) -> bytes:
    first = 0x80 | opcode
    bit = 0x80 if masked else 0
    if length < 126:
        return struct.pack("!BB", first, bit | length)
    if length < 65536:
        return struct.pack("!BBH", first, bit | 126, length)
    return struct.pack("!BBQ", first, bit | 127, length)


def server_frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked frame, header and payload in one buffer (one write, perf note 5)."""
    return frame_header(opcode, len(payload), masked=False) + payload


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked frame with a fresh mask key, header and payload in one buffer."""
    key = random.randbytes(4)
    data = bytearray(payload)
    mask_in_place(key, data)
    return frame_header(opcode, len(data), masked=True) + key + data


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason[:123]


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """The first line and the headers (names lower-cased) of an HTTP/1.1 head."""
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


class FrameReader:
    """Turns a byte stream into whole messages: (opcode, payload), fragments joined.

    ``masked`` says whether frames from the peer carry a mask (a server reads masked client
    frames). Control frames may arrive between fragments and are returned as they come.
    """

    __slots__ = ("_buf", "_fragments", "_fragment_op", "_masked")

    def __init__(self, *, masked: bool) -> None:
        self._buf = bytearray()
        self._masked = masked
        self._fragments: list[bytes] = []
        self._fragment_op = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        messages: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            length = second & 0x7F
            at = pos + 2
            if length == 126:
                if end - at < 2:
                    break
                length = int.from_bytes(buf[at : at + 2], "big")
                at += 2
            elif length == 127:
                if end - at < 8:
                    break
                length = int.from_bytes(buf[at : at + 8], "big")
                at += 8
            if length > MAX_MESSAGE_BYTES:
                raise ProtocolError(f"frame of {length} bytes")
            key = b""
            if second & 0x80:
                if end - at < 4:
                    break
                key = bytes(buf[at : at + 4])
                at += 4
            elif self._masked:
                raise ProtocolError("unmasked client frame")
            if end - at < length:
                break
            payload = bytes(buf[at : at + length])
            if key:
                unmasked = bytearray(payload)
                mask_in_place(key, unmasked)
                payload = bytes(unmasked)
            pos = at + length
            self._collect(first, payload, messages)
        if pos:
            del buf[:pos]
        return messages

    def _collect(self, first: int, payload: bytes, messages: list[tuple[int, bytes]]) -> None:
        opcode, fin = first & 0x0F, first & 0x80
        if opcode >= OP_CLOSE:
            messages.append((opcode, payload))
        elif opcode == OP_CONTINUATION:
            self._fragments.append(payload)
            if fin:
                messages.append((self._fragment_op, b"".join(self._fragments)))
                self._fragments = []
        elif fin:
            messages.append((opcode, payload))
        else:
            self._fragment_op = opcode
            self._fragments = [payload]
