"""A reconnect storm: many clients set up sessions at once, while a live one is watched.

Starts the echo upstream (`bench/upstream.py`) and the relay with the bench config, then
``--clients`` clients connect at once (a replica restarted, its clients arriving here), each
waiting for its `session.created`; they stay open until all are set up. Meanwhile a separate
process sends `GET /healthz` on one open connection every 2 ms, and the longest round trip
it sees is how long a live session's frames would have waited for the relay's loop.

Reported (medians over ``--repeat`` runs, a fresh relay each): set-up p50, p99 and the
slowest (connect -> `session.created`), failures, and the poller's longest wait. A poller
inside this driver would count the driver's own busy loop: it runs in its own process.

Run: ``.venv/bin/python -m bench.storm [--clients 1000] [--repeat 2]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.paths import Endpoint, RelayPath
from bench.setup_profile import SetupFailed, one_session_open, percentiles_ms, repeated_runs
from bench.upstream import run as run_loop

POLL_EVERY_S = 0.002
# The poller: one keep-alive connection, a request every POLL_EVERY_S, the longest answer.
_POLLER = r"""
import signal, socket, sys, time
port, every = int(sys.argv[1]), float(sys.argv[2])
sock = socket.create_connection(("127.0.0.1", port))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
request = b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n"
longest = 0.0


def report(*_):
    print(f"{longest * 1000:.2f}", flush=True)
    sys.exit(0)


signal.signal(signal.SIGTERM, report)
print("polling", flush=True)
while True:
    began = time.perf_counter()
    sock.sendall(request)
    answer = b""
    while not (b"\r\n\r\n" in answer and answer.endswith(b"}")):
        answer += sock.recv(65536)
    longest = max(longest, time.perf_counter() - began)
    time.sleep(every)
"""


@dataclass(frozen=True, slots=True)
class StormResult:
    clients: int
    failed: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    live_wait_ms: float


async def storm(endpoint: Endpoint, clients: int) -> StormResult:
    poller = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _POLLER, str(endpoint.port), str(POLL_EVERY_S),
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert poller.stdout is not None
    await poller.stdout.readline()  # polling
    await asyncio.sleep(0.5)  # a settled floor before the storm, as the clients would find it
    opened: list[asyncio.StreamWriter] = []
    latencies: list[float] = []
    failures: list[str] = []

    async def client() -> None:
        try:
            took, writer, _, _ = await one_session_open(endpoint)
        except (SetupFailed, OSError, asyncio.IncompleteReadError) as exc:
            failures.append(str(exc) or type(exc).__name__)
            return
        latencies.append(took)
        opened.append(writer)

    try:
        await asyncio.gather(*(client() for _ in range(clients)))
        await asyncio.sleep(0.5)  # the live connection's view of the tail of the storm
    finally:
        poller.terminate()
        out, _ = await poller.communicate()
        for writer in opened:
            writer.close()
    waits = [line for line in out.decode().split() if line.replace(".", "", 1).isdigit()]
    if failures:
        print(f"storm: {len(failures)} failed, first: {failures[0]}", file=sys.stderr)
    p50_ms, p99_ms, max_ms = percentiles_ms(latencies)
    return StormResult(
        clients=clients,
        failed=len(failures),
        p50_ms=p50_ms,
        p99_ms=p99_ms,
        max_ms=max_ms,
        live_wait_ms=float(waits[-1]) if waits else float("nan"),
    )


def one_run(
    upstream: Endpoint, upstream_key: str, work: Path, args: argparse.Namespace
) -> StormResult:
    relay = RelayPath("relay", upstream_key, extra_args=args.relay_args.split())
    endpoint = relay.start(upstream, work)
    try:
        result: list[StormResult] = []

        async def measure() -> None:
            result.append(await storm(endpoint, args.clients))

        run_loop(measure())
        return result[0]
    finally:
        relay.stop()


def report(runs: list[StormResult]) -> str:
    def median(name: str) -> float:
        return float(statistics.median(getattr(r, name) for r in runs))

    lines = [
        "clients  set-up p50 ms  p99 ms  slowest ms  failed  live session's longest wait ms",
        f"{runs[0].clients:>7}  {median('p50_ms'):>13.0f}  {median('p99_ms'):>6.0f}  "
        f"{median('max_ms'):>10.0f}  {sum(r.failed for r in runs):>6}  "
        f"{median('live_wait_ms'):>30.1f}",
    ]
    if len(runs) > 1:
        waits = ", ".join(f"{r.live_wait_ms:.1f}" for r in runs)
        lines.append(f"(medians of {len(runs)} runs, a fresh relay each; longest waits: {waits})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storm", description=__doc__)
    parser.add_argument("--clients", type=int, default=1000, help="clients arriving at once")
    parser.add_argument("--repeat", type=int, default=1, help="runs, each with a fresh relay")
    parser.add_argument("--relay-args", default="", help="extra arguments for `relay serve`")
    args = parser.parse_args(argv)
    runs = repeated_runs(
        "relay-storm-",
        args.repeat,
        lambda upstream, key, work, _: one_run(upstream, key, work, args),
        report,
    )
    print(report(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
