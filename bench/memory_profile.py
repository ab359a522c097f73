"""Where an idle session's memory goes, in KiB per session.

Starts the echo upstream (`bench/upstream.py`) and the relay with the bench config (auth,
session defaults and rules, metrics, JSON logs), each in its own process, so only the relay
is measured. This driver is the client. It opens and closes ``--warm-up`` sessions (what
the first sessions load, once, is not per-session), takes the baseline, opens ``--sessions``
sessions, sends ``--frames`` 20 ms appends on each and waits for their echoes, lets the
relay go quiet, and measures again. Two relay runs:

1. **RSS**, without tracemalloc: VmRSS (and its anonymous part) after minus before, over
   the sessions. This is the figure `make bench`'s idle scenario reports.
2. **Where** (``--frames-per-trace`` frames per tracemalloc traceback, default 25, run
   through `bench/memory_probe.py` inside the relay): the tracemalloc growth grouped by
   traceback, each group named by its innermost frames in the relay and in a library; and
   a census of what each live `Bridge` reaches (`sys.getsizeof` over the objects made
   since the baseline) by part: meter, aiohttp sockets, readers, writers, tasks and their
   coroutine frames, contexts, request, transports.

Run: ``.venv/bin/python -m bench.memory_profile [--sessions 200] [--top 25]``.
``--large MIB`` instead measures one large append per session (``--sessions`` of them, 1
by default there, 3 rounds): the relay's peak RSS growth while each is forwarded. With
more sessions their events overlap by chance, and the peak over the sessions is noise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import secrets
import signal
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

from bench.paths import Endpoint, RelayPath
from bench.run import start_upstream
from bench.setup_profile import quiet_cpu_seconds
from bench.wsframes import (
    HEAD_END,
    OP_CLOSE,
    OP_TEXT,
    FrameReader,
    client_frame,
    close_payload,
    upgrade_request,
)

KIB = 1024
MIB = 1024 * 1024
_CREATED = b'{"type":"session.created"'
_DELTA = b'{"type":"response.output_audio.delta"'
# 20 ms of 24 kHz PCM16.
_AUDIO_20MS = 960
_PROBE = "import sys\nimport bench.memory_probe as probe\nprobe.install()\n"
_MAIN = "from relay.cli import main\nsys.exit(main())\n"
_WAIT_S = 30.0
_REPO = str(Path(__file__).resolve().parent.parent)
T = TypeVar("T")


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop (as the bench's peers run) and return its result."""
    import uvloop

    return uvloop.run(main)


class ProbedRelay(RelayPath):
    """`relay serve` with `bench.memory_probe` installed first."""

    def command(self, config: Path, port: int) -> list[str]:
        head = [sys.executable, "-c", _PROBE + _MAIN]
        return [*head, "serve", "--config", str(config), "--port", str(port), *self.extra_args]


def memory_kib(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon and VmHWM of a process, in KiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "VmHWM"):
            found[name] = float(value.split()[0])
    return found


