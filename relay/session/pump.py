"""The bridge: two pumps that forward frames between a client and its upstream.

How it works:
- One pump per direction reads a frame from one socket and awaits its write to the other
  before reading the next. The write's drain is the backpressure: a slow reader stops its
  peer's pump, whose socket stops being read, whose TCP window closes.
- While a pump waits with nothing queued, its socket's queue is *armed* (`frames.py`): each
  frame is judged, metered and written to the peer inside the read callback, with no task
  switch. Whatever needs to wait (a refusal to send, a throttle, a full peer buffer, a
  switch, a close) is declined there and queued, and the pump does it, in order, as before.
  Both paths run the same checks (`_forward_in`/`_forward_out` and the pumps share them).
- Text frames travel as the bytes they arrived as (no decode, no re-encode). Client frames
  pass the session policy first: an event that breaks a rule is corrected and forwarded (or,
  with `on_violation = "refuse"`, answered with an `error` event); the session goes on until
  too many refusals close it (1008).
- The upstream's `session.updated` events are parsed to keep the session in force, which
  the policy judges changes against. Everything else is only sniffed for its type.
- A client that speaks the other dialect than its deployment gets a `Translator`
  (`relay.session.dialect`): client events are translated before the policy judges them
  (the policy speaks the deployment's dialect), server events after the session is tracked.
  A field that has no counterpart is left out and named in an `error` event.
- A watchdog ends the session at the policy's maximum duration (close 1001, as the service
  does) or idle timeout (1008), with an `error` event that says why.
- The first side to end decides the `Ending`. Its pump closes the other socket with the
  mapped close code, which ends the other pump's read; both pumps then return. A relay-side
  stop (shutdown) records its own Ending first and closes both sockets.
- Nothing here outlives `Bridge.run`: the client pump runs in the session's TaskGroup, the
  upstream pump in the handler's own task inside it (one task fewer per session), and both
  sockets are closed on the way out, whatever happened.
- With continuity on, a `Renewal` (renewal.py) may replace the upstream socket: the client
  pump waits at `gate` while it does, and both pumps take `self.upstream` afresh after.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import structlog
from aiohttp import WSMsgType, web
from aiohttp._websocket.models import WSMessageTextBytes

from relay.ops.metrics import FLUSH_INTERVAL_SECONDS, SessionMeter
from relay.ops.redaction import SECRETS
from relay.session import frames, shared_strings
from relay.session.codec import (
    ClientFrame,
    FrameError,
    dump_json,
    is_utf8,
    load_json,
    read_client_frame,
    read_large,
    read_unparsed,
    sniff_type,
)
from relay.session.continuity import PREVIOUS_ITEM_EVENTS, TRACKED
from relay.session.dialect import Translation, Translator
from relay.session.event_types import AUDIO_DELTA_TYPES
from relay.session.events import error_event
from relay.session.flag import Flag
from relay.session.lane import APPEND, Lane
from relay.session.policy import (
    LARGE_EVENT_BYTES,
    PolicyViolation,
    Rewritten,
    SessionPolicy,
    event_id_of,
)
from relay.session.renewal import Renewal, is_loss
from relay.session.reported import judge_reported
from relay.session.setup import shown_expiry
from relay.session.tool_calls import EVENTS as TOOL_EVENTS
from relay.session.tool_calls import ToolCalls
from relay.upstream.handshake import abort as abort_upstream

ClientSocket = web.WebSocketResponse[bool]
UpstreamSocket = aiohttp.ClientWebSocketResponse[bool]
ClientMessage = aiohttp.WSMessage | WSMessageTextBytes
UpstreamMessage = ClientMessage
Side = Literal["client", "upstream", "relay"]

_MAX_REASON_BYTES = 123
_YIELD_EVERY = 16
_TRUNCATE = "conversation.item.truncate"
# After a tool's output came, how long a drain waits for the client to ask for the answer.
_ANSWER_DUE = 3.0
# Lines about single events (a rewrite, a refusal, an upstream error, a field left out) a
# session logs; the rest are counted (`session_ended`'s `event_lines_left_out`): a client
# repeating a rewritten event wrote 300 bytes of log for each, at 250 events a second.
EVENT_LINES_PER_SESSION = 100
# The per-frame clock, one global lookup (not `time.perf_counter`: two).
_clock = time.perf_counter
_LARGE_FRAME = frames.LARGE_FRAME
_log = structlog.get_logger("relay.session")
# Read per frame: an enum member through its class costs 7 times a global on Python 3.11.
_TEXT = WSMsgType.TEXT


@dataclass(frozen=True, slots=True)
class Ending:
    """Who ended a session, how, and what each side was told."""

    side: Side
    code: int
    reason: str
    # False when the side vanished without a close frame or broke the protocol.
    clean: bool = True
    # For relay-side ends: the stable code saying why (the client's `error` event code).
    cause: str = ""

    @property
    def outcome(self) -> str:
        """A bounded label for metrics."""
        if self.cause:
            return self.cause
        if self.side == "relay":
            return "relay_closed"
        return f"{self.side}_{'closed' if self.clean else 'lost'}"


# A close frame without a status (aiohttp reads its code as 0), logged as RFC 6455 7.1.5
# names it, "no status received": a normal close, passed on as 1000.
_NO_STATUS = 1005


def _client_close(code: int, reason: str) -> Ending:
    """How a client's close frame ends the session: one whose code may not be sent (1005,
    1006, 1015, 5000 and up: aiohttp takes them) broke the protocol, answered with 1002."""
    if not code:
        return Ending("client", _NO_STATUS, reason)
    if not frames.is_sendable(code):
        return Ending("client", 1002, frames.invalid_close_code(code), clean=False)
    return Ending("client", code, reason)


def close_for_upstream(ending: Ending) -> tuple[int, str]:
    """The close frame the upstream gets when the client side ended."""
    if ending.side == "client" and ending.clean and frames.is_sendable(ending.code):
        return ending.code, ending.reason
    if ending.side == "client" and ending.clean and ending.code == _NO_STATUS:
        return 1000, ""
    if ending.side == "relay":
        return 1001, "relay closed the session"
    return 1001, "client went away"


def close_for_client(ending: Ending) -> tuple[int, str]:
    """The close frame the client gets when the upstream side ended (its reason cleaned of
    the relay's credentials: the upstream's words)."""
    if ending.side == "upstream" and ending.clean and frames.is_sendable(ending.code):
        return ending.code, SECRETS.clean_known(ending.reason)
    if ending.side == "upstream" and ending.clean and ending.code == _NO_STATUS:
        return 1000, ""  # it was an error close (1011 "upstream connection lost")
    if ending.side == "relay" and frames.is_sendable(ending.code):
        return ending.code, ending.reason
    return 1011, "upstream connection lost"


def _reason(text: str) -> bytes:
    return text.encode("utf-8")[:_MAX_REASON_BYTES]


class Bridge:
    """Forwards frames both ways between one client and one upstream socket."""

    __slots__ = (
        "client", "upstream", "policy", "session", "meter", "greeting", "close_timeout",
        "stall_timeout", "response_timeout", "max_pings_per_second", "client_transport",
        "ending", "writing_in_since", "writing_out_since", "between_responses", "violations",
        "started_at", "started_wall", "last_client_event_at", "last_upstream_event_at",
        "throttled", "renewal", "gate", "translator", "tokens", "filled_at", "updated", "tasks",
        "timer", "_delay_in", "_delay_out", "_rate", "_burst", "lane_in", "lane_out",
        "settling", "requested", "responding", "appended", "event_lines", "tools", "turn_over",
        "_answer_due", "__weakref__",
    )  # fmt: skip

    def __init__(
        self,
        client: ClientSocket,
        upstream: UpstreamSocket,
        *,
        policy: SessionPolicy,
        session: dict[str, Any],
        meter: SessionMeter,
        greeting: Sequence[bytes] = (),
        close_timeout: float,
        stall_timeout: float,
        response_timeout: float = 60.0,
        max_pings_per_second: float = 5.0,
        client_transport: asyncio.Transport | None = None,
        translator: Translator | None = None,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.policy = policy
        # The session in force, as the upstream last reported it.
        self.session = session
        self.meter = meter
        # The relay-delay histograms of frames forwarded in their read callbacks.
        self._delay_in = meter.delay_observer("in")
        self._delay_out = meter.delay_observer("out")
        # The callbacks' fast paths (lane.py): none where a frame needs more than a lane
        # checks, as appends and deltas the translator rewrites. Continuity's audio keeper
        # drops the client's (renewal.py).
        self.lane_in: Lane | None = None
        self.lane_out: Lane | None = None
        if translator is None or APPEND not in translator.client_events:
            max_frame = policy.max_frame_bytes
            self.lane_in = meter.lane(
                "in",
                -1 if max_frame is None else max_frame,
                policy.max_append_audio_bytes if APPEND in policy.allowed_events else -1,
            )
        if translator is None:
            self.lane_out = meter.lane("out")
        # Frames the client gets before any other: the session.created in force.
        self.greeting = greeting
        self.close_timeout = close_timeout
        self.stall_timeout = stall_timeout
        self.response_timeout = response_timeout
        self.max_pings_per_second = max_pings_per_second
        # To drop the client's TCP connection at once, when it takes no data.
        self.client_transport = client_transport
        # Between the client's dialect and the deployment's, when they differ.
        self.translator = translator
        self.ending: Ending | None = None
        # When each pump began its current write, or None: a write that never ends is a
        # stalled peer (the ticker checks).
        self.writing_in_since: float | None = None
        self.writing_out_since: float | None = None
        # Set while no response is being generated: what a graceful drain waits for.
        self.between_responses = Flag(True)
        # The ids of the responses being generated: out-of-band ones run side by side.
        self.responding: list[str] = []
        # The client left mid-response: the upstream is read on (nothing sent) until the
        # response's `response.done`, with the usage the team is billed for, is metered.
        self.settling: asyncio.Event | None = None
        # A client's `response.create` went up and its `response.created` has not come back.
        self.requested = False
        # Audio appended since the upstream last reported the input buffer committed or
        # cleared: without turn detection, a switch then would lose it (continuity).
        self.appended = False
        self.event_lines = 0  # lines about single events so far (`_event_line`)
        # A turn in progress: a response, a tool the client runs (a call waiting for its
        # output), or the answer the client asks for once the output came (`_ANSWER_DUE`).
        # A drain waits for it (`turn_over`).
        self.tools = ToolCalls()
        self.turn_over = Flag(True)
        self._answer_due: asyncio.TimerHandle | None = None
        self.violations = 0
        self.throttled = False
        # perf_counter, not loop.time(): uvloop's clock moves in 1 ms steps, which rounded
        # every forwarded frame's delay to 0 or 1 ms.
        self.started_at = time.perf_counter()
        self.started_wall = time.time()  # for the `expires_at` clients are shown
        self.last_client_event_at = self.started_at
        self.last_upstream_event_at = self.started_at
        # Continuity (None when off), and the gate client frames wait at while it switches.
        self.renewal: Renewal | None = None
        self.gate = Flag(True)
        # The client's event bucket (max_events_per_second, event_burst), shared by both paths.
        self._rate = float(policy.max_events_per_second)
        self._burst = float(policy.event_burst)
        self.tokens = self._burst
        self.filled_at = self.started_at
        # "session.updated", or "transcription_session.updated" (a preview transcription)
        self.updated = policy.session_event("updated")
        # The session's task group while it runs, and its watchdog's next call.
        self.tasks: asyncio.TaskGroup | None = None
        self.timer: asyncio.TimerHandle | None = None
        meter.session_changed(session)

    async def run(self) -> Ending:
        try:
            async with asyncio.TaskGroup() as tasks:
                self.tasks = tasks
                # The client pump in a task, the upstream pump in this one: per session a task
                # and a pending asyncio.wait fewer (about 1.5 KiB).
                client_pump = tasks.create_task(
                    self._client_to_upstream(), name="pump client->upstream"
                )
                # The first watch at a random point of the first interval: sessions that
                # start together do not all flush their meters in the same tick.
                first = random.random() * min(FLUSH_INTERVAL_SECONDS, self.stall_timeout)
                self.timer = asyncio.get_running_loop().call_later(first, self._watch)
                if self.renewal is not None:
                    renewer = tasks.create_task(self.renewal.run(), name="session renewal")
                await self._upstream_to_client()
                if not client_pump.done():
                    # Ends once its socket is closed (the upstream pump closed it). Its failure
                    # reaches the task group, not this wait.
                    await asyncio.wait((client_pump,))
                self._unwatch()  # before the task group closes: no watchdog task after it
                if self.renewal is not None:
                    renewer.cancel()
        except* Exception as group:
            for exc in group.exceptions:
                _log.error("pump_failed", exc_info=exc)
            await self.stop(1011, "relay internal error", cause="relay_internal_error")
        finally:
            self._unwatch()
            # Also on cancellation: no socket outlives its session. aiohttp may cancel the
            # handler when the client's connection drops, before a pump sees it.
            transport = self.client_transport
            if transport is not None and transport.is_closing():
                self._end(Ending("client", 1006, "connection lost", clean=False))
            self._end(Ending("relay", 1001, "relay closed the session", cause="relay_closed"))
            self._disarm()
            await self._close_both()
            self.meter.flush()
        assert self.ending is not None
        return self.ending

    async def stop(
        self,
        code: int,
        reason: str,
        *,
        cause: str,
        message: str = "",
        error_type: str = "server_error",
        tell_client: bool = True,
    ) -> None:
        """End the session from the relay's side: tell the client why, close both.

        ``cause`` is a stable code: the `error` event's code and the session's outcome label.
        """
        if not self._end(Ending("relay", code, reason, cause=cause)):
            return
        if tell_client and not self.client.closed:
            event = error_event(cause, message or reason, error_type=error_type)
            await self._send_to_client(event)
        settling = self.settling
        if settling is None:
            await self._close_both()
            return
        # Ended for something of the client's making mid-response: the response is billed.
        await self._close_client()
        await self._settle(settling)
        await self._close_upstream()
        frames.forget_error(self.client)
        frames.forget_error(self.upstream)

    def _end(self, ending: Ending) -> bool:
        if self.ending is not None:
            return False
        self.ending = ending
        if _settles(ending) and (self.requested or self.responding):
            self.settling = asyncio.Event()
        self.between_responses.set()  # nothing is in progress any more: a drain need not wait
        self.turn_over.set()
        self._stop_answer_wait()
        self._disarm()
        return True

    def _disarm(self) -> None:
        """No more frames forwarded in read callbacks: the pumps see what is left."""
        frames.disarm(frames.queue_of(self.client))
        frames.disarm(frames.queue_of(self.upstream))

    def _refill(self, now: float) -> float:
        """The client's event tokens at ``now``."""
        tokens = self.tokens + (now - self.filled_at) * self._rate
        self.tokens = tokens = tokens if tokens < self._burst else self._burst
        self.filled_at = now
        return tokens

    def _forward_in(self, msg: Any) -> bool:
        """A client frame, in its read callback: forwarded when nothing in it needs to wait
        (the same checks as the pump's); False leaves it, and what follows, to the pump."""
        if msg.type is not _TEXT or not self.gate.value:
            return False
        # `_refill`, inline: a call fewer per frame.
        arrived = _clock()
        tokens = self.tokens + (arrived - self.filled_at) * self._rate
        self.tokens = tokens = tokens if tokens < self._burst else self._burst
        self.filled_at = arrived
        if tokens < 1.0:
            return False  # the pump throttles or refuses
        data = msg.data
        if len(data) >= _LARGE_FRAME:
            return False  # the pump writes it in fragments: no masked copy of all of it
        upstream = self.upstream
        lane = self.lane_in
        if lane is not None and frames.writable(upstream) and lane.append(data) >= 0:
            # An append the lane judged and counted as the general way below would have.
            self.tokens -= 1.0
            self.last_client_event_at = arrived
            if not self.appended:
                self._audio_pending()
            paused = frames.write_text(upstream, data)
            lane.written(arrived)
            if paused:
                frames.disarm(frames.queue_of(self.client))  # the pump waits for the drain
            return True
        if self._off_the_loop(data) or (not data.isascii() and not is_utf8(data)):
            return False  # the pump checks a large frame's size before reading it
        try:
            kind, event, audio = read_client_frame(data, self._parses)
            translator = self.translator
            if translator is not None and kind in translator.client_events:
                return False  # may have to tell the client what it left out
            checked = self.policy.check(kind, data, self.session, audio, event)
        except (FrameError, PolicyViolation):
            return False  # the pump refuses it
        if not isinstance(checked, bytes) or not frames.writable(upstream):
            return False  # a rewrite is logged by the pump; a closing upstream is its to handle
        if kind == _TRUNCATE and self.renewal is not None and self.renewal.textified:
            return False  # perhaps a replayed reply's: the pump asks the renewal
        self.tokens -= 1.0
        self.last_client_event_at = arrived
        self.meter.client_event(kind, checked, audio)
        if kind == "response.create":
            self.requested = True
        elif kind == APPEND and not self.appended:
            self._audio_pending()
        renewal = self.renewal
        if renewal is not None:
            if kind == "response.create":
                renewal.response_requested()
            self._keep_audio(kind, checked, audio)
        # Nothing that can raise after the write: a raise declines, and the pump would send
        # the frame again.
        paused = frames.write_text(upstream, checked)
        self._delay_in(_clock() - arrived)
        if paused:
            frames.disarm(frames.queue_of(self.client))  # the pump waits for the drain
        return True

    def _off_the_loop(self, frame: bytes) -> bool:
        """Whether a client frame is judged in a thread (`_read_large`): a large one, or
        one past SCANNED_EVENT_BYTES that would be parsed (its bytes cannot judge it, or the
        policy or a translation reads it)."""
        size = len(frame)
        if size >= LARGE_EVENT_BYTES:
            return True
        if size < SCANNED_EVENT_BYTES:
            return False
        unparsed = read_unparsed(frame)
        return unparsed is None or self._parses(unparsed[0])

    def _parses(self, kind: str) -> bool:
        """Whether an event of this type is parsed: the policy or a translation reads it."""
        translator = self.translator
        if translator is not None and kind in translator.client_events:
            return True
        return self.policy.parses(kind)

    async def _read_large(self, frame: bytes) -> ClientFrame:
        """`read_client_frame` for a frame `_off_the_loop`: refused first if it is over the
        policy's size, then checked and judged in a thread (`codec.read_large`). On the loop,
        a crafted 30 MiB event held every session of the process for 1.5 s, 200 frames just
        under 256 KiB 1.2 s, and the UTF-8 check of 30 MiB of Chinese text 28 ms."""
        self.policy.check_size(frame)
        try:
            return await asyncio.to_thread(read_large, frame, self._parses)
        except FrameError as exc:
            if exc.code == "invalid_utf8":
                raise  # closes the connection (1007)
            raise PolicyViolation(exc.message, code=exc.code, event_id=event_id_of(frame)) from exc

    def _audio_pending(self) -> None:
        self.appended = True
        if self.renewal is not None:
            self.renewal.audio_pending()

    def _keep_audio(self, kind: str, frame: bytes, audio: int) -> None:
        """With replay = "audio", the audio keeper follows the client's input buffer."""
        renewal = self.renewal
        if renewal is not None and renewal.keeper is not None:
            if kind.startswith("input_audio_buffer."):
                renewal.keeper.client_event(kind, frame, audio)

    async def _client_to_upstream(self) -> None:
        client, meter, now = self.client, self.meter, time.perf_counter
        policy, gate, translator = self.policy, self.gate, self.translator
        queue, forward = frames.queue_of(client), self._forward_in
        rate, burst = policy.max_events_per_second, float(policy.event_burst)
        throttle = policy.on_rate_exceeded == "throttle"
        # The ping bucket, in locals: pings never take the callback path.
        ping_rate = self.max_pings_per_second
        ping_tokens = 2 * ping_rate
        ping_filled_at = now()
        # Nothing of the last event is held while the pump waits for the next: an 8 MiB event
        # would stay in memory until then (and a masked copy of it was what got written).
        msg: ClientMessage | None = None
        frame = b""
        checked: bytes | Rewritten = b""
        event: dict[str, Any] | None = None
        translation: Translation | None = None
        # Frames already queued are received without suspending: yield now and then, so one
        # client's burst cannot hold the loop (and every other session) for its whole length.
        unyielded = 0
        while True:
            msg, frame, checked, event, translation = None, b"", b"", None, None
            unyielded += 1
            if unyielded >= _YIELD_EVERY:
                unyielded = 0
                await asyncio.sleep(0)
            if frames.paused(self.upstream):
                await self._drained("in", self.upstream)
            if self.ending is None:
                frames.arm(queue, forward)
            msg = await client.receive()
            frames.disarm(queue)
            if msg.type is _TEXT:
                arrived = self.last_client_event_at = now()
                if self._refill(arrived) < 1.0:
                    if not throttle:
                        await self._refuse(_rate_limited(rate, burst, event_id_of(msg.data)))
                        continue
                    # Stop reading this client until a token is back: TCP holds the rest,
                    # nothing is dropped, and the excess costs the relay nothing.
                    await self._throttle((1.0 - self.tokens) / rate, "events")
                    arrived = self.filled_at = now()
                    self.tokens = 1.0
                self.tokens -= 1.0
                large = self._off_the_loop(msg.data)  # UTF-8 checked there too
                if not large and not msg.data.isascii() and not is_utf8(msg.data):
                    await self._client_broke(1007, "invalid UTF-8 in a text frame", "invalid_utf8")
                    break
                try:
                    if not large:
                        kind, event, audio = read_client_frame(msg.data, self._parses)
                    else:
                        kind, event, audio = await self._read_large(msg.data)
                    frame = msg.data
                    if translator is not None and kind in translator.client_events:
                        translation = await self._translate_in(kind, frame, event)
                        if translation.frame is None:
                            continue
                        frame, event = translation.frame, translation.event
                    checked = policy.check(kind, frame, self.session, audio, event)
                except FrameError as exc:
                    if exc.code == "invalid_utf8":
                        await self._client_broke(1007, exc.message, exc.code)
                        break
                    await self._refuse(PolicyViolation(exc.message, code=exc.code))
                    continue
                except PolicyViolation as violation:
                    await self._refuse(violation)
                    continue
                if isinstance(checked, bytes):
                    frame = checked
                else:
                    frame = self._rewritten(kind, checked)
                meter.client_event(kind, frame, audio)
                if not gate.is_set():
                    await gate.wait()  # held while the upstream is switched
                upstream = self.upstream
                if kind == "response.create":
                    self.requested = True
                elif kind == APPEND and not self.appended:
                    self._audio_pending()
                if kind == "response.create" and self.renewal is not None:
                    self.renewal.response_requested()  # before the send: see there
                writing = self.writing_in_since = now()
                try:
                    renewal = self.renewal
                    if (
                        kind != _TRUNCATE
                        or renewal is None
                        or not renewal.textified
                        or not await renewal.emptied(upstream, frame)
                    ):
                        await frames.send_text(upstream, frame)
                except ConnectionError:
                    if not await self._resend(upstream, frame):
                        break  # the upstream pump sees why
                written = now()
                self.writing_in_since = None
                meter.forwarded("in", written - arrived, written - writing)
                # After the send: a frame held at a switch counts on the new upstream session.
                self._keep_audio(kind, frame, audio)
            elif msg.type is WSMsgType.PING:
                arrived = now()
                ping_tokens = min(
                    2 * ping_rate, ping_tokens + (arrived - ping_filled_at) * ping_rate
                )
                ping_filled_at = arrived
                if ping_tokens < 1.0:
                    await self._throttle((1.0 - ping_tokens) / ping_rate, "pings")
                    ping_filled_at, ping_tokens = now(), 1.0
                ping_tokens -= 1.0
                try:
                    await client.pong(msg.data)
                except ConnectionError:
                    pass  # the next receive sees why
            elif msg.type is WSMsgType.PONG:
                continue  # an answer to the heartbeat; any data already reset its timer
            elif msg.type is WSMsgType.BINARY:
                await self._refuse(
                    PolicyViolation(
                        "Binary frames are not supported; send events as JSON text frames.",
                        code="invalid_frame_type",
                    )
                )
            elif msg.type is WSMsgType.CLOSE:
                self._end(_client_close(msg.data, msg.extra or ""))
                break
            else:  # CLOSING, CLOSED, ERROR: gone without a close frame, or broke the protocol
                if isinstance(msg.data, frames.MessageBufferFull):  # the relay refused it: 1013
                    self._end(Ending("relay", 1013, msg.data.REASON, cause="message_buffer_full"))
                    break
                if isinstance(msg.data, frames.MessageTooFragmented):  # refused: 1008
                    reason = msg.data.REASON
                    self._end(Ending("relay", 1008, reason, cause="client_message_too_fragmented"))
                    break
                code = _error_code(msg.data) or client.close_code or 1006
                cause = "client_message_too_big" if code == 1009 else ""
                reason = _describe_error(msg.type, msg.data)
                if code == 1009 and hasattr(client, "too_big_reason"):
                    # As the client's close says it (aiohttp's words carry its limit + 1).
                    reason = client.too_big_reason
                self._end(Ending("client", code, reason, clean=False, cause=cause))
                break
        if self.settling is not None:
            await self._settle(self.settling)
        await self._close_upstream()

    async def _settle(self, settling: asyncio.Event) -> None:
        """The client left mid-response: cancel the responses and wait, at most
        ``close_timeout``, for their `response.done`, whose usage the upstream bills (a client
        that hangs up during every answer would otherwise spend unseen by its budget). One
        asked for and not started yet is cancelled once it starts (see `_settled_by`)."""
        if settling.is_set():
            return  # settled already (a relay-side end settles before the client pump ends)
        try:
            async with asyncio.timeout(self.close_timeout):
                for response_id in self.responding or [""]:
                    await frames.send_text(self.upstream, _cancel(response_id))
                await settling.wait()
        except (TimeoutError, ConnectionError):
            _log.info("response_unsettled")

    def _response_done(self, response_id: str) -> None:
        responding = self.responding
        if response_id in responding:
            responding.remove(response_id)
        elif responding:
            responding.pop(0)  # a done without a known id ends the oldest
        if not responding:
            self.between_responses.set()
            # Idle counts from here: a long answer is not the client being idle.
            self.last_client_event_at = max(self.last_client_event_at, time.perf_counter())

    def responses_lost(self) -> None:
        """The upstream that was generating them is gone (continuity's resume)."""
        self.responding.clear()
        self.between_responses.set()
        self._turn_changed()

    def _tool_event(self, kind: str, frame: bytes) -> None:
        if self.tools.observe(kind, frame):
            # The last output came: the client asks for the answer next.
            self._stop_answer_wait()
            loop = asyncio.get_running_loop()
            self._answer_due = loop.call_later(_ANSWER_DUE, self._answer_waited)
        self._turn_changed()

    def _answer_waited(self) -> None:
        self._answer_due = None
        self._turn_changed()

    def _stop_answer_wait(self) -> None:
        if self._answer_due is not None:
            self._answer_due.cancel()
            self._answer_due = None

    def _turn_changed(self) -> None:
        if self.ending is not None:
            return
        if self.between_responses.value and not self.tools.waiting and self._answer_due is None:
            self.turn_over.set()
        else:
            self.turn_over.clear()

    async def _settled_by(self, kind: str, frame: bytes, settling: asyncio.Event) -> None:
        """An upstream event read after the client left mid-response (already metered)."""
        if kind == "response.created":  # asked for before the client left: cancelled too
            try:
                await frames.send_text(self.upstream, _cancel(_response_id(frame)))
            except ConnectionError:
                pass  # the upstream is going: its pump ends and sets `settling`
        if not self.responding and not self.requested:
            settling.set()

    def _accepted_out(self, kind: str, frame: bytes) -> Sequence[bytes]:
        """An upstream event the client will get: metered and tracked; the frames to send."""
        if kind == "error" or (kind == "response.done" and b'"error"' in frame):
            frame = _without_secrets(frame)
        self.meter.upstream_event(kind, frame)
        renewal = self.renewal
        translator = self.translator
        if renewal is not None and kind in PREVIOUS_ITEM_EVENTS:
            frame = renewal.hide_note(frame)
        if renewal is not None and kind in TRACKED:
            instead = renewal.own_answer(kind, frame)
            if instead is not None:  # an answer to the relay's own edits
                if translator is None:
                    return instead
                return [o for f in instead for o in translator.to_client(sniff_type(f), f)]
        if kind == self.updated:
            frame = self._session_updated(frame)
        elif kind == "error":
            self.requested = False  # the request refused (or another event: no matter)
            self._upstream_error(frame)
        elif kind == "response.created":
            self.requested = False
            self.responding.append(_response_id(frame))
            self.between_responses.clear()
            self._stop_answer_wait()
            self._turn_changed()
        elif kind == "response.done":
            self._response_done(_response_id(frame))
        if kind in TOOL_EVENTS:
            self._tool_event(kind, frame)
        if renewal is not None and kind in TRACKED:
            renewal.track(kind, frame)  # after `responding` has the event: see its quiet point
        return (frame,) if translator is None else translator.to_client(kind, frame)

    def _forward_out(self, msg: Any) -> bool:
        """An upstream frame, in its read callback: forwarded when the client's socket takes
        it at once; False leaves it, and what follows, to the pump."""
        if msg.type is not _TEXT:
            return False
        frame = msg.data
        try:
            kind = sniff_type(frame)
        except FrameError:
            return False  # the pump ends the session
        if not frame.isascii() and not is_utf8(frame):
            return False  # the pump ends the session: the client must not be blamed (1007)
        renewal = self.renewal
        if renewal is not None and kind == "error" and renewal.is_marker(frame):
            return False
        client = self.client
        if not frames.writable(client):
            return False
        arrived = self.last_upstream_event_at = _clock()
        lane = self.lane_out
        if lane is not None and kind in AUDIO_DELTA_TYPES and lane.delta(kind, frame) >= 0:
            # Counted by the lane, as `_accepted_out` would have (nothing else in it applies
            # to a delta), and forwarded as it is.
            paused = frames.write_text(client, frame)
            lane.written(arrived)
        else:
            paused = False
            try:
                outs = self._accepted_out(kind, frame)
            except (ValueError, FrameError):
                return False  # not JSON past its type: the pump ends the session
            for out in outs:
                paused = frames.write_text(client, out)
            self._delay_out(_clock() - arrived)
        if paused:
            frames.disarm(frames.queue_of(self.upstream))  # the pump waits for the drain
        return True

    async def _drained(self, direction: str, ws: ClientSocket | UpstreamSocket) -> None:
        """Wait until ``ws`` takes data again (the ticker ends a wait that lasts)."""
        began = time.perf_counter()
        if direction == "in":
            self.writing_in_since = began
        else:
            self.writing_out_since = began
        try:
            await frames.drained(ws)
        except ConnectionError:
            pass  # its pump sees why
        waited = time.perf_counter() - began
        if direction == "in":
            self.writing_in_since = None
        else:
            self.writing_out_since = None
        self.meter.forwarded(direction, waited, waited)

    async def _upstream_to_client(self) -> None:
        client, meter, now = self.client, self.meter, time.perf_counter
        renewal, forward = self.renewal, self._forward_out
        greeting, self.greeting = self.greeting, ()  # sent once: not kept for the session
        translator = self.translator
        try:
            for frame in greeting:
                for out in (
                    translator.to_client(sniff_type(frame), frame) if translator else (frame,)
                ):
                    await client.send_frame(out, WSMsgType.TEXT)
        except ConnectionError:
            pass  # the client pump sees why
        del greeting
        # Nothing of the last event is held while the pump waits for the next: not a large
        # event, not the greeting (a few hundred bytes, measured in a 4 KiB allocation).
        msg: UpstreamMessage | None = None
        frame = out = b""
        outs: Sequence[bytes] = ()
        while True:
            msg, frame, out, outs = None, b"", b"", ()
            if frames.paused(client):
                await self._drained("out", client)
            upstream = self.upstream  # a renewal may have replaced it
            queue = frames.queue_of(upstream)
            if self.ending is None:
                frames.arm(queue, forward)
            msg = await upstream.receive()
            frames.disarm(queue)
            if msg.type is _TEXT:
                arrived = self.last_upstream_event_at = now()
                frame = msg.data
                try:
                    kind = sniff_type(frame)
                    if not frame.isascii() and not is_utf8(frame):
                        raise FrameError("invalid_utf8", "invalid UTF-8 in a text frame")
                except FrameError as exc:
                    await self._upstream_broke(f"invalid event ({exc.code})")
                    break
                if renewal is not None and kind == "error" and renewal.is_marker(frame):
                    await renewal.switch_at_marker(frame)  # the relay's own: not the client's
                    continue
                try:
                    outs = self._accepted_out(kind, frame)
                except (ValueError, FrameError):
                    await self._upstream_broke("invalid event (invalid_json)")
                    break
                settling = self.settling
                if settling is not None:
                    await self._settled_by(kind, frame, settling)
                    continue  # the client is gone: metered, not sent
                writing = self.writing_out_since = now()
                try:
                    for out in outs:
                        await client.send_frame(out, WSMsgType.TEXT)
                except ConnectionError:
                    if self.ending is not None and self.settling is None:
                        break  # the client pump sees why
                    continue  # the client is going: read on while the client pump decides
                written = now()
                self.writing_out_since = None
                meter.forwarded("out", written - arrived, written - writing)
            elif msg.type is WSMsgType.BINARY:
                await self._upstream_broke("binary frame")
                break
            elif renewal is not None and await self._resumed(msg.type, msg.data, renewal):
                continue
            elif msg.type is WSMsgType.CLOSE:
                self._end(Ending("upstream", msg.data or _NO_STATUS, msg.extra or ""))
                break
            elif upstream.close_code == 1009:
                await self._upstream_broke(
                    "event larger than the relay's max_message_bytes", "upstream_message_too_big"
                )
                break
            else:
                lost = Ending("upstream", 1006, _describe_error(msg.type, msg.data), clean=False)
                if self._end(lost):
                    _log.warning("upstream_lost", detail=lost.reason)
                    await self._send_to_client(
                        error_event(
                            "upstream_disconnected",
                            "The connection to the upstream service was lost.",
                        )
                    )
                break
        if renewal is not None:
            renewal.notify()  # a client pump waiting for a new upstream gives up
        if self.settling is not None:
            self.settling.set()  # nothing more will come
        await self._close_client()

    async def _resumed(self, kind: WSMsgType, data: object, renewal: Renewal) -> bool:
        """A lost upstream replaced (continuity's resume): the session goes on."""
        if self.ending is not None or not is_loss(kind, data, self.upstream.close_code):
            return False
        detail = _describe_error(kind, data)
        _log.warning("upstream_lost", detail=detail, resuming=True)
        return await renewal.resume(detail)

    async def _resend(self, failed: UpstreamSocket, frame: bytes) -> bool:
        """A send to a lost upstream: once continuity replaced it, send there instead."""
        if self.renewal is None:
            return False
        upstream = await self.renewal.settled(failed)
        if upstream is None:
            return False
        try:
            await frames.send_text(upstream, frame)
        except ConnectionError:
            return False
        return True

    async def _translate_in(
        self, kind: str, frame: bytes, event: dict[str, Any] | None
    ) -> Translation:
        """A client event in the deployment's dialect; what has no counterpart there is left
        out and named in an `error` event. Its frame is None when nothing is left to send."""
        assert self.translator is not None
        translation = self.translator.to_upstream(kind, frame, event)
        if translation.dropped:
            for param in translation.dropped:
                self._event_line(
                    _log.info, "client_field_untranslatable", param=param, event_type=kind
                )
                await self._send_to_client(
                    error_event(
                        "untranslatable_field",
                        f"{param} has no counterpart in the {self.translator.upstream} dialect "
                        "this deployment speaks; it was left out of the event."
                        if translation.frame is not None
                        else f"The event {kind!r} has no counterpart in the "
                        f"{self.translator.upstream} dialect this deployment speaks.",
                        error_type="invalid_request_error",
                        param=param,
                        event_id=translation.event_id,
                    )
                )
        return translation

    def _session_updated(self, frame: bytes) -> bytes:
        """Keep the session the upstream reports; the frame the client gets (its expiry no
        later than the relay's limit: `shown_expiry`)."""
        event = load_json(frame)
        session = event.get("session") if isinstance(event, dict) else None
        if isinstance(session, dict):
            policy = self.policy
            if policy.inspects_session or policy.instructions_prefix:
                verdict = judge_reported(policy, self.session, session)
                if verdict.violation is not None:
                    # Every client update was judged before it went up: the upstream's doing
                    # (a misconfigured or misbehaving service). Its session is in force.
                    _log.warning("upstream_session_off_policy", param=verdict.violation.param)
            self.session = shared_strings.share(session)  # kept: see shared_strings
            self.meter.session_changed(session)
            shown = shown_expiry(session, self.policy.max_session_seconds, self.started_wall)
            if shown is not session:
                event["session"] = shown
                return dump_json(event)
        return frame

    def _upstream_error(self, frame: bytes) -> None:
        """Log and count an upstream `error` event (its message, which may quote the
        client's input, is left out)."""
        event = load_json(frame)
        error = event.get("error") if isinstance(event, dict) else None
        error = error if isinstance(error, dict) else {}
        code, error_type = error.get("code"), error.get("type")
        if (
            self.settling is not None
            and code == "response_cancel_not_active"
            and error.get("event_id") == SETTLE_EVENT_ID
        ):
            # The relay's own cancel (the client left) met a response that had just ended:
            # nobody's error, and not the upstream's to count. (Only once the client has
            # left: a client sending that id would hide its own.)
            return
        level = _log.warning if error_type == "server_error" else _log.info
        self._event_line(
            level,
            "upstream_error_event",
            error_type=_clip(error_type),
            code=_clip(code),
            param=_clip(error.get("param")),
            event_id=_clip(error.get("event_id")),
        )
        self.meter.upstream_error(code, error_type)

    async def _upstream_broke(self, what: str, cause: str = "upstream_protocol_error") -> None:
        _log.warning(cause, detail=what)
        await self.stop(
            1011,
            "upstream protocol error",
            cause=cause,
            message=f"The upstream service sent an {what}; the session is closed.",
        )

    async def _client_broke(self, code: int, reason: str, cause: str) -> None:
        """The client broke the WebSocket protocol: close it with ``code``, no error event."""
        _log.info("client_protocol_error", detail=reason)
        await self.stop(code, reason, cause=f"client_{cause}", tell_client=False)

    def _rewritten(self, kind: str, rewritten: Rewritten) -> bytes:
        """The policy corrected a client event: say so, and forward the correction."""
        self._event_line(
            _log.info, "client_event_rewritten", event_type=kind, params=list(rewritten.params)
        )
        self.meter.rewritten(rewritten.params)
        return rewritten.frame

    async def _refuse(self, violation: PolicyViolation) -> None:
        self.violations += 1
        self.meter.violation(violation.code)
        param, message = violation.param, violation.message
        if param is not None and self.translator is not None:
            named = param.partition(".")[2]
            param = self.translator.client_param(param)
            # The message names the field as the deployment does: as the client does, too.
            as_client = param.partition(".")[2]
            if named and as_client and named != as_client:
                message = message.replace(named, as_client, 1)
        self._event_line(
            _log.info,
            "client_event_refused",
            code=violation.code,
            param=violation.param,
            violations=self.violations,
        )
        await self._send_to_client(
            error_event(
                violation.code,
                message,
                error_type="invalid_request_error",
                param=param,
                event_id=violation.event_id,
            )
        )
        if self.violations > self.policy.max_violations:
            await self.stop(
                1008,
                "too many policy violations",
                cause="too_many_violations",
                message=f"More than {self.policy.max_violations} events were refused; "
                "the session is closed.",
                error_type="invalid_request_error",
            )

    def _event_line(self, level: Callable[..., Any], event: str, **fields: Any) -> None:
        """A line about one event, while the session has `EVENT_LINES_PER_SESSION` left."""
        self.event_lines += 1
        if self.event_lines <= EVENT_LINES_PER_SESSION:
            level(event, **fields)

    @property
    def event_lines_left_out(self) -> int:
        return max(0, self.event_lines - EVENT_LINES_PER_SESSION)

    def _unwatch(self) -> None:
        self.tasks = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _watch(self) -> None:
        """Every second (a timer, not a task): flush the meter; end the session at a stalled
        write, its duration or idle limit, or a silent upstream mid-response."""
        self.timer = None
        if self.ending is not None or self.tasks is None:
            return
        self.meter.flush()
        max_seconds = self.policy.max_session_seconds
        idle_seconds = self.policy.idle_timeout_seconds
        now = time.perf_counter()
        ending = self._overdue(now, max_seconds, idle_seconds)
        if ending is not None:
            self.tasks.create_task(ending, name="session watchdog")
            return
        responding = not self.between_responses.is_set()
        wake = now + min(FLUSH_INTERVAL_SECONDS, self.stall_timeout)
        if max_seconds is not None:
            wake = min(wake, self.started_at + max_seconds)
        if idle_seconds is not None and not responding:  # never idle while responding
            wake = min(wake, self.last_client_event_at + idle_seconds)
        if responding:
            wake = min(wake, self.last_upstream_event_at + self.response_timeout)
        self.timer = asyncio.get_running_loop().call_later(max(0.0, wake - now), self._watch)

    def _overdue(
        self, now: float, max_seconds: float | None, idle_seconds: float | None
    ) -> Coroutine[Any, Any, None] | None:
        """What ends the session now, if anything does."""
        for direction, since in (("in", self.writing_in_since), ("out", self.writing_out_since)):
            if since is not None and now - since >= self.stall_timeout:
                return self._stalled(direction)
        if max_seconds is not None and now >= self.started_at + max_seconds:
            # 1001, as the service closes its own expired sessions: a normal end to clients.
            return self.stop(
                1001,
                "session duration limit reached",
                cause="session_expired",
                message=f"The session reached its maximum duration of {max_seconds:g} s.",
                error_type="invalid_request_error",
            )
        responding = not self.between_responses.is_set()
        if responding and now >= self.last_upstream_event_at + self.response_timeout:
            return self._upstream_silent()
        if (
            idle_seconds is not None
            and not responding
            and now >= self.last_client_event_at + idle_seconds
        ):
            return self.stop(
                1008,
                "idle timeout",
                cause="idle_timeout",
                message=f"No client event for {idle_seconds:g} s; the session is closed.",
                error_type="invalid_request_error",
            )
        return None

    async def _stalled(self, direction: str) -> None:
        """A peer took no data for stall_timeout: its pump is stuck writing to it."""
        if direction == "out":
            _log.warning("client_stalled", stall_timeout_seconds=self.stall_timeout)
            message = "The client did not read for too long; the session is closed."
            # An error event goes out only if the client's buffer takes it at once.
            await self.stop(1008, "client too slow", cause="client_stalled", message=message)
        else:
            _log.warning("upstream_stalled", stall_timeout_seconds=self.stall_timeout)
            message = "The upstream service stopped taking data; the session is closed."
            await self.stop(1011, "upstream stalled", cause="upstream_stalled", message=message)

    async def _throttle(self, seconds: float, what: str) -> None:
        if not self.throttled:
            self.throttled = True
            _log.info("client_throttled", what=what)  # once a session: a flood logs one line
            self.meter.violation(f"{what}_throttled")
        await asyncio.sleep(seconds)

    async def _upstream_silent(self) -> None:
        """A response is in progress and the upstream has sent nothing for too long."""
        _log.warning("upstream_stalled", response_timeout_seconds=self.response_timeout)
        await self.stop(
            1011,
            "upstream stalled",
            cause="upstream_stalled",
            message=f"The upstream service sent nothing for {self.response_timeout:g} s "
            "during a response; the session is closed.",
        )

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
        try:
            async with asyncio.timeout(self.close_timeout):
                await self.upstream.close(code=code, message=_reason(reason))
        except TimeoutError:
            # An upstream that stopped reading: its graceful close would wait for ever.
            _log.info("upstream_close_timeout")
            abort_upstream(self.upstream)
        finally:
            _after_close(self.upstream)

    async def _close_client(self) -> None:
        if self.client.closed or self.ending is None:
            return
        cause = self.ending.cause
        if cause == "too_many_violations" or cause.startswith("client_"):
            discard = getattr(self.client, "discard_incoming", None)
            if discard is not None:  # the relay's ClientSocket
                discard(self.close_timeout)
        code, reason = close_for_client(self.ending)
        try:
            async with asyncio.timeout(self.close_timeout):
                await self.client.close(code=code, message=_reason(reason))
            _after_close(self.client)
        except TimeoutError:
            # A client that reads nothing never takes the close frame: drop the connection,
            # releasing what is buffered for it.
            _log.info("client_close_timeout")
            if self.client_transport is not None:
                self.client_transport.abort()

    async def _close_both(self) -> None:
        await asyncio.gather(self._close_client(), self._close_upstream(), return_exceptions=True)
        frames.forget_error(self.client)
        frames.forget_error(self.upstream)


