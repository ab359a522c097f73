"""Shared test helpers: relay configs, audio, and a scriptable fake upstream."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from relay.edge.auth import hash_key
from relay.ops.config import RelayConfig, parse_config

ALPHA_KEY = "rk-alpha-0123456789"
BETA_KEY = "rk-beta-9876543210"
AZURE_KEY = "azure-key-s3cret-value"
# A plain request's headers for a valid WebSocket upgrade (RFC 6455 4.1): what a refusal's
# JSON body is read with (the relay refuses a malformed upgrade before any other check that
# needs the upstream).
UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}
ENVIRON = {"TEST_AZURE_KEY": AZURE_KEY}


def relay_config(endpoint: str, **sections: dict[str, Any]) -> RelayConfig:
    """A relay in front of ``endpoint``: team alpha may use gpt-realtime, beta only `other`."""
    data: dict[str, Any] = {
        "server": {"close_timeout_seconds": 2.0},
        "upstream": {"connect_timeout_seconds": 5.0},
        "simulator": {"speed": 0.0},
        "deployments": {
            "gpt-realtime": {
                "endpoint": endpoint,
                "azure_deployment": "az-gpt-realtime",
                "credential": {"env": "TEST_AZURE_KEY"},
            },
            "other": {"endpoint": endpoint, "credential": {"env": "TEST_AZURE_KEY"}},
        },
        "teams": {
            "alpha": {"keys": [hash_key(ALPHA_KEY)], "deployments": ["gpt-realtime"]},
            "beta": {"keys": [hash_key(BETA_KEY)], "deployments": ["other"]},
        },
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data, source="test")


def tone_pcm(ms: int, freq: float = 440.0, amplitude: int = 8000) -> bytes:
    """24 kHz mono PCM16 sine: loud enough to count as speech."""
    n = 24 * ms
    return struct.pack(
        f"<{n}h", *(int(amplitude * math.sin(2 * math.pi * freq * i / 24000)) for i in range(n))
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


Script = Callable[[web.WebSocketResponse, "FakeUpstream"], Awaitable[None]]


@dataclass
class FakeUpstream:
    """An upstream at the HTTP/WebSocket boundary: refuses, records, or runs a script."""

    refuse_status: int | None = None
    refuse_headers: dict[str, str] = field(default_factory=dict)
    script: Script | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_code: int | None = None
    close_reason: str | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(
            {"path": request.path, "query": dict(request.query), "headers": dict(request.headers)}
        )
        if self.refuse_status is not None:
            return web.json_response(
                {"error": {"code": str(self.refuse_status), "message": "refused"}},
                status=self.refuse_status,
                headers=self.refuse_headers,
            )
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        try:
            await (self.script or echo)(ws, self)
        finally:
            self.close_code = ws.close_code
            self.closed.set()
        return ws


async def echo(ws: web.WebSocketResponse, fake: FakeUpstream) -> None:
    await ws.send_str(
        orjson.dumps({"type": "session.created", "event_id": "e0", "session": {}}).decode()
    )
    async for msg in ws:
        if msg.type == web.WSMsgType.TEXT:
            fake.received.append(msg.data.encode())
            await ws.send_str(msg.data)


async def read_until(ws: Any, wanted: str, limit: int = 10_000) -> list[dict[str, Any]]:
    """Read events from an aiohttp client socket until one of type ``wanted``."""
    events = []
    for _ in range(limit):
        msg = await ws.receive()
        assert msg.type == web.WSMsgType.TEXT, f"expected a text frame, got {msg!r}"
        event = orjson.loads(msg.data)
        events.append(event)
        if event["type"] == wanted:
            return events
    raise AssertionError(f"no {wanted} in {limit} events")
