"""Session set-up cost: connect, wait for `session.created`, close; over and over.

Starts the echo upstream (`bench/upstream.py`) and the relay with the bench config (auth,
session defaults and rules, metrics all on), warms the relay up, then for each connector
count runs ``--sessions`` set-ups, each connector one session at a time: upgrade request,
the relay's `session.created`, a close (1000) and the relay's close reply. Reported:

- sessions per second (all set-ups over the wall time of the run, teardown included);
- p50 / p99 of connect -> `session.created` (TCP connect included), in ms;
- the relay process's CPU per session (set-up and teardown), from /proc/<pid>/stat, read
  once the relay has gone quiet after the last close;
- this driver's own CPU per session, to show it is not the bottleneck.

``--repeat N`` starts a fresh relay for each run and prints the median of each figure.
``--profile FILE`` also records the relay with py-spy (folded stacks) through one run at
the first connector count, and prints `bench.profile`'s summary of it.

Run: ``.venv/bin/python -m bench.setup_profile [--sessions 2000] [--connectors 1,16]``.
Keep connectors at or below 50: others measure on the same 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from bench.paths import Endpoint, RelayPath
from bench.profile import Recorder, format_summary, summarize
from bench.run import start_upstream
from bench.upstream import run as run_loop
from bench.wsframes import (
    HEAD_END,
    OP_CLOSE,
    OP_TEXT,
    FrameReader,
    client_frame,
    close_payload,
    upgrade_request,
)

T = TypeVar("T")
_CREATED = b'{"type":"session.created"'
MAX_CONNECTORS = 50
WARM_UP_SESSIONS = 300
# The relay is quiet when its CPU time has not moved for this long (ticks are 10 ms).
QUIET_S = 0.15
QUIET_LIMIT_S = 5.0
_TICKS = os.sysconf("SC_CLK_TCK")


def relay_cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process in seconds, from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) / _TICKS, int(fields[12]) / _TICKS


async def quiet_cpu_seconds(pid: int) -> tuple[float, float]:
    """The process's CPU time once it has stopped moving (its teardowns are done)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + QUIET_LIMIT_S
    last = relay_cpu_seconds(pid)
    while loop.time() < deadline:
        await asyncio.sleep(QUIET_S)
        now = relay_cpu_seconds(pid)
        if now == last:
            break
        last = now
    return last


class SetupFailed(Exception):
    pass