SETTLE_EVENT_ID = "relay_settle"


def _cancel(response_id: str) -> bytes:
    """The `response.cancel` that settles a response (by its id; without one, the default
    conversation's)."""
    cancel: dict[str, str] = {"type": "response.cancel", "event_id": SETTLE_EVENT_ID}
    if response_id:
        cancel["response_id"] = response_id
    return dump_json(cancel)


def _response_id(frame: bytes) -> str:
    """A `response.created` or `response.done`'s response id ("" if it has none)."""
    event = load_json(frame)
    response = event.get("response") if isinstance(event, dict) else None
    response_id = response.get("id") if isinstance(response, dict) else None
    return response_id if isinstance(response_id, str) else ""


# Relay-side ends after which a response in progress is not settled: the upstream is the
# trouble (nothing more would come). A client too slow to read is settled once its
# connection is dropped (the upstream pump, held writing to it, then reads on), and a drain
# past its grace settles what it cuts: both were billed by the service and counted nowhere.
_UNSETTLED_CAUSES = ("upstream",)


def _settles(ending: Ending) -> bool:
    """Whether a response in progress is still read to its end (and billed) after this end:
    the client left, or was closed for something of its making."""
    if ending.side == "client":
        return True
    return ending.side == "relay" and not ending.cause.startswith(_UNSETTLED_CAUSES)


