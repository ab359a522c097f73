"""One simulator session's sockets: the read loop, response playback, and paced sending.

The read loop hands each frame to the ``Engine`` and performs the actions it returns, in
order. Responses play in their own task (one per ``ResponseRun``), waiting for each audio
deadline at the configured speed. Every send is awaited under one lock, so frames keep
their order and a slow client slows the simulator down (backpressure). When the client
goes away, all response tasks are cancelled and awaited: nothing outlives the socket.

A WebRTC call's session is one ``Connection`` without a socket of its own: sideband sockets
attach to it (`serve`), each receiving every event, and the device's data channel is
`receive`. On a call, output audio travels as media, so the events carry
``output_audio_buffer.started``/``.stopped`` instead of audio deltas, like the service.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import orjson
import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from relay.simulator.engine import Action, CancelResponse, Engine, StartResponse
from relay.simulator.events import Event
from relay.simulator.response import ResponseRun

log = structlog.get_logger(__name__)


Socket = web.WebSocketResponse[Literal[False]]
_AUDIO_DELTAS = frozenset({"response.output_audio.delta", "response.audio.delta"})
_AUDIO_DONE = frozenset({"response.output_audio.done", "response.audio.done"})


class Connection:
    """Drives one ``Engine`` over its sockets (one, or a call's sideband sockets)."""

    def __init__(
        self,
        ws: Socket | None,
        engine: Engine,
        *,
        speed: float,
        media: bool = False,
        max_session_seconds: float = 3600.0,
    ) -> None:
        self._ws = ws
        self._listeners: list[Socket] = [ws] if ws is not None else []
        self._engine = engine
        self._speed = speed
        # A call: audio is media, not events.
        self._media = media
        self._speaking: set[Any] = set()  # responses whose audio is playing, on a call
        self._max_session_seconds = max_session_seconds
        # The task ending an expired session, once its time has come.
        self._expiring: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()
        # Response playback tasks by response id; each removes itself when done.
        self._playing: dict[str, asyncio.Task[None]] = {}
        self.frames_received = 0

    async def run(self) -> None:
        """Serve the socket until the client closes it, goes away, or the session expires."""
        assert self._ws is not None
        # A timer, not a sleeping task: nothing per session until a session actually expires.
        timer = asyncio.get_running_loop().call_later(self._max_session_seconds, self._expire_now)
        try:
            for event in self._engine.greeting():
                await self._send(event)
            await self.serve(self._ws)
        finally:
            timer.cancel()
            await self.stop_all()
            if self._expiring is not None:
                await asyncio.wait([self._expiring])  # its close completes first

    def _expire_now(self) -> None:
        self._expiring = asyncio.get_running_loop().create_task(
            self._expire(), name="simulator-session-expiry"
        )

    async def _expire(self) -> None:
        """At the session's maximum duration: an ``error`` event, then close 1001."""
        assert self._ws is not None
        await self.stop_all()
        log.info("simulator.session_expired", max_session_seconds=self._max_session_seconds)
        try:
            await self._send(self._engine.expired_event())
        except ConnectionError:
            return
        await self._ws.close(code=WSCloseCode.GOING_AWAY, message=b"Session expired")

    async def serve(self, ws: Socket) -> None:
        """Read ``ws`` until it closes; it gets every event meanwhile."""
        if ws not in self._listeners:
            self._listeners.append(ws)
        try:
            async for message in ws:
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
            if ws is not self._ws and ws in self._listeners:
                self._listeners.remove(ws)

    async def receive(self, data: bytes) -> None:
        """One client event from elsewhere than a socket (a call's data channel)."""
        await self._perform(self._receive(data))

    async def close_all(self, code: int, message: bytes) -> None:
        """Stop playing and close every socket (a call hung up)."""
        await self.stop_all()
        for ws in list(self._listeners):
            await ws.close(code=code, message=message)

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
        for out in self._as_media(event) if self._media else (event,):
            data = orjson.dumps(out)
            async with self._send_lock:
                for ws in list(self._listeners):
                    try:
                        await ws.send_frame(data, WSMsgType.TEXT)
                    except ConnectionError:
                        if ws is self._ws:
                            raise
                        # a sideband socket that went away: its read loop removes it

    def _as_media(self, event: Event) -> tuple[Event, ...]:
        """On a call, a response's audio deltas become one ``output_audio_buffer.started``,
        and its audio's done event is followed by ``output_audio_buffer.stopped``."""
        kind, response_id = event.get("type"), event.get("response_id")
        if kind in _AUDIO_DELTAS:
            if response_id in self._speaking:
                return ()
            self._speaking.add(response_id)
            return (self._engine.event("output_audio_buffer.started", response_id=response_id),)
        if kind in _AUDIO_DONE and response_id in self._speaking:
            self._speaking.discard(response_id)
            stopped = self._engine.event("output_audio_buffer.stopped", response_id=response_id)
            return event, stopped
        return (event,)

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

    async def stop_all(self) -> None:
        tasks = list(self._playing.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def stats(self) -> dict[str, Any]:
        return {"frames_received": self.frames_received}