class Client:
    """One session as the bench's load generator opens it: raw frames on a stream."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.frames = FrameReader(masked=False)
        self.pending: list[tuple[int, bytes]] = []

    async def open(self) -> None:
        ep = self.endpoint
        self.reader, self.writer = await asyncio.open_connection(ep.host, ep.port, limit=2**27)
        self.writer.write(upgrade_request(ep.host, ep.port, ep.path, ep.headers))
        head = await self.reader.readuntil(HEAD_END)
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        await self.expect(_CREATED)

    async def expect(self, prefix: bytes) -> bytes:
        assert self.reader is not None
        while True:
            while self.pending:
                opcode, payload = self.pending.pop(0)
                if opcode == OP_CLOSE:
                    raise RuntimeError(f"closed: {payload[2:]!r}")
                if opcode == OP_TEXT and payload.startswith(prefix):
                    return payload
            data = await self.reader.read(1 << 20)
            if not data:
                raise RuntimeError("connection closed")
            self.pending += self.frames.feed(data)

    async def echo(self, audio: bytes) -> None:
        """One append, and its echo."""
        assert self.writer is not None
        # The echo upstream answers appends that carry an event_id (before the audio).
        event = (
            b'{"type":"input_audio_buffer.append","event_id":"m1","audio":"'
            + base64.b64encode(audio)
            + b'"}'
        )
        self.writer.write(client_frame(OP_TEXT, event))
        await self.expect(_DELTA)

    async def close(self) -> None:
        if self.writer is None:
            return
        self.writer.write(client_frame(OP_CLOSE, close_payload(1000)))
        try:
            await asyncio.wait_for(self.expect(b"\x00never"), 5.0)
        except (RuntimeError, TimeoutError):
            pass
        self.writer.close()


_UPDATE = client_frame(
    OP_TEXT, b'{"type":"session.update","session":{"type":"realtime","instructions":"Be brief."}}'
)


async def open_sessions(
    endpoint: Endpoint, count: int, frames: int, audio: bytes, update: bool = False
) -> list[Client]:
    limit = asyncio.Semaphore(16)

    async def one() -> Client:
        async with limit:
            client = Client(endpoint)
            await client.open()
            if update:  # as most clients do first
                assert client.writer is not None
                client.writer.write(_UPDATE)
                await client.expect(b'{"type":"session.updated"')
            for _ in range(frames):
                await client.echo(audio)
            return client

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def close_sessions(clients: Sequence[Client]) -> None:
    await asyncio.gather(*(c.close() for c in clients))


async def signal_probe(pid: int, sig: int, out: Path, name: str) -> None:
    os.kill(pid, sig)
    done = out / f"{name}.done"
    deadline = time.monotonic() + _WAIT_S * 4
    while not done.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the probe did not write {done}")
        await asyncio.sleep(0.1)
    error = out / f"{name}.error"
    if error.exists():
        raise RuntimeError(f"probe: {error.read_text()}")


@dataclass(slots=True)
class Run:
    sessions: int
    before: dict[str, float]
    after: dict[str, float]

    def per_session(self, field: str) -> float:
        return (self.after[field] - self.before[field]) / self.sessions


def one_run(
    upstream: Endpoint, key: str, work: Path, args: argparse.Namespace, trace_frames: int
) -> Run:
    """Start a relay, open the sessions, measure; with ``trace_frames``, snapshots too."""
    work.mkdir(parents=True, exist_ok=True)
    os.environ["BENCH_PROBE_DIR"] = str(work)
    os.environ["BENCH_TRACEMALLOC"] = str(trace_frames)
    relay = ProbedRelay("relay", key, extra_args=args.relay_args.split())
    endpoint = relay.start(upstream, work)
    pid = relay.pids()[0]
    audio = random.Random(7).randbytes(_AUDIO_20MS)
    try:

        async def measure() -> Run:
            warm = await open_sessions(endpoint, args.warm_up, args.frames, audio)
            await close_sessions(warm)
            await quiet_cpu_seconds(pid)
            await signal_probe(pid, signal.SIGUSR1, work, "baseline")
            await quiet_cpu_seconds(pid)
            before = memory_kib(pid)
            clients = await open_sessions(
                endpoint, args.sessions, args.frames, audio, args.session_update
            )
            await quiet_cpu_seconds(pid)
            after = memory_kib(pid)
            if trace_frames:
                await signal_probe(pid, signal.SIGUSR2, work, "sessions")
            await close_sessions(clients)
            return Run(args.sessions, before, after)

        return run_loop(measure())
    finally:
        relay.stop()


def large_run(upstream: Endpoint, key: str, work: Path, args: argparse.Namespace) -> None:
    """Peak RSS growth per session while one large append per session is echoed."""
    work.mkdir(parents=True, exist_ok=True)
    os.environ["BENCH_TRACEMALLOC"] = "0"
    os.environ["BENCH_PROBE_DIR"] = str(work)
    relay = ProbedRelay("relay", key, extra_args=args.relay_args.split())
    endpoint = relay.start(upstream, work)
    pid = relay.pids()[0]
    audio = random.Random(7).randbytes(args.large * MIB // 4 * 3)
    try:

        async def measure() -> tuple[dict[str, float], dict[str, float], float]:
            clients = await open_sessions(endpoint, args.sessions, 0, audio)
            await quiet_cpu_seconds(pid)
            before = memory_kib(pid)
            peak = before["VmRSS"]
            done = asyncio.Event()

            async def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, memory_kib(pid)["VmRSS"])
                    await asyncio.sleep(0.005)

            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(sample())
                for _ in range(args.rounds):
                    await asyncio.gather(*(c.echo(audio) for c in clients))
                done.set()
            after = memory_kib(pid)
            await close_sessions(clients)
            return before, after, peak

        before, after, peak = run_loop(measure())
    finally:
        relay.stop()
    n = args.sessions
    print(
        f"large {args.large} MiB x {n} sessions, {args.rounds} rounds: peak RSS growth "
        f"{(peak - before['VmRSS']) / KIB / n:.1f} MiB/session, VmHWM growth "
        f"{(after['VmHWM'] - before['VmRSS']) / KIB / n:.1f} MiB/session, RSS after "
        f"{(after['VmRSS'] - before['VmRSS']) / KIB / n:.1f} MiB/session"
    )


# --- the report -----------------------------------------------------------------------------


def _where(frames: Sequence[tracemalloc.Frame]) -> tuple[str, str]:
    """The innermost frame in the relay's code, and the innermost outside it and outside the
    standard library's plumbing, of a traceback (innermost last)."""
    ours = lib = ""
    for frame in reversed(frames):
        name = frame.filename
        short = _short(name)
        if not ours and "/relay/" in name and "site-packages" not in name:
            ours = f"{short}:{frame.lineno}"
        if not lib and "/relay/" not in name.replace("site-packages", ""):
            lib = f"{short}:{frame.lineno}"
        if ours and lib:
            break
    return ours or "-", lib or "-"


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/lib/python3", _REPO + "/"):
        if marker in filename:
            tail = filename.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3" else tail
    return filename


