"""The bridge: two pumps that forward frames between a client and its upstream.

How it works:
- One pump per direction reads a frame from one socket and awaits its write to the other
  before reading the next. The write's drain is the backpressure: a slow reader stops its
  peer's pump, whose socket stops being read, whose TCP window closes.
- Text frames travel as the bytes they arrived as (no decode, no re-encode).
- The first side to end decides the `Ending`. Its pump closes the other socket with the
  mapped close code, which ends the other pump's read; both pumps then return. A relay-side
  stop (shutdown) records its own Ending first and closes both sockets.
- Nothing here outlives `Bridge.run`: both pumps run in one TaskGroup and both sockets are
  closed on the way out, whatever happened.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

import aiohttp
import structlog
from aiohttp import WSMsgType, web

from relay.events import error_event

ClientSocket = web.WebSocketResponse[bool]
UpstreamSocket = aiohttp.ClientWebSocketResponse[bool]
Side = Literal["client", "upstream", "relay"]

# Close codes an endpoint may put in a close frame (RFC 6455 7.4, IANA registry).
_SENDABLE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})
_MAX_REASON_BYTES = 123
_log = structlog.get_logger("relay.session")


@dataclass(frozen=True, slots=True)
class Ending:
    """Who ended a session, how, and what each side was told."""

    side: Side
    code: int
    reason: str
    # False when the side vanished without a close frame or broke the protocol.
    clean: bool = True


def is_sendable(code: int) -> bool:
    return code in _SENDABLE or 3000 <= code <= 4999


def close_for_upstream(ending: Ending) -> tuple[int, str]:
    """The close frame the upstream gets when the client side ended."""
    if ending.side == "client" and ending.clean and is_sendable(ending.code):
        return ending.code, ending.reason
    if ending.side == "relay":
        return 1001, "relay closed the session"
    return 1001, "client went away"


def close_for_client(ending: Ending) -> tuple[int, str]:
    """The close frame the client gets when the upstream side ended."""
    if ending.side == "upstream" and ending.clean and is_sendable(ending.code):
        return ending.code, ending.reason
    if ending.side == "relay" and is_sendable(ending.code):
        return ending.code, ending.reason
    return 1011, "upstream connection lost"


def _reason(text: str) -> bytes:
    return text.encode("utf-8")[:_MAX_REASON_BYTES]


class Bridge:
    """Forwards frames both ways between one client and one upstream socket."""

    def __init__(
        self, client: ClientSocket, upstream: UpstreamSocket, *, close_timeout: float
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.close_timeout = close_timeout
        self.ending: Ending | None = None
        self.frames_from_client = 0
        self.frames_from_upstream = 0

    async def run(self) -> Ending:
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._client_to_upstream(), name="pump client->upstream")
                tasks.create_task(self._upstream_to_client(), name="pump upstream->client")
        except* Exception as group:
            for exc in group.exceptions:
                _log.error("pump_failed", error=repr(exc))
            await self.stop(1011, "relay internal error", error_code="relay_internal_error")
        finally:
            # Also on cancellation (relay shutdown): no socket outlives its session.
            self._end(Ending("relay", 1001, "relay closed the session"))
            await self._close_both()
        assert self.ending is not None
        return self.ending

    async def stop(
        self, code: int, reason: str, *, error_code: str | None = None, message: str = ""
    ) -> None:
        """End the session from the relay's side: tell the client why, close both."""
        if not self._end(Ending("relay", code, reason)):
            return
        if error_code is not None and not self.client.closed:
            await self._send_to_client(error_event(error_code, message or reason))
        await self._close_both()

    def _end(self, ending: Ending) -> bool:
        if self.ending is not None:
            return False
        self.ending = ending
        return True

    async def _client_to_upstream(self) -> None:
        client, upstream = self.client, self.upstream
        while True:
            msg = await client.receive()
            if msg.type is WSMsgType.TEXT:
                self.frames_from_client += 1
                try:
                    await upstream.send_frame(msg.data, WSMsgType.TEXT)
                except ConnectionError:
                    break  # the upstream pump sees why
            elif msg.type is WSMsgType.BINARY:
                await self._send_to_client(
                    error_event(
                        "invalid_frame_type",
                        "Binary frames are not supported; send events as JSON text frames.",
                        error_type="invalid_request_error",
                    )
                )
            elif msg.type is WSMsgType.CLOSE:
                self._end(Ending("client", msg.data, msg.extra or ""))
                break
            else:  # CLOSING, CLOSED, ERROR: gone without a close frame, or broke the protocol
                code = client.close_code or 1006
                self._end(Ending("client", code, _describe_error(msg.type, msg.data), clean=False))
                break
        await self._close_upstream()

    async def _upstream_to_client(self) -> None:
        client, upstream = self.client, self.upstream
        while True:
            msg = await upstream.receive()
            if msg.type is WSMsgType.TEXT:
                self.frames_from_upstream += 1
                try:
                    await client.send_frame(msg.data, WSMsgType.TEXT)
                except ConnectionError:
                    break  # the client pump sees why
            elif msg.type is WSMsgType.BINARY:
                _log.warning("upstream_binary_frame_dropped", size=len(msg.data))
            elif msg.type is WSMsgType.CLOSE:
                self._end(Ending("upstream", msg.data, msg.extra or ""))
                break
            else:
                if self._end(
                    Ending("upstream", 1006, _describe_error(msg.type, msg.data), clean=False)
                ):
                    await self._send_to_client(
                        error_event(
                            "upstream_disconnected",
                            "The connection to the upstream service was lost.",
                        )
                    )
                break
        await self._close_client()

    async def _send_to_client(self, frame: bytes) -> None:
        try:
            async with asyncio.timeout(self.close_timeout):
                await self.client.send_frame(frame, WSMsgType.TEXT)
        except (ConnectionError, TimeoutError, RuntimeError):
            pass  # the client is gone or stuck; its close follows

    async def _close_upstream(self) -> None:
        if self.upstream.closed or self.ending is None:
            return
        code, reason = close_for_upstream(self.ending)
        await self.upstream.close(code=code, message=_reason(reason))

    async def _close_client(self) -> None:
        if self.client.closed or self.ending is None:
            return
        code, reason = close_for_client(self.ending)
        await self.client.close(code=code, message=_reason(reason))

    async def _close_both(self) -> None:
        await asyncio.gather(self._close_client(), self._close_upstream(), return_exceptions=True)


def _describe_error(kind: WSMsgType, data: object) -> str:
    if kind is WSMsgType.ERROR and data is not None:
        return f"protocol error: {data}"
    return "connection lost"
