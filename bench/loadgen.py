"""The load generator: many concurrent voice sessions against one WebSocket URL.

Runs in a process of its own (several of them when one cannot drive every session), on
uvloop where installed. The orchestrator (`bench.run`) talks to it over stdin/stdout:

1. it connects every session (upgrade, then the `session.created` the server sends first)
   and prints ``READY <connected> <failed>``;
2. it waits for ``GO <t0>`` (a `time.monotonic_ns()` instant: CLOCK_MONOTONIC is shared by
   every process of the machine), then streams `input_audio_buffer.append` events from t0;
3. after t0 + warm-up + duration it stops sending, waits for the last echoes, closes the
   sessions, writes its results and prints ``DONE``.

Each append carries its send time in its `event_id` (``t<ns>-<seq>``), a field the relay
never reads; the echo upstream copies it into the delta's `response_id`, so the round trip
of every frame is measured without any clock but this process's.

Two ways to send:
- ``paced``: one frame every ``interval_s`` per session, at absolute deadlines
  (t0 + phase + k * interval, never "sleep interval"), so timer resolution and scheduling
  delays never accumulate (perf note 9). How late each frame left is recorded too: a
  generator that falls behind its own schedule invalidates the run, and the report says so.
- ``closed``: ``window`` frames in flight per session, the next sent as soon as an echo
  arrives: as fast as the path allows (saturation and large-frame scenarios).
- ``setup``: ``sessions`` connectors, each opening a session (upgrade, then the
  `session.created` the server sends first), closing it, and opening the next, from t0 until
  the window's end. Instead of round trips it records each set-up's duration, from before
  the TCP connect to `session.created`, for the set-ups started in the window; it counts
  those completed in the window (``received_window``) and those that failed.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import sys
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import orjson

from bench.upstream import run as run_loop
from bench.wsframes import (
    HEAD_END,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    ProtocolError,
    accept_key,
    client_frame,
    close_payload,
    new_client_key,
    parse_head,
)

_APPEND_HEAD = b'{"type":"input_audio_buffer.append","event_id":"t'
# The echo, in the GA name or (through a translating relay) the preview one; compact as the
# upstream writes it, or re-serialized with Python's json.dumps spacing (LiteLLM).
_DELTAS = (
    b'{"type":"response.output_audio.delta"',
    b'{"type":"response.audio.delta"',
    b'{"type": "response.output_audio.delta"',
    b'{"type": "response.audio.delta"',
)
_RESPONSE_ID = b'"response_id":'
_CREATED = b'"session.created"'
_ERROR = (b'{"type":"error"', b'{"type": "error"')


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What one generator process does; written by the orchestrator as JSON."""

    host: str
    port: int
    path: str
    headers: dict[str, str]
    sessions: int
    mode: Literal["paced", "closed", "setup"]
    # paced: seconds between frames of a session.
    interval_s: float
    # closed: frames in flight per session.
    window: int
    # Decoded audio bytes per append (960 = 20 ms of 24 kHz PCM16, 1280 base64 chars).
    audio_bytes: int
    warmup_s: float
    duration_s: float
    result_path: str
    samples_path: str
    drain_s: float = 2.0
    connect_concurrency: int = 32
    connect_timeout_s: float = 60.0
    go_timeout_s: float = 120.0
    seed: int = 0


@dataclass(slots=True)
class Clock:
    """The run's instants, in `time.monotonic_ns()` units, and the loop-time offset."""

    loop: asyncio.AbstractEventLoop
    interval_ns: int
    start: int = 0
    window_start: int = 0
    window_end: int = 0
    offset: float = 0.0

    def begin(self, t0: int, warmup_s: float, duration_s: float) -> None:
        self.start = t0
        self.window_start = t0 + int(warmup_s * 1e9)
        self.window_end = self.window_start + int(duration_s * 1e9)
        self.offset = self.loop.time() - time.monotonic()

    def call_at_ns(self, when: int, callback: Any) -> None:
        self.loop.call_at(when / 1e9 + self.offset, callback)


