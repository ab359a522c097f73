"""A WebSocket heartbeat that costs nothing per read.

aiohttp re-arms a socket's heartbeat on every read: a `call_soon` handle, then a callback
that cancels the pong deadline and computes the next ping time. At paced load a read is one
frame, so that was five Python calls and a handle per frame on each of a session's two
sockets, for a ping that is due once in 20 seconds.

Here a read only sets a flag. The heartbeat timer, when it falls due, looks at the flag: if
anything arrived since it was armed, the peer is alive and the timer re-arms a heartbeat
from now; otherwise it pings as aiohttp does. So a quiet peer is pinged after one to two
heartbeats of silence (aiohttp: one), and a busy one never is. The pong deadline (half a
heartbeat) is met by anything arriving after the ping, as aiohttp's is.

aiohttp internals used (tests/test_heartbeat.py fails CI when any of them moves): the
socket's `_on_data_received` (what its protocol calls per read), `_send_heartbeat` and
`_pong_not_received` (the two timers' callbacks), `_reset_heartbeat` (arms the ping timer
when `_heartbeat_cb` is None, and cancels the pong deadline), and `_heartbeat_cb` and
`_pong_response_cb` (the timers' handles).
"""

from __future__ import annotations

from typing import Any


class LazyHeartbeat:
    """Mix in before aiohttp's `WebSocketResponse` or `ClientWebSocketResponse` (their
    instances have a `__dict__`, where the flag goes once set)."""

    _data_seen = False

    def _on_data_received(self) -> None:
        self._data_seen = True

    def _send_heartbeat(self) -> None:
        if not self._rearmed():
            super()._send_heartbeat()  # type: ignore[misc]

    def _pong_not_received(self) -> None:
        if not self._rearmed():
            super()._pong_not_received()  # type: ignore[misc]

    def _rearmed(self) -> bool:
        """If anything arrived since the timer was armed, the peer is alive: the next ping is
        a heartbeat from now and no pong is awaited (True). Otherwise False: nothing done."""
        if not self._data_seen:
            return False
        self._data_seen = False
        socket: Any = self
        socket._heartbeat_cb = None
        socket._reset_heartbeat()
        return True
