"""The relay's own CPU per forwarded frame, in process: no sockets, no event loop.

A real `Bridge` with the bench's policy, metrics and prices (bench/relay.toml.template)
forwards the bench's frames through its read-callback paths (`_forward_in` for a client's
append, `_forward_out` for the upstream's audio delta) into stand-in sockets whose transport
only counts what it is given. What is measured is the relay's judging, metering and framing,
the part of a frame's cost that is the relay's own code (`make bench` measures the whole
path, kernel and event loop included, side by side with nginx).

A second pair of rows takes each frame the way a read does: its bytes (masked from the
client) through `frames.feed`, aiohttp's C reader and the armed queue into the callback,
round-robin over ``--sessions`` bridges so that, as in a live relay, the next frame's
session is not the one in the cache. What it adds over the first rows is the per-read glue
(`typing.cast` there once cost 0.27 us a frame, found this way).

Reported, for each row, in microseconds per frame: in each of ``--processes`` fresh
processes the best of ``--repeat`` runs of ``--frames`` frames; then the median over the
processes, and their range.

Run: ``.venv/bin/python -m bench.hot_path [--frames 200000] [--repeat 7] [--processes 5]``.
``python -m`` puts the current directory first on the import path: to measure another
checkout's relay, run from a directory whose ``relay`` is that checkout's (``PYTHONPATH``
comes after the current directory).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import WSMsgType
from aiohttp._websocket.reader import WebSocketReader
from aiohttp.base_protocol import BaseProtocol

from bench.paths import MAX_SESSION_S, render
from relay.ops.config import parse_config
from relay.ops.metrics import Metrics, SessionMeter
from relay.session import frames
from relay.session.frames import ForwardingQueue, _text_frame
from relay.session.policy import build_policy
from relay.session.pump import Bridge

# 20 ms of 24 kHz PCM16: 960 bytes, 1,280 base64 characters (as bench/loadgen.py sends).
_AUDIO = base64.b64encode(bytes(960))
APPEND = b'{"type":"input_audio_buffer.append","event_id":"t1764547200000000000-1","audio":"'
APPEND += _AUDIO + b'"}'
# What bench/upstream.py echoes back (Azure's layout: the delta last).
DELTA = (
    b'{"type":"response.output_audio.delta","event_id":"e","response_id":"t1764547200000000000-1",'
    b'"item_id":"i","output_index":0,"content_index":0,"delta":"' + _AUDIO + b'"}'
)


class _Transport:
    __slots__ = ("written",)

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes | bytearray) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False


class _Protocol:
    __slots__ = ("_paused",)

    def __init__(self) -> None:
        self._paused = False


class _Writer:
    """What the frame layer uses of aiohttp's `WebSocketWriter`."""

    def __init__(self, use_mask: bool) -> None:
        self.transport = _Transport()
        self.protocol = _Protocol()
        self.use_mask = use_mask
        self.compress = 0
        self._closing = False
        self._output_size = 0
        self._limit = 1 << 16
        self.get_random_bits = lambda: 0x5A5A5A5A


class _Socket:
    """What the frame layer uses of a socket: its writer, its closing flag, no queue."""

    def __init__(self, use_mask: bool) -> None:
        self._writer = _Writer(use_mask)
        self._closing = False
        self._reader = None


class _Message:
    __slots__ = ("type", "data")

    def __init__(self, data: bytes) -> None:
        self.type = WSMsgType.TEXT
        self.data = data


def bridge() -> Bridge:
    """A Bridge as the handlers build one for the bench's team and deployment."""
    text = render(
        "relay.toml.template",
        {
            "PORT": 8000,
            "METRICS_PORT": 9000,
            "UPSTREAM": "http://127.0.0.1:9",
            "KEY_HASH": "sha256:" + hashlib.sha256(b"rk-bench").hexdigest(),
            "MAX_SESSION_SECONDS": int(MAX_SESSION_S),
        },
    )
    config = parse_config(tomllib.loads(text), source="bench/relay.toml.template")
    deployment, team = config.deployments["bench"], config.teams["bench"]
    meter = SessionMeter(Metrics.create(), "bench", "bench", prices=deployment.prices)
    client: Any = _Socket(use_mask=False)
    upstream: Any = _Socket(use_mask=True)
    return Bridge(
        client,
        upstream,
        policy=build_policy(deployment, team),
        session=dict(deployment.session),
        meter=meter,
        close_timeout=config.server.close_timeout_seconds,
        stall_timeout=config.server.stall_timeout_seconds,
    )