# Areas by the innermost frame of an allocation (first match wins).
_AREAS = (
    ("aiohttp/web_", "aiohttp server: request, protocol, WebSocketResponse"),
    ("aiohttp/_websocket/", "aiohttp WebSocket reader and writer"),
    ("aiohttp/", "aiohttp client: upstream handshake, ClientWebSocketResponse"),
    ("asyncio/runners.py", "loop callbacks: transports, futures (C)"),
    ("asyncio/", "asyncio: tasks, task group, waits"),
    ("_weakrefset.py", "asyncio: tasks, task group, waits"),
    ("structlog/", "structlog: bound context"),
    ("relay/session/codec.py", "relay: session in force (parsed)"),
    ("relay/ops/metrics.py", "relay: meter"),
    ("relay/session/frames.py", "aiohttp WebSocket reader and writer"),
    ("relay/", "relay: bridge, handlers, set-up"),
)


def _area(filename: str) -> str:
    for marker, area in _AREAS:
        if marker in filename:
            return area
    return "other"


def trace_report(work: Path, sessions: int, top: int, detail: int = 0) -> str:
    snapshot = tracemalloc.Snapshot.load(str(work / "sessions.snap"))
    snapshot = snapshot.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    stats = snapshot.statistics("traceback")
    total = sum(s.size for s in stats)
    lines = [
        "allocated since the baseline and alive (tracemalloc): "
        f"{total / KIB / sessions:.2f} KiB/session "
        f"({sum(s.count for s in stats) / sessions:.1f} blocks/session)",
        "",
        "KiB/sess  by area (the allocation's innermost frame)",
    ]
    areas: dict[str, int] = {}
    for stat in snapshot.statistics("lineno"):
        area = _area(stat.traceback[0].filename)
        areas[area] = areas.get(area, 0) + stat.size
    for area, size in sorted(areas.items(), key=lambda kv: -kv[1]):
        lines.append(f"{size / KIB / sessions:8.2f}  {area}")
    lines += ["", f"{'KiB/sess':>8} {'blocks':>6}  innermost relay frame -> innermost other frame"]
    by_place: dict[tuple[str, str], list[int]] = {}
    for stat in stats:
        place = _where(stat.traceback)
        tally = by_place.setdefault(place, [0, 0])
        tally[0] += stat.size
        tally[1] += stat.count
    ranked = sorted(by_place.items(), key=lambda item: -item[1][0])
    for (ours, lib), (size, count) in ranked[:top]:
        lines.append(f"{size / KIB / sessions:8.2f} {count / sessions:6.1f}  {ours} -> {lib}")
    rest = sum(size for _, (size, _) in ranked[top:])
    lines.append(f"{rest / KIB / sessions:8.2f}         (the other {len(ranked) - top} places)")
    for stat in stats[:detail]:
        lines += ["", f"{stat.size / KIB / sessions:.2f} KiB/session, {stat.count} blocks:"]
        lines += [f"  {_short(f.filename)}:{f.lineno}" for f in stat.traceback[-12:]]
    return "\n".join(lines)