@dataclass(slots=True)
class Totals:
    """Counts across the sessions of this process."""

    error_events: int = 0
    other_events: int = 0
    unmatched_echoes: int = 0
    # Frames sent and not echoed yet, over live sessions; `drained` is set when it reaches
    # 0 after the window.
    outstanding: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    connect_errors: dict[str, int] = field(default_factory=dict)

    def echoed(self, after_window: bool) -> None:
        self.outstanding -= 1
        if after_window and self.outstanding <= 0:
            self.drained.set()

    def connect_failed(self, reason: str) -> None:
        self.connect_errors[reason] = self.connect_errors.get(reason, 0) + 1


class Session(asyncio.Protocol):
    """One voice session: handshake, then appends out and deltas in, on bare callbacks."""

    def __init__(self, spec: LoadSpec, clock: Clock, totals: Totals, tail: bytes) -> None:
        self.spec = spec
        self.clock = clock
        self.totals = totals
        # The append after its event_id: `","audio":"<base64>"}`.
        self.tail = tail
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.reader = FrameReader(masked=False)
        loop = clock.loop
        self.upgraded: asyncio.Future[None] = loop.create_future()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.gone: asyncio.Future[None] = loop.create_future()
        self.key = b""
        self.closing = False
        self.lost = False
        self.seq = 0
        self.next_due = 0
        self.outstanding = 0
        self.sent_window = 0
        self.received_window = 0
        self.sent_total = 0
        self.received_total = 0
        self.late_frames = 0
        self.max_late = 0
        self.rtts: array[int] = array("q")
        # The send instant of each round trip in `rtts`, in the same order: lets the
        # orchestrator split a long window by time (the soak's minutes and 10 s samples).
        self.sent_at: array[int] = array("q")

    # --- connection -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        spec = self.spec
        self.key = new_client_key()
        extra = "".join(f"{name}: {value}\r\n" for name, value in spec.headers.items())
        self.transport.write(
            (
                f"GET {spec.path} HTTP/1.1\r\nHost: {spec.host}:{spec.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {self.key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
                f"{extra}\r\n"
            ).encode("latin-1")
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.lost = True
        # Echoes that will never come: no longer awaited by the drain.
        self.totals.outstanding -= self.outstanding
        self.outstanding = 0
        for future in (self.upgraded, self.ready):
            if not future.done():
                future.set_exception(ConnectionError("closed during the handshake"))
        if not self.gone.done():
            self.gone.set_result(None)

    def data_received(self, data: bytes) -> None:
        if not self.upgraded.done():
            data = self._handshake(data)
            if not data:
                return
        try:
            messages = self.reader.feed(data)
        except ProtocolError:
            self.abort()
            return
        for opcode, payload in messages:
            if opcode == OP_TEXT:
                if payload.startswith(_DELTAS):
                    self._echoed(payload)
                else:
                    self._other(payload)
            elif opcode == OP_PING:
                self._write(client_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                if not self.closing:
                    self.closing = True
                    self._write(client_frame(OP_CLOSE, payload[:2]))
                elif self.transport is not None:
                    self.transport.close()  # our close answered: the handshake is over

    def _handshake(self, data: bytes) -> bytes:
        self.head += data
        end = self.head.find(HEAD_END)
        if end == -1:
            return b""
        line, headers = parse_head(bytes(self.head[:end]))
        rest = bytes(self.head[end + len(HEAD_END) :])
        self.head = bytearray()
        status = line.split(" ", 2)[1] if line.count(" ") else "?"
        if status != "101":
            self.upgraded.set_exception(ConnectionError(f"HTTP {status}"))
            self.abort()
            return b""
        if headers.get("sec-websocket-accept", "").encode() != accept_key(self.key):
            self.upgraded.set_exception(ConnectionError("bad Sec-WebSocket-Accept"))
            self.abort()
            return b""
        self.upgraded.set_result(None)
        return rest

    def _other(self, payload: bytes) -> None:
        if _CREATED in payload[:64]:
            if not self.ready.done():
                self.ready.set_result(None)
        elif payload.startswith(_ERROR):
            self.totals.error_events += 1
        else:
            self.totals.other_events += 1

    # --- frames -----------------------------------------------------------------------------

    def _echoed(self, payload: bytes) -> None:
        now = time.monotonic_ns()
        at = payload.find(_RESPONSE_ID, 0, 256)
        if at != -1:
            at += len(_RESPONSE_ID)
            at += 3 if payload.startswith(b' "t', at) else 2 if payload.startswith(b'"t', at) else 0
        dash = payload.find(b"-", at) if at != -1 else -1
        if dash == -1 or not payload[at:dash].isdigit():
            self.totals.unmatched_echoes += 1
            return
        sent = int(payload[at:dash])
        clock = self.clock
        self.outstanding -= 1
        self.totals.echoed(now >= clock.window_end)
        self.received_total += 1
        if clock.window_start <= now < clock.window_end:
            self.received_window += 1
        if clock.window_start <= sent < clock.window_end:
            self.rtts.append(now - sent)
            self.sent_at.append(sent)
        if self.spec.mode == "closed" and now < clock.window_end and not self.closing:
            self._send(now)

    def _send(self, now: int) -> None:
        self.seq += 1
        self._write(client_frame(OP_TEXT, b"%b%d-%d%b" % (_APPEND_HEAD, now, self.seq, self.tail)))
        self.outstanding += 1
        self.totals.outstanding += 1
        self.sent_total += 1
        if self.clock.window_start <= now < self.clock.window_end:
            self.sent_window += 1

    def _write(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def start_burst(self, phase_ns: int) -> None:
        """closed: put ``window`` frames in flight at t0 + phase; echoes send the rest."""
        self.clock.call_at_ns(self.clock.start + phase_ns, self._burst)

    def _burst(self) -> None:
        now = time.monotonic_ns()
        for _ in range(self.spec.window):
            self._send(now)

    def send_due(self) -> None:
        """paced: send the frame due at ``next_due`` (the Pacer calls this when it is due)."""
        clock = self.clock
        due = self.next_due
        self.next_due = due + clock.interval_ns
        if self.closing or self.lost:
            return
        now = time.monotonic_ns()
        if due >= clock.window_start:
            late = now - due
            if late > self.max_late:
                self.max_late = late
            if late > clock.interval_ns:
                self.late_frames += 1
        self._send(now)

    # --- ending -------------------------------------------------------------------------------

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self._write(client_frame(OP_CLOSE, close_payload(1000, b"bench done")))

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def summary(self) -> list[int]:
        """[sent in window, echoed, rtt p99 ns, max lateness ns, late frames, lost]."""
        rtts = sorted(self.rtts)
        p99 = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] if rtts else -1
        return [
            self.sent_window,
            len(rtts),
            p99,
            self.max_late,
            self.late_frames,
            int(self.lost),
        ]


class Pacer:
    """Sends every session's frames at their absolute deadlines, from one timer.

    Session k's frames are due at t0 + phase_k + i * interval. Sorted by phase, the sessions
    stay in due order for the whole run (each send moves its session one interval on, past
    every other), so a cursor walking them in a circle always points at the next frame
    due. One timer per tick instead of one per frame keeps the generator cheap.
    """

    # Frames sent per callback before yielding to the loop, so echoes are read meanwhile.
    BATCH = 64
    # Frames due this soon are sent now: uvloop's timers have 1 ms resolution, and a timer
    # for less fires at once, which would spin the loop until the deadline.
    EARLY_NS = 1_000_000

    def __init__(self, clock: Clock, sessions: list[Session], phases: list[int]) -> None:
        self.clock = clock
        order = sorted(zip(phases, range(len(sessions)), strict=True))
        self.sessions = [sessions[i] for _, i in order]
        for phase, i in order:
            sessions[i].next_due = clock.start + phase
        self.cursor = 0

    def start(self) -> None:
        if self.sessions:
            self.clock.call_at_ns(self.sessions[0].next_due, self.tick)

    def tick(self) -> None:
        sessions, clock = self.sessions, self.clock
        count, cursor = len(sessions), self.cursor
        now = time.monotonic_ns()
        for _ in range(self.BATCH):
            session = sessions[cursor]
            if session.next_due > now + self.EARLY_NS:
                break
            if session.next_due >= clock.window_end:
                return  # the earliest frame due is past the end: every session is done
            session.send_due()
            cursor = (cursor + 1) % count
        else:
            self.cursor = cursor
            clock.loop.call_soon(self.tick)  # behind schedule: catch up, reading between
            return
        self.cursor = cursor
        if sessions[cursor].next_due < clock.window_end:
            clock.call_at_ns(sessions[cursor].next_due, self.tick)


def send_times_path(samples_path: str) -> str:
    """Where the send instants of the round trips in ``samples_path`` are written."""
    return samples_path + ".sent"


def _tail(audio_bytes: int, seed: int) -> bytes:
    audio = random.Random(seed).randbytes(audio_bytes)
    return b'","audio":"' + base64.b64encode(audio) + b'"}'


async def _connect(
    session: Session, spec: LoadSpec, limit: asyncio.Semaphore, totals: Totals
) -> bool:
    async with limit:
        return await _open(session, spec, totals)


async def _open(session: Session, spec: LoadSpec, totals: Totals) -> bool:
    """Connect, upgrade and wait for `session.created`; False (counted) if that failed."""
    loop = asyncio.get_running_loop()
    try:
        await loop.create_connection(lambda: session, spec.host, spec.port)
        await session.upgraded
        await session.ready
    except (OSError, ConnectionError) as exc:
        totals.connect_failed(str(exc) or type(exc).__name__)
        session.abort()
        return False
    return True


# A set-up that takes longer than this is counted as failed; a close as long is cut short.
SETUP_TIMEOUT_S = 5.0


@dataclass(slots=True)
class SetupTally:
    """What the connectors of the set-up mode saw."""

    started_window: int = 0
    completed_window: int = 0
    durations: array[int] = field(default_factory=lambda: array("q"))
    started_at: array[int] = field(default_factory=lambda: array("q"))


async def _connector(spec: LoadSpec, clock: Clock, totals: Totals, tally: SetupTally) -> None:
    """Open, close, open again, until the window's end (the set-up mode)."""
    while True:
        began = time.monotonic_ns()
        if began >= clock.window_end:
            return
        in_window = began >= clock.window_start
        tally.started_window += in_window
        session = Session(spec, clock, totals, b"")
        try:
            async with asyncio.timeout(SETUP_TIMEOUT_S):
                opened = await _open(session, spec, totals)
        except TimeoutError:
            totals.connect_failed("set-up timeout")
            session.abort()
            continue
        done = time.monotonic_ns()
        if opened:
            if clock.window_start <= done < clock.window_end:
                tally.completed_window += 1
            if in_window:
                tally.durations.append(done - began)
                tally.started_at.append(began)
            await _close_all([session], SETUP_TIMEOUT_S)


async def _connect_all(sessions: list[Session], spec: LoadSpec, totals: Totals) -> list[Session]:
    limit = asyncio.Semaphore(spec.connect_concurrency)
    results: list[asyncio.Task[bool]] = []
    try:
        async with asyncio.timeout(spec.connect_timeout_s), asyncio.TaskGroup() as tasks:
            results = [tasks.create_task(_connect(s, spec, limit, totals)) for s in sessions]
    except TimeoutError:
        totals.connect_failed("connect timeout")
    connected = []
    for session, task in zip(sessions, results, strict=True):
        if task.done() and not task.cancelled() and task.result():
            connected.append(session)
        else:
            session.abort()
    return connected


async def _read_go(seconds: float) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with asyncio.timeout(seconds):
        line = await reader.readline()
    word, _, value = line.decode().partition(" ")
    if word != "GO":
        raise SystemExit(f"loadgen: expected GO, got {line!r}")
    return int(value)


async def _sleep_until(ns: int) -> None:
    await asyncio.sleep(max(0.0, (ns - time.monotonic_ns()) / 1e9))


async def generate(spec: LoadSpec) -> dict[str, Any]:
    if spec.mode == "setup":
        return await generate_setups(spec)
    loop = asyncio.get_running_loop()
    clock = Clock(loop, int(spec.interval_s * 1e9))
    totals = Totals()
    tail = _tail(spec.audio_bytes, spec.seed)
    sessions = [Session(spec, clock, totals, tail) for _ in range(spec.sessions)]
    connected = await _connect_all(sessions, spec, totals)
    print(f"READY {len(connected)} {spec.sessions - len(connected)}", flush=True)
    clock.begin(await _read_go(spec.go_timeout_s), spec.warmup_s, spec.duration_s)
    rng = random.Random(spec.seed + 1)
    if spec.mode == "paced":
        spread = max(1, int(spec.interval_s * 1e9))
        Pacer(clock, connected, [rng.randrange(spread) for _ in connected]).start()
    else:
        for session in connected:
            session.start_burst(rng.randrange(10_000_000))
    await _sleep_until(clock.window_start)
    cpu_start = os.times()
    await _sleep_until(clock.window_end)
    cpu_end = os.times()
    cpu_window = (cpu_end.user - cpu_start.user, cpu_end.system - cpu_start.system)
    if totals.outstanding > 0:
        try:
            async with asyncio.timeout(spec.drain_s):
                await totals.drained.wait()
        except TimeoutError:
            pass
    await _close_all(connected)
    return _results(spec, connected, totals, cpu_window)


async def generate_setups(spec: LoadSpec) -> dict[str, Any]:
    """The set-up mode: ``spec.sessions`` connectors from t0 to the window's end."""
    clock = Clock(asyncio.get_running_loop(), int(spec.interval_s * 1e9))
    totals = Totals()
    tally = SetupTally()
    print(f"READY {spec.sessions} 0", flush=True)
    clock.begin(await _read_go(spec.go_timeout_s), spec.warmup_s, spec.duration_s)
    await _sleep_until(clock.start)
    async with asyncio.TaskGroup() as tasks:
        for _ in range(spec.sessions):
            tasks.create_task(_connector(spec, clock, totals, tally))
        await _sleep_until(clock.window_start)
        cpu_start = os.times()
        await _sleep_until(clock.window_end)
        cpu_end = os.times()
    cpu_window = (cpu_end.user - cpu_start.user, cpu_end.system - cpu_start.system)
    return _setup_results(spec, totals, tally, cpu_window)


def _setup_results(
    spec: LoadSpec, totals: Totals, tally: SetupTally, cpu_window: tuple[float, float]
) -> dict[str, Any]:
    Path(spec.samples_path).write_bytes(tally.durations.tobytes())
    Path(send_times_path(spec.samples_path)).write_bytes(tally.started_at.tobytes())
    return {
        "requested": spec.sessions,
        "connected": spec.sessions,
        "connect_errors": totals.connect_errors,
        "error_events": totals.error_events,
        "other_events": totals.other_events,
        "unmatched_echoes": totals.unmatched_echoes,
        "sent_window": tally.started_window,
        "received_window": tally.completed_window,
        "sent_total": tally.started_window,
        "received_total": len(tally.durations),
        "cpu_window_user_s": cpu_window[0],
        "cpu_window_system_s": cpu_window[1],
        "sessions": [],
    }


async def _close_all(sessions: list[Session], timeout_s: float = 2.0) -> None:
    for session in sessions:
        session.close()
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(s.gone for s in sessions))
    except TimeoutError:
        pass
    for session in sessions:
        session.abort()


def _results(
    spec: LoadSpec, sessions: list[Session], totals: Totals, cpu_window: tuple[float, float]
) -> dict[str, Any]:
    samples: array[int] = array("q")
    sent_at: array[int] = array("q")
    for session in sessions:
        samples.extend(session.rtts)
        sent_at.extend(session.sent_at)
    Path(spec.samples_path).write_bytes(samples.tobytes())
    Path(send_times_path(spec.samples_path)).write_bytes(sent_at.tobytes())
    return {
        "requested": spec.sessions,
        "connected": len(sessions),
        "connect_errors": totals.connect_errors,
        "error_events": totals.error_events,
        "other_events": totals.other_events,
        "unmatched_echoes": totals.unmatched_echoes,
        "sent_window": sum(s.sent_window for s in sessions),
        "received_window": sum(s.received_window for s in sessions),
        "sent_total": sum(s.sent_total for s in sessions),
        "received_total": sum(s.received_total for s in sessions),
        "cpu_window_user_s": cpu_window[0],
        "cpu_window_system_s": cpu_window[1],
        "sessions": [s.summary() for s in sessions],
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.loadgen SPEC.json", file=sys.stderr)
        return 2
    spec = LoadSpec(**orjson.loads(Path(args[0]).read_bytes()))
    results: dict[str, Any] = {}

    async def go() -> None:
        results.update(await generate(spec))

    run_loop(go())
    Path(spec.result_path).write_bytes(orjson.dumps(results))
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
