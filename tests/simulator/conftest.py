"""Fixtures for the simulator tests: a loopback simulator and a validating client socket."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import WSMsgType
from aiohttp.client import ClientWebSocketResponse
from aiohttp.test_utils import TestClient

from relay.simulator import SimulatorOptions, create_simulator_app
from relay.simulator.audio import silence, tone
from tests.simulator import sdk_types

KEY = "sim-test-key"
TOKEN = "sim-test-entra-token"
GA_PATH = "/openai/v1/realtime?model=gpt-realtime"
BETA_PATH = "/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-4o-realtime-preview"
PATHS = {"ga": GA_PATH, "beta": BETA_PATH}
# Generous: a missing event fails the test instead of hanging it.
RECEIVE_TIMEOUT_S = 10


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def speech(ms: float) -> bytes:
    """A tone loud enough for the default VAD threshold: our stand-in for speech."""
    return tone(440.0, ms, amplitude=0.3)


def speech_then_silence(speech_ms: float = 1000, silence_ms: float = 800) -> bytes:
    return speech(speech_ms) + silence(silence_ms)


class RealtimeSocket:
    """A client socket that validates every server event against the SDK's types."""

    def __init__(self, ws: ClientWebSocketResponse, dialect: str) -> None:
        self.ws = ws
        self.dialect = dialect
        self.received: list[dict[str, Any]] = []
        self._event_ids: set[str] = set()

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send_str(orjson.dumps(event).decode())

    async def append(self, audio: bytes, chunk_ms: int | None = None) -> None:
        """Append audio in one event, or in ``chunk_ms`` pieces."""
        size = len(audio) if chunk_ms is None else chunk_ms * 48
        for start in range(0, len(audio), size):
            await self.send(
                {"type": "input_audio_buffer.append", "audio": b64(audio[start : start + size])}
            )

    async def recv(self) -> dict[str, Any]:
        message = await self.ws.receive(timeout=RECEIVE_TIMEOUT_S)
        assert message.type is WSMsgType.TEXT, message
        event = sdk_types.check(self.dialect, message.data)
        assert event["event_id"] not in self._event_ids, "duplicate event_id"
        self._event_ids.add(event["event_id"])
        self.received.append(event)
        return event

    async def recv_until(self, kind: str) -> list[dict[str, Any]]:
        """Events up to and including the first of type ``kind``."""
        events = [await self.recv()]
        while events[-1]["type"] != kind:
            events.append(await self.recv())
        return events

    async def expect(self, *kinds: str) -> list[dict[str, Any]]:
        """The next events, which must have exactly these types."""
        events = [await self.recv() for _ in kinds]
        assert [e["type"] for e in events] == list(kinds)
        return events

    async def close(self) -> None:
        await self.ws.close()


def types(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in events]


def sim_options(**overrides: Any) -> SimulatorOptions:
    values: dict[str, Any] = {
        "api_keys": frozenset({KEY}),
        "bearer_tokens": frozenset({TOKEN}),
        "speed": 0,
    }
    return SimulatorOptions(**{**values, **overrides})


ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]
SocketFactory = Callable[..., Awaitable[RealtimeSocket]]


@pytest.fixture
def make_client(aiohttp_client: Any) -> ClientFactory:
    """A test client of a simulator app, with ``SimulatorOptions`` overrides."""

    async def make(**overrides: Any) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = await aiohttp_client(
            create_simulator_app(sim_options(**overrides))
        )
        return client

    return make


@pytest.fixture
async def client(make_client: ClientFactory) -> TestClient[Any, Any]:
    return await make_client()


@pytest.fixture
def connect(client: TestClient[Any, Any]) -> SocketFactory:
    """Open a socket (GA by default) and consume its ``session.created``."""
    return lambda dialect="ga", **kwargs: open_socket(client, dialect, **kwargs)


async def open_socket(
    client: TestClient[Any, Any],
    dialect: str = "ga",
    *,
    path: str | None = None,
    headers: dict[str, str] | None = None,
) -> RealtimeSocket:
    ws = await client.ws_connect(path or PATHS[dialect], headers=headers or {"api-key": KEY})
    socket = RealtimeSocket(ws, dialect)
    created = await socket.recv()
    assert created["type"] == "session.created"
    if dialect == "beta":  # the preview dialect announces the default conversation too
        announced = await socket.recv()
        assert announced["type"] == "conversation.created"
        assert announced["conversation"]["object"] == "realtime.conversation"
    return socket
