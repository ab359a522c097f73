"""One simulator WebSocket: the read loop, response playback, and paced sending.

The read loop hands each frame to the ``Engine`` and performs the actions it returns, in
order. Responses play in their own task (one per ``ResponseRun``), waiting for each audio
deadline at the configured speed. Every send is awaited under one lock, so frames keep
their order and a slow client slows the simulator down (backpressure). When the client
goes away, all response tasks are cancelled and awaited: nothing outlives the socket.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import orjson
import structlog
from aiohttp import WSMsgType, web

from relay.simulator.engine import Action, CancelResponse, Engine, StartResponse
from relay.simulator.events import Event
from relay.simulator.response import ResponseRun

log = structlog.get_logger(__name__)


class Connection:
    """Drives one ``Engine`` over one prepared ``WebSocketResponse``."""

    def __init__(
        self, ws: web.WebSocketResponse[Literal[False]], engine: Engine, *, speed: float
    ) -> None:
        self._ws = ws
        self._engine = engine
        self._speed = speed
        self._send_lock = asyncio.Lock()
        # Response playback tasks by response id; each removes itself when done.
        self._playing: dict[str, asyncio.Task[None]] = {}
        self.frames_received = 0

    async def run(self) -> None:
        """Serve the socket until the client closes it or goes away."""
        try:
            await self._send(self._engine.session_created())
            async for message in self._ws:
                self.frames_received += 1
                if message.type is WSMsgType.TEXT:
                    actions = self._receive(message.data)
                elif message.type is WSMsgType.BINARY:
                    actions = self._engine.receive_binary()
                else:  # WSMsgType.ERROR, e.g. a frame over max_msg_size: aiohttp closes.
                    break
                await self._perform(actions)
        except ConnectionError:
            log.debug("simulator.client_gone")
        finally:
            await self._stop_all()

    def _receive(self, data: bytes) -> list[Action]:
        try:
            return self._engine.receive_text(data)
        except Exception:
            # A simulator bug must not look like a network failure: report it like the service.
            log.exception("simulator.internal_error")
            return [self._engine.server_error_event()]

    async def _perform(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, StartResponse):
                self._start(action.run)
            elif isinstance(action, CancelResponse):
                await self._stop(action.run)
                for event in action.run.finish("cancelled", action.reason):
                    await self._send(event)
            else:
                await self._send(action)

    async def _send(self, event: Event) -> None:
        data = orjson.dumps(event)
        async with self._send_lock:
            await self._ws.send_frame(data, WSMsgType.TEXT)

    def _start(self, run: ResponseRun) -> None:
        task = asyncio.get_running_loop().create_task(
            self._play(run), name=f"simulator-response-{run.id}"
        )
        self._playing[run.id] = task
        task.add_done_callback(lambda done: self._played(run.id, done))

    def _played(self, response_id: str, task: asyncio.Task[None]) -> None:
        self._playing.pop(response_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "simulator.response_failed", response_id=response_id, exc_info=task.exception()
            )

    async def _play(self, run: ResponseRun) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            for step in run.steps():
                if isinstance(step, dict):
                    await self._send(step)
                elif self._speed == 0:
                    # No pacing, but still a point where cancellation can land.
                    await asyncio.sleep(0)
                else:
                    deadline = started + step / 1000 / self._speed
                    await asyncio.sleep(max(deadline - loop.time(), 0))
        except ConnectionError:
            log.debug("simulator.client_gone", response_id=run.id)

    async def _stop(self, run: ResponseRun) -> None:
        task = self._playing.get(run.id)
        if task is not None:
            task.cancel()
            # asyncio.wait never raises the task's CancelledError into this task.
            await asyncio.wait([task])

    async def _stop_all(self) -> None:
        tasks = list(self._playing.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def stats(self) -> dict[str, Any]:
        return {"frames_received": self.frames_received}