# A frame past this size that its bytes alone cannot judge (an escape, a second `type`) goes
# to the scan in a thread like a large one: its strict parse on the loop costs about 170 ns a
# value, and 200 frames just under LARGE_EVENT_BYTES of `{}` held every session 1.2 s.
SCANNED_EVENT_BYTES = 16 * 1024


def _without_secrets(frame: bytes) -> bytes:
    """An upstream's error, in its words, which may quote what it was sent: never the
    relay's credential, however written (escaped, a key). Read as JSON: raw bytes miss a
    `\\u0061`."""
    event = load_json(frame)
    cleaned = SECRETS.clean_known(event)
    if cleaned == event:
        return frame
    _log.warning("upstream_error_quoted_a_secret")
    return dump_json(cleaned)


def _rate_limited(rate: float, burst: float, event_id: str | None) -> PolicyViolation:
    # With the event's id, as every refusal: SDKs match a refused `response.create` to
    # its request by it (the agents SDK's response queue waited for ever without it).
    return PolicyViolation(
        f"More than {rate:g} events a second (bursts of {burst:g}); this event was dropped. "
        "Send fewer, larger audio chunks.",
        code="rate_limit_exceeded",
        event_id=event_id,
    )


def _after_close(ws: ClientSocket | UpstreamSocket) -> None:
    """aiohttp 3.14 re-arms a closed socket's heartbeat timer when the peer's close reply
    arrives, keeping the socket and its buffers alive for one more heartbeat interval (a
    churn test saw ~6 KiB per session pile up). Cancel it once the reply is processed."""
    cancel = getattr(ws, "_cancel_heartbeat", None)
    if callable(cancel):
        asyncio.get_running_loop().call_soon(cancel)


def _error_code(data: object) -> int | None:
    """The close code aiohttp chose for a protocol error it found (1009 for too big...)."""
    code = getattr(data, "code", None) if isinstance(data, Exception) else None
    return code if isinstance(code, int) else None


def _clip(value: object, limit: int = 128) -> object:
    """A field of an upstream event for a log line: strings cut to ``limit`` characters."""
    return value[:limit] if isinstance(value, str) else value


def _describe_error(kind: WSMsgType, data: object) -> str:
    if kind is WSMsgType.ERROR and data is not None:
        return f"protocol error: {data}"
    return "connection lost"