def per_frame_us(forward: Callable[[Any], bool], frame: bytes, frames: int) -> float:
    message = _Message(frame)
    for _ in range(1000):  # warm
        assert forward(message)
    began = time.perf_counter()
    for _ in range(frames):
        forward(message)
    return (time.perf_counter() - began) / frames * 1e6


_ROWS = (
    "client append -> upstream",
    "upstream delta -> client",
    "read: append, N sessions",
    "read: delta, N sessions",
)


class _Reads:
    """``sessions`` bridges, each with a reader and an armed queue per direction, as an
    upgraded connection has them."""

    def __init__(self, sessions: int, loop: asyncio.AbstractEventLoop) -> None:
        frames.install()
        protocol = BaseProtocol(loop)
        self.sides: list[list[tuple[WebSocketReader, ForwardingQueue, Any, bytes, Any]]] = [
            [],
            [],
        ]
        for _ in range(sessions):
            session = bridge()
            for side, forward, frame, masked in (
                (0, session._forward_in, APPEND, True),
                (1, session._forward_out, DELTA, False),
            ):
                queue = ForwardingQueue(protocol, 1 << 16, loop=loop)
                reader = WebSocketReader(queue, 1 << 24, compress=False, decode_text=False)
                splitter = frames.splitter(queue, masked=masked, max_size=1 << 24)
                read = bytes(_text_frame(frame, masked, 0x5A5A5A5A))
                self.sides[side].append((reader, queue, forward, read, splitter))

    def per_frame_us(self, side: int, frames_total: int) -> float:
        feed, rounds = frames.feed, max(1, frames_total // len(self.sides[side]))
        began = time.perf_counter()
        for _ in range(rounds):
            for reader, queue, forward, read, splitter in self.sides[side]:
                queue.forward = forward  # the pump arms it again after each read
                feed(reader, read, splitter)
        elapsed = time.perf_counter() - began
        assert all(not side[1]._buffer for side in self.sides[side]), "a frame declined"
        return elapsed / (rounds * len(self.sides[side])) * 1e6


def best_per_frame_us(frames_total: int, repeat: int, sessions: int) -> list[float]:
    """This process's best of ``repeat`` runs, per row of `_ROWS`."""
    session = bridge()
    # The bench config's event rate is unlimited, so the token bucket never declines a frame.
    best = [
        min(per_frame_us(forward, frame, frames_total) for _ in range(repeat))
        for forward, frame in ((session._forward_in, APPEND), (session._forward_out, DELTA))
    ]

    async def reads() -> list[float]:
        sides = _Reads(sessions, asyncio.get_running_loop())
        return [
            min(sides.per_frame_us(side, frames_total) for _ in range(repeat)) for side in (0, 1)
        ]

    return best + asyncio.run(reads())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=200, help="bridges the reads rotate over")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(orjson.dumps(best_per_frame_us(args.frames, args.repeat, args.sessions)).decode())
        return 0
    # One process's figure is not enough: on a shared machine the same code measures fast or
    # about twice as slow from one process to the next (memory placement), so each figure is
    # the median over fresh processes, with their range.
    runs = [
        orjson.loads(
            subprocess.run(
                [sys.executable, "-m", "bench.hot_path", "--child",
                 "--sessions", str(args.sessions),
                 "--frames", str(args.frames), "--repeat", str(args.repeat)],
                check=True, capture_output=True, text=True,
            ).stdout
        )
        for _ in range(args.processes)
    ]  # fmt: skip
    medians = []
    for i, name in enumerate(_ROWS):
        figures = sorted(run[i] for run in runs)
        medians.append(statistics.median(figures))
        name = name.replace("N sessions", f"{args.sessions} sessions")
        print(f"{name:28} {medians[-1]:6.2f} us/frame  ({figures[0]:.2f}-{figures[-1]:.2f})")
    print(
        f"{'round trip':28} {sum(medians[:2]):6.2f} us (callbacks), {sum(medians[2:]):.2f} (reads)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