def census_report(work: Path) -> str:
    census = orjson.loads((work / "census.json").read_bytes())
    n = max(1, census["bridges"])
    lines = [
        f"census of {census['bridges']} live sessions (sys.getsizeof of objects made since "
        "the baseline, each counted once, in this order):",
        f"{'KiB/sess':>8}  part: most common types",
    ]
    total = 0
    for name, size in census["bytes"].items():
        total += size
        types = sorted(census["types"].get(name, {}).items(), key=lambda kv: -kv[1])[:5]
        shown = ", ".join(f"{kind} {count / n:g}" for kind, count in types)
        lines.append(f"{size / KIB / n:8.2f}  {name}: {shown}")
    lines.append(f"{total / KIB / n:8.2f}  total reachable from the sessions' bridges")
    lines.append("objects of 1 KiB and more, per session:")
    for where, count in sorted(census["large"].items(), key=lambda kv: -kv[1]):
        lines.append(f"{count / n:8.2f}  {where}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_profile", description=__doc__)
    parser.add_argument("--sessions", type=int, default=None, help="sessions measured")
    parser.add_argument("--warm-up", type=int, default=20, help="sessions before the baseline")
    parser.add_argument("--frames", type=int, default=1, help="20 ms appends echoed per session")
    parser.add_argument(
        "--session-update", action="store_true", help="each session sends a session.update first"
    )
    parser.add_argument("--top", type=int, default=25, help="tracemalloc places shown")
    parser.add_argument("--frames-per-trace", type=int, default=25)
    parser.add_argument("--detail", type=int, default=0, help="full tracebacks of the N largest")
    parser.add_argument("--keep", type=Path, help="keep the snapshots and logs in this directory")
    parser.add_argument("--no-trace", action="store_true", help="only the RSS run")
    parser.add_argument("--large", type=int, default=0, help="MiB: the large-event run instead")
    parser.add_argument("--rounds", type=int, default=3, help="large events per session")
    parser.add_argument("--relay-args", default="", help="extra arguments for `relay serve`")
    args = parser.parse_args(argv)
    if args.sessions is None:
        args.sessions = 1 if args.large else 200
    with tempfile.TemporaryDirectory(prefix="relay-memory-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        key = "bench-upstream-" + secrets.token_hex(8)
        upstream_child, upstream = start_upstream(work, key)
        try:
            if args.large:
                large_run(upstream, key, work / "large", args)
                return 0
            rss = one_run(upstream, key, work / "rss", args, 0)
            print(
                f"RSS: {rss.per_session('VmRSS'):.1f} KiB/session "
                f"(anonymous {rss.per_session('RssAnon'):.1f}) over {args.sessions} sessions, "
                f"idle RSS {rss.before['VmRSS'] / KIB:.1f} MiB after {args.warm_up} warm-up "
                "sessions"
            )
            if not args.no_trace:
                traced = one_run(upstream, key, work / "trace", args, args.frames_per_trace)
                print(f"(under tracemalloc: {traced.per_session('VmRSS'):.1f} KiB/session RSS)")
                print()
                print(trace_report(work / "trace", args.sessions, args.top, args.detail))
                print()
                print(census_report(work / "trace"))
        finally:
            upstream_child.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