async def one_session_open(
    endpoint: Endpoint,
) -> tuple[float, asyncio.StreamWriter, asyncio.StreamReader, FrameReader]:
    """Seconds from the TCP connect to the `session.created` frame; the session left open
    (its writer, reader and frame reader)."""
    began = time.perf_counter()
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    try:
        writer.write(upgrade_request(endpoint.host, endpoint.port, endpoint.path, endpoint.headers))
        head = await reader.readuntil(HEAD_END)
        if not head.startswith(b"HTTP/1.1 101"):
            raise SetupFailed(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        frames = FrameReader(masked=False)
        while True:
            data = await reader.read(65536)
            if not data:
                raise SetupFailed("closed before session.created")
            for opcode, payload in frames.feed(data):
                if opcode == OP_TEXT and payload.startswith(_CREATED):
                    return time.perf_counter() - began, writer, reader, frames
                if opcode == OP_CLOSE:
                    raise SetupFailed(f"closed before session.created: {payload[2:]!r}")
    except BaseException:
        writer.close()
        raise


async def one_session(endpoint: Endpoint) -> float:
    """Seconds from the TCP connect to the `session.created` frame; then a clean close."""
    took, writer, reader, frames = await one_session_open(endpoint)
    try:
        writer.write(client_frame(OP_CLOSE, close_payload(1000)))
        closed = False
        while not closed:
            data = await reader.read(65536)
            if not data:
                break
            closed = any(opcode == OP_CLOSE for opcode, _ in frames.feed(data))
        return took
    finally:
        writer.close()


@dataclass(frozen=True, slots=True)
class RunResult:
    connectors: int
    sessions: int
    failed: int
    sessions_per_s: float
    p50_ms: float
    p99_ms: float
    relay_cpu_ms: float
    relay_system_ms: float
    driver_cpu_ms: float


async def run_sessions(endpoint: Endpoint, pid: int, sessions: int, connectors: int) -> RunResult:
    latencies: list[float] = []
    failures: list[str] = []
    per_connector = [
        sessions // connectors + (i < sessions % connectors) for i in range(connectors)
    ]

    async def connector(count: int) -> None:
        for _ in range(count):
            try:
                latencies.append(await one_session(endpoint))
            except (SetupFailed, OSError, asyncio.IncompleteReadError) as exc:
                failures.append(str(exc) or type(exc).__name__)

    cpu_before = await quiet_cpu_seconds(pid)
    driver_before = time.process_time()
    began = time.perf_counter()
    await asyncio.gather(*(connector(n) for n in per_connector))
    wall = time.perf_counter() - began
    driver_cpu = time.process_time() - driver_before
    cpu_after = await quiet_cpu_seconds(pid)
    if failures:
        print(f"setup_profile: {len(failures)} failed, first: {failures[0]}", file=sys.stderr)
    p50_ms, p99_ms, _ = percentiles_ms(latencies)
    return RunResult(
        connectors=connectors,
        sessions=len(latencies),
        failed=len(failures),
        sessions_per_s=len(latencies) / wall,
        p50_ms=p50_ms,
        p99_ms=p99_ms,
        relay_cpu_ms=1000 * (sum(cpu_after) - sum(cpu_before)) / max(1, len(latencies)),
        relay_system_ms=1000 * (cpu_after[1] - cpu_before[1]) / max(1, len(latencies)),
        driver_cpu_ms=1000 * driver_cpu / max(1, len(latencies)),
    )


def percentiles_ms(seconds: list[float]) -> tuple[float, float, float]:
    """p50, p99 and the largest of ``seconds``, in ms (NaN when there are none)."""
    ordered = sorted(seconds) or [float("nan")]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return 1000 * ordered[len(ordered) // 2], 1000 * p99, 1000 * ordered[-1]


def one_run(
    upstream: Endpoint,
    upstream_key: str,
    work: Path,
    args: argparse.Namespace,
    profile: Path | None,
) -> list[RunResult]:
    relay = RelayPath("relay", upstream_key, extra_args=args.relay_args.split())
    endpoint = relay.start(upstream, work)
    try:
        pid = relay.pids()[0]
        results: list[RunResult] = []

        async def measure() -> None:
            await run_sessions(endpoint, pid, WARM_UP_SESSIONS, 4)
            for index, connectors in enumerate(args.connectors):
                recorder = None
                if profile is not None and index == 0:
                    recorder = Recorder(profile, rate=args.profile_rate, native=args.native)
                    # Longer than any run (at 20 set-ups/s); interrupted when the run ends.
                    recorder([pid], args.sessions / 20 + 5)
                    await asyncio.sleep(1.0)  # py-spy attaches before the first session
                results.append(await run_sessions(endpoint, pid, args.sessions, connectors))
                if recorder is not None and recorder.proc is not None:
                    recorder.proc.send_signal(signal.SIGINT)  # py-spy writes what it has
                    recorder.wait(timeout=30)

        run_loop(measure())
        return results
    finally:
        relay.stop()


def report(runs: list[list[RunResult]]) -> str:
    lines = [
        "connectors  sessions/s   p50 ms   p99 ms   relay CPU ms/session (system)"
        "   driver CPU ms  failed"
    ]
    for column in zip(*runs, strict=True):

        def median(name: str, column: tuple[RunResult, ...] = column) -> float:
            return float(statistics.median(getattr(r, name) for r in column))

        lines.append(
            f"{column[0].connectors:>10}  {median('sessions_per_s'):>10.0f}  "
            f"{median('p50_ms'):>7.2f}  {median('p99_ms'):>7.2f}  "
            f"{median('relay_cpu_ms'):>21.3f} ({median('relay_system_ms'):.3f})  "
            f"{median('driver_cpu_ms'):>13.3f}  "
            f"{sum(r.failed for r in column):>6}"
        )
    if len(runs) > 1:
        lines.append(f"(medians of {len(runs)} runs, a fresh relay each)")
    return "\n".join(lines)


def repeated_runs(
    prefix: str,
    repeat: int,
    one: Callable[[Endpoint, str, Path, int], T],
    report: Callable[[list[T]], str],
) -> list[T]:
    """``one`` run ``repeat`` times against one echo upstream (each run starts its own
    relay), each run's report printed as it ends."""
    runs: list[T] = []
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(tmp)
        upstream_key = "bench-upstream-" + secrets.token_hex(8)
        upstream_child, upstream = start_upstream(work, upstream_key)
        try:
            print(f"load before: {os.getloadavg()[0]:.2f}", file=sys.stderr)
            for index in range(repeat):
                runs.append(one(upstream, upstream_key, work / f"run{index}", index))
                print(report(runs[-1:]), file=sys.stderr)
        finally:
            upstream_child.stop()
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.setup_profile", description=__doc__)
    parser.add_argument("--sessions", type=int, default=2000, help="set-ups per measured run")
    parser.add_argument(
        "--connectors",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1, 16],
        help="comma-separated concurrent connector counts (at most 50)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs, each with a fresh relay")
    parser.add_argument("--relay-args", default="", help="extra arguments for `relay serve`")
    parser.add_argument("--profile", type=Path, help="py-spy folded stacks of the first run")
    parser.add_argument("--profile-rate", type=int, default=250)
    parser.add_argument(
        "--native", action="store_true", help="profile native frames too (slows the relay)"
    )
    args = parser.parse_args(argv)
    if max(args.connectors) > MAX_CONNECTORS:
        parser.error(f"at most {MAX_CONNECTORS} connectors: others measure on this machine")
    runs = repeated_runs(
        "relay-setup-",
        args.repeat,
        lambda upstream, key, work, index: one_run(
            upstream, key, work, args, args.profile if index == 0 else None
        ),
        report,
    )
    print(report(runs))
    print(f"load after: {os.getloadavg()[0]:.2f}")
    if args.profile is not None and args.profile.exists():
        print(format_summary(summarize(args.profile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
