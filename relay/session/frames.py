"""Forwarding inside the socket's read callback: no task switch per frame.

aiohttp parses a socket's bytes in its protocol's `data_received` and puts each message on
a queue that a task awaits (`receive()`): every frame costs a future, a wake-up and a task
step before the pump sees it. Here the queue can be *armed* with a forward function that
gets each message first, synchronously, while the bytes are being parsed. When it takes the
message (returns True), the message was judged, metered and written to the peer's transport
right there; when it declines, the message is queued as aiohttp would, the queue disarms,
and the pump task handles it and everything after it in order (see `pump.py`).

aiohttp internals used (aiohttp is pinned below 3.15; `tests/test_frames.py` fails CI
when any of these moves):
- the queue class the server (`aiohttp.web_ws`) and the client (`aiohttp.client`) build per
  socket, `WebSocketDataQueue`, whose `feed_data` its C reader calls per message (a cpdef
  method: a Python subclass's override is called), and its public `_buffer` deque;
- a socket's `_reader` (that queue) and `_writer` (`WebSocketWriter`), the writer's
  `_closing`, `compress`, `use_mask` (a client's frames are masked), `get_random_bits`,
  `_output_size`, `_limit`, `transport` and `protocol`, whose `_paused` (`writing_paused`) is
  true while the transport's buffer is past its high-water mark and `_drain_helper()` waits
  until it is not;
- the protocol's `_drain_waiter`, the future every `_drain_helper()` waiter shares (a
  cancelled one is dropped: see `_drain`);
- the queue's `feed_eof` (called when the connection is lost) and `_protocol`, and the
  protocols' `_data_received_cb` (the heartbeat callback, cleared then: see `feed_eof`);
- a socket's `_exception` (what `exception()` returns), cleared once it is closed;
- `aiohttp._websocket.helpers.websocket_mask` (XOR with a 4-byte key, in place, on a bytearray);
- `aiohttp._websocket.models.WSMessageTextBytes`, the message the reader queues for a text
  frame it does not decode, and the server protocol's `_message_tail` and `set_parser`.

The frames forwarded while one read is parsed are written together when it is done
(`feed`): one system call per read, not per frame.

Frames written from the callbacks are framed here (RFC 6455 5.2), not by aiohttp's generic
writer: a header packed by length and one transport write. Frames to the upstream (the relay
is its WebSocket client, so it masks them) are built in one buffer: aiohttp's writer copies
the payload twice (`bytearray(message)`, then `header + mask + that`), 16 MiB of copies for
an 8 MiB event on top of the event itself.

Large events (`LARGE_FRAME`, 1 MiB, and more) cost about their own size: on the way in, a
connection's splitter (`splitter`, in C) fills a large text frame into one buffer past
aiohttp's reader, which would have held two copies; on the way to the upstream, the pump
sends it as fragments of 256 KiB, each masked as it is written (`send_text`).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

import aiohttp.client
import aiohttp.web_ws
import structlog
from aiohttp import WSCloseCode, WSMsgType
from aiohttp._websocket.helpers import websocket_mask
from aiohttp._websocket.models import WSMessageTextBytes
from aiohttp._websocket.reader import WebSocketDataQueue
from aiohttp.client_exceptions import ClientConnectionResetError
from aiohttp.http_websocket import WebSocketError

Forward = Callable[[Any], bool]
_log = structlog.get_logger("relay.session")
_TEXT = int(WSMsgType.TEXT)
# The pump's masked sends (`send_text`) above this size are written by `write_text`, with one
# copy of the payload (not aiohttp's two); below it the copies are small, and aiohttp's
# `send_frame` keeps its own accounting. The callbacks' writes always use `write_text`.
ONE_COPY_ABOVE = 64 * 1024
_FIN_TEXT = 0x80 | _TEXT
# Frame headers by payload length (RFC 6455 5.2): under 126, under 65,536, and beyond.
_HEAD_SHORT = struct.Struct("!BB").pack
_HEAD_MEDIUM = struct.Struct("!BBH").pack
_HEAD_LONG = struct.Struct("!BBQ").pack
_MASK_KEY = struct.Struct("!I").pack


class ForwardingQueue(WebSocketDataQueue):
    """aiohttp's message queue, with an optional forward function that sees messages first."""

    __slots__ = ("forward",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.forward: Forward | None = None

    def feed_data(self, data: Any, size: int) -> None:
        forward = self.forward
        if forward is not None:
            try:
                if forward(data):
                    if _BATCH.open:
                        _BATCH.source = self  # its writes may pause the peer: see `feed`
                    return
            except Exception as exc:
                # A bug, not a refusal (those return False). Declined: the pump handles the
                # message again, where the same failure ends the session (pump_failed, 1011).
                _log.error("frame_callback_failed", error=type(exc).__name__)
            self.forward = None  # what follows a queued message must queue behind it
        super().feed_data(data, size)

    def feed_eof(self) -> None:
        super().feed_eof()
        # The connection is gone. aiohttp leaves the socket's heartbeat callback (a bound
        # method of the socket) on the connection's protocol, which the socket reaches back:
        # a cycle per socket, so every closed session was left to the cycle collector, which
        # then freed tens of thousands of objects in one pass (gen-0 pauses of 120-170 ms
        # under set-up churn). Without the edge, a session is freed by reference counting.
        self.forward = None
        protocol: Any = self._protocol
        if protocol is not None:
            protocol._data_received_cb = None


def install() -> None:
    """Make aiohttp build ForwardingQueues for the relay's sockets (both sides)."""
    aiohttp.web_ws.WebSocketDataQueue = ForwardingQueue  # type: ignore[attr-defined]
    aiohttp.client.WebSocketDataQueue = ForwardingQueue  # type: ignore[attr-defined]


def queue_of(ws: Any) -> ForwardingQueue | None:
    """The socket's queue when it can be armed (built after `install`), else None."""
    queue = getattr(ws, "_reader", None)
    return queue if isinstance(queue, ForwardingQueue) else None


def arm(queue: ForwardingQueue | None, forward: Forward) -> None:
    """Let ``forward`` take the next messages, if none is waiting to be received."""
    if queue is not None and not queue._buffer:
        queue.forward = forward


def disarm(queue: ForwardingQueue | None) -> None:
    if queue is not None:
        queue.forward = None


def writable(ws: Any) -> bool:
    """Whether a frame can be written to ``ws`` now, without waiting or compressing."""
    writer = ws._writer
    return (
        writer is not None
        and not writer._closing
        and not writer.compress
        and not ws._closing
        and not writer.transport.is_closing()
    )


class _Batch:
    """The frames the callbacks forwarded while one read was parsed (`feed`), to one peer:
    written together when the read is done, in one system call."""

    __slots__ = ("open", "source", "writer", "frames")

    def __init__(self) -> None:
        self.open = False
        self.source: ForwardingQueue | None = None  # the queue whose callback forwarded them
        self.writer: Any = None
        self.frames: list[bytes | bytearray] = []


# One at a time: reads do not nest, and nothing else runs while one is parsed.
_BATCH = _Batch()


def feed(parser: Any, data: bytes, splitter: Splitter | None = None) -> tuple[bool, bytes]:
    """``parser.feed_data(data)`` (an upgraded connection's WebSocket reader), with the
    frames its callbacks forward written at the end: a read that holds several frames (a
    relay that fell behind, a client sending in bursts) costs the peer one `writev`, not one
    `write` each. Then, if the peer's transport is past its high-water mark, the reading
    side's callback is disarmed and its pump waits for the drain, as after a single write:
    the backpressure bound is the high-water mark plus one read.

    With the connection's ``splitter`` (see `splitter`), its large text frames are filled
    past the reader and queued as the reader would have queued them."""
    # Annotated, not `cast`: a cast is a function call and a new generic alias per read.
    result: tuple[bool, bytes]
    parts = None if splitter is None else splitter.split(data)  # None: all of it as it came
    batch = _BATCH
    if batch.open:  # reads do not nest; if one ever did, it joins the outer read's batch
        result = parser.feed_data(data) if parts is None else _feed_parts(parser, parts, splitter)
        return result
    batch.open = True
    try:
        result = parser.feed_data(data) if parts is None else _feed_parts(parser, parts, splitter)
        return result
    finally:
        batch.open = False
        writer = batch.writer
        if writer is not None:
            batch.writer = None
            frames = batch.frames
            transport = writer.transport
            # Closing only if the peer's connection was lost meanwhile: what it would have
            # been sent is lost with it, as a write to it would be.
            if not transport.is_closing():
                if len(frames) == 1:
                    transport.write(frames[0])
                else:
                    transport.writelines(frames)
            frames.clear()
            if writer.protocol._paused:
                disarm(batch.source)
        batch.source = None


# Text frames of this size and more are filled past aiohttp's reader, in one buffer.
LARGE_FRAME = 1 << 20


class MessageBufferFull(WebSocketError):
    """A client's frame refused because the process holds its `server.message_buffer_bytes`
    of messages still arriving, or the client's team its part of it (a message of 64 KiB or
    less only past twice that): the client is closed with 1013 (try again later)."""

    REASON = "relay busy: too many large messages arriving at once; try again later"

    def __init__(self) -> None:
        super().__init__(WSCloseCode.TRY_AGAIN_LATER, self.REASON)


# The splitter's (`_accel.MAX_FRAGMENTS`, held equal by tests/unit/test_splitter.py).
MAX_FRAGMENTS = 16384


class MessageTooFragmented(WebSocketError):
    """A client's data message in more than MAX_FRAGMENTS frames: each costs the reader as
    much as a whole message (millions of 1-byte fragments held the event loop for seconds).
    The client is closed with 1008 (policy violation)."""

    REASON = f"message sent in more than {MAX_FRAGMENTS} fragments"

    def __init__(self) -> None:
        super().__init__(WSCloseCode.POLICY_VIOLATION, self.REASON)


class WronglyMasked(WebSocketError):
    """A frame masked otherwise than RFC 6455 5.1 requires: a client's unmasked, or an
    upstream's masked. aiohttp's reader takes either; a client that works through the relay
    would then fail against the service itself. Closed with 1002 (protocol error)."""

    def __init__(self, masked: bool) -> None:
        reason = (
            "a client's frames must be masked" if masked else "a server's frames must not be masked"
        )
        super().__init__(WSCloseCode.PROTOCOL_ERROR, reason)


def splitter(
    queue: Any, *, masked: bool, max_size: int, budget: MessageBudget | None = None
) -> Splitter | None:
    """A connection's splitter (`_accel.Splitter`): it must see every byte its reader sees,
    from the first. aiohttp's reader keeps a frame's pieces, joins them, copies them to
    unmask and hands on a copy of that: twice an event's size while the last two live. A
    large text frame is filled into one buffer of its size instead. With a ``budget``, the
    bytes of each message are counted there while it arrives, and a frame past it refused.
    None where `_accel` was not built: the reader takes everything, as before."""
    if _Splitter is None:
        return None
    return _Splitter(queue, masked, LARGE_FRAME, max_size, budget)


def _feed_parts(
    parser: Any, parts: list[tuple[bool | None, Any]], splitter: Splitter | None
) -> tuple[bool, bytes]:
    """A read the splitter cut: the reader's parts fed to it, the large frames' payloads
    queued as the reader queues a text message it does not decode; a refused frame (kind
    None, with its length) ends the reading as the reader's own errors do."""
    assert splitter is not None
    result: tuple[bool, bytes] = (False, b"")
    for kind, part in parts:
        if kind is True:
            splitter.queue.feed_data(WSMessageTextBytes(WSMsgType.TEXT, part, ""), len(part))
        elif kind is False:
            result = parser.feed_data(part)
            if result[0]:
                break  # the reader failed (its queue holds why): nothing after counts
        elif part == -2:
            masked = bool(splitter.masked)
            _log.warning("frame_wrongly_masked", must_be_masked=masked)
            splitter.queue.set_exception(WronglyMasked(masked))
            return True, b""
        elif part < 0:
            _log.warning("message_too_fragmented", max_fragments=MAX_FRAGMENTS)
            splitter.queue.set_exception(MessageTooFragmented())
            return True, b""
        else:
            team = splitter.budget
            process = team.parent if team is not None else None
            _log.warning(
                "message_buffer_full",
                frame_bytes=part,
                **_budget_fields("team_", team if process is not None else None),
                **_budget_fields("", process or team),
            )
            splitter.queue.set_exception(MessageBufferFull())
            return True, b""
    return result


def _budget_fields(prefix: str, budget: MessageBudget | None) -> dict[str, int]:
    if budget is None:
        return {}
    return {f"{prefix}held_bytes": budget.held, f"{prefix}limit_bytes": budget.limit}


# Close codes an endpoint may put in a close frame (RFC 6455 7.4, IANA registry).
_SENDABLE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


def is_sendable(code: int) -> bool:
    return code in _SENDABLE or 3000 <= code <= 4999


def invalid_close_code(code: int) -> str:
    """The close reason for a peer's close frame with a code it may not send."""
    return f"protocol error: Invalid close code: {code}"  # as aiohttp words it


def write_text(ws: Any, frame: bytes) -> bool:
    """Write ``frame`` as one text frame to a `writable` socket; True when its transport is
    then past its high-water mark (its peer reads too slowly: wait for `drained`). Inside
    `feed`, the frame joins the read's batch (False: `feed` checks the mark after)."""
    writer = ws._writer
    if writer.use_mask:  # a client's frame (to the upstream)
        out = text_frame(frame, True, writer.get_random_bits())
        writer._output_size += len(out)
    elif len(frame) < 65536:
        out = text_frame(frame, False, 0)
    else:  # header and payload in two writes: no copy of a large payload
        _send(writer, _frame_head(_FIN_TEXT, False, len(frame)))
        return _send(writer, frame)
    return _send(writer, out)


def _send(writer: Any, data: bytes | bytearray) -> bool:
    batch = _BATCH
    if batch.open:
        if batch.writer is writer:
            batch.frames.append(data)
            return False
        if batch.writer is None:
            batch.writer = writer
            batch.frames.append(data)
            return False
        # A second peer in one read (not done by the callbacks today): written at once.
    writer.transport.write(data)
    return bool(writer.protocol._paused)


def _text_frame(payload: bytes, masked: bool, mask: int) -> bytes | bytearray:
    """One text frame (RFC 6455 5.2, FIN set) holding ``payload``, masked with the 4-byte
    key ``mask`` when ``masked``: the header packed by length, the payload copied once. The
    reference for `_accel`'s."""
    header = _frame_head(_FIN_TEXT, masked, len(payload))
    if not masked:
        return header + payload
    key = _MASK_KEY(mask)
    start = len(header) + 4
    out = bytearray(start)
    out += payload
    # websocket_mask masks from the buffer's first byte: rotate the key so the payload, which
    # starts at `start`, gets key byte 0 first; the head it scrambles is written after.
    turn = -start % 4
    websocket_mask((key + key)[turn : turn + 4], out)
    out[:start] = header + key
    return out


async def send_text(ws: Any, frame: bytes) -> None:
    """`ws.send_frame(frame, TEXT)`, with a large masked frame written by `write_text`, and
    one of `LARGE_FRAME` and more in fragments (`_send_in_fragments`). A send waits for a
    fragmented message on ``ws`` to end first: no data frame may come between its
    fragments. Raises ConnectionError (aiohttp's ClientConnectionResetError) on a closing
    socket."""
    while (writing := _FRAGMENTED.get(id(ws))) is not None:
        await asyncio.shield(writing)
    writer = ws._writer
    if writer is None or not writer.use_mask or len(frame) <= ONE_COPY_ABOVE or writer.compress:
        await ws.send_frame(frame, WSMsgType.TEXT)
        return
    if writer._closing or writer.transport.is_closing():
        raise ClientConnectionResetError("Cannot write to closing transport")
    if len(frame) >= LARGE_FRAME:
        await _send_in_fragments(ws, frame)
        return
    write_text(ws, frame)
    # aiohttp's writer waits for the drain once it has written past its limit: so does this.
    if writer._output_size > writer._limit:
        writer._output_size = 0
        await drained(ws)


# A fragmented message being written, by socket (`id`), until it ends.
_FRAGMENTED: dict[int, asyncio.Future[None]] = {}
FRAGMENT = 256 * 1024
_CONTINUATION = 0x0


async def _send_in_fragments(ws: Any, frame: bytes) -> None:
    """A large masked message as a text frame without FIN and continuation frames of
    `FRAGMENT` bytes (RFC 6455 5.4), waiting for the transport to drain between them: what
    is held is the event and about one fragment, not a masked copy of the whole event.
    Pings and pongs may come between fragments; `send_text` holds other data frames."""
    writer = ws._writer
    key = id(ws)
    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    _FRAGMENTED[key] = ended
    try:
        view = memoryview(frame)
        for start in range(0, len(frame), FRAGMENT):
            end = min(start + FRAGMENT, len(frame))
            if writer._closing or writer.transport.is_closing():
                raise ClientConnectionResetError("Cannot write to closing transport")
            first = _TEXT if start == 0 else _CONTINUATION
            head, body = _masked_fragment(
                view[start:end], first, end == len(frame), writer.get_random_bits()
            )
            writer.transport.write(head)
            writer.transport.write(body)
            if writer.protocol._paused:
                await _drain(writer.protocol)  # ConnectionError if the peer is gone
    finally:
        del _FRAGMENTED[key]
        ended.set_result(None)


def _masked_fragment(
    piece: memoryview, opcode: int, fin: bool, mask: int
) -> tuple[bytes, bytearray]:
    key = _MASK_KEY(mask)
    body = bytearray(piece)
    websocket_mask(key, body)
    return _frame_head((0x80 if fin else 0) | opcode, True, len(piece)) + key, body


def _frame_head(first: int, masked: bool, length: int) -> bytes:
    """A frame's first byte (FIN and opcode), then its mask bit and length, packed by length
    (RFC 6455 5.2); the mask key, if any, follows it."""
    flag = 0x80 if masked else 0
    if length < 126:
        return _HEAD_SHORT(first, flag | length)
    if length < 65536:
        return _HEAD_MEDIUM(first, flag | 126, length)
    return _HEAD_LONG(first, flag | 127, length)


def paused(ws: Any) -> bool:
    """Whether ``ws``'s transport is past its high-water mark: its peer reads too slowly."""
    writer = ws._writer
    return writer is not None and writer.protocol.writing_paused


async def drained(ws: Any) -> None:
    """Until ``ws``'s transport is below its low-water mark (at once if it is)."""
    writer = ws._writer
    if writer is not None and writer.protocol.writing_paused:
        await _drain(writer.protocol)


async def _drain(protocol: Any) -> None:
    """``protocol._drain_helper()``, waited for alone. aiohttp's waiters share one future:
    a close that timed out waiting for the drain cancelled it, and so every other waiter
    (the upstream pump, whose session was then torn down unsettled, its response unbilled).
    A cancellation that is not this task's is taken as the end of that wait."""
    while protocol.writing_paused and protocol.transport is not None:
        try:
            await protocol._drain_helper()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # this task's own cancellation
            waiter = protocol._drain_waiter
            if waiter is not None and waiter.done():
                protocol._drain_waiter = None  # another waiter's: wait again, on a new future
    if protocol.transport is None:
        raise ClientConnectionResetError("Connection lost")


def forget_error(ws: Any) -> None:
    """Drop the error aiohttp keeps on a closed socket (``exception()``): its traceback holds
    the socket's own frames, so a connection that broke (a client that vanished) would be a
    reference cycle, left to the cycle collector with everything the socket holds."""
    ws._exception = None


# One call per frame in C (relay/session/_accel.c) where it was built; `_text_frame` is the
# reference its tests hold it to (tests/unit/test_accel.py), and what runs without it.
try:
    from relay.session._accel import MessageBudget as MessageBudget
    from relay.session._accel import Splitter as Splitter
    from relay.session._accel import text_frame

    _Splitter: type[Splitter] | None = Splitter
    BUDGET_ENFORCED = True
except ImportError:  # pragma: no cover
    text_frame = _text_frame
    _Splitter = None
    BUDGET_ENFORCED = False

    class MessageBudget:  # type: ignore[no-redef]
        """What stands for `_accel.MessageBudget` where nothing is split: it counts nothing."""

        def __init__(
            self, limit: int, small: int = 65536, parent: MessageBudget | None = None
        ) -> None:
            self.limit, self.small, self.parent = limit, small, parent
            self.held = 0
