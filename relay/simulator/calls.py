"""The simulator's WebRTC calls after the SDP answer: the session each call runs, sideband
sockets attached to it, and call control.

A call answered by ``POST …/realtime/calls`` runs one realtime session (an ``Engine`` behind a
socket-less ``Connection``). ``GET /openai/v1/realtime?call_id=…`` (a key, like any
WebSocket) attaches a sideband socket: it receives the call's events from then on (no
``session.created`` again) and may send client events. ``POST …/calls/{call_id}/hangup``
ends the call, closing its sideband sockets (1000); ``accept``, ``reject`` and ``refer`` are
for incoming SIP calls, which a WebRTC call is not, so they are refused. An unknown call id
is 404. No media flows: the device's data channel is `Call.from_device`, for tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from relay.simulator.connection import Connection, Socket
from relay.simulator.engine import Engine
from relay.simulator.ids import IdFactory, next_seed
from relay.simulator.options import SimulatorOptions
from relay.simulator.schema import GA

CONTROL_ACTIONS = ("hangup", "accept", "reject", "refer")
MAX_CALLS = 10_000
log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Call:
    id: str
    model: str
    connection: Connection
    engine: Engine

    async def from_device(self, frame: bytes) -> None:
        """A client event the device sent over its data channel."""
        await self.connection.receive(frame)

    async def attach(self, ws: Socket) -> None:
        await self.connection.serve(ws)

    async def hang_up(self) -> None:
        await self.connection.close_all(1000, b"call ended")


@dataclass(slots=True)
class CallRegistry:
    """The calls this simulator answered and that have not ended."""

    calls: dict[str, Call] = field(default_factory=dict)

    def open(
        self, call_id: str, model: str, session: dict[str, Any], options: SimulatorOptions
    ) -> Call:
        engine = Engine(
            GA,
            model=model,
            options=options,
            ids=IdFactory(next_seed()),
            now=time.time(),
            transcription=session.get("type") == "transcription",
        )
        engine.use_session(session)
        call = Call(
            call_id, model, Connection(None, engine, speed=options.speed, media=True), engine
        )
        self.calls[call_id] = call
        while len(self.calls) > MAX_CALLS:
            self.calls.pop(next(iter(self.calls)))
        return call

    async def hang_up(self, call_id: str) -> bool:
        call = self.calls.pop(call_id, None)
        if call is None:
            return False
        await call.hang_up()
        return True

    async def hang_up_all(self) -> None:
        for call_id in list(self.calls):
            await self.hang_up(call_id)


CALLS_KEY = web.AppKey("simulator_calls", CallRegistry)


async def on_shutdown(app: web.Application) -> None:
    await app[CALLS_KEY].hang_up_all()
