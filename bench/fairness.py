"""Fairness: does one abusive client slow the others? (`make bench-fairness`)

A healthy session sends 20 ms of audio every 20 ms through the relay to the echo upstream
and times each append's round trip (perf_counter). It is measured three times, each for
``--seconds``: alone, while another client floods tiny events as fast as the relay reads
them (reconnecting whenever the relay closes it), and while a client floods pings. The
report is the healthy session's p50/p99 in each phase and the p99's move.
The target (issue 12): a flood moves the healthy p99 by less than 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

from bench.paths import RelayPath
from bench.run import start_upstream

AUDIO = base64.b64encode(b"\x01" * 960).decode()
TINY = b'{"type":"input_audio_buffer.clear"}'


async def healthy(url: str, headers: dict[str, str], seconds: float) -> list[float]:
    """Round trips (ms) of paced appends, one every 20 ms, for ``seconds``."""
    rtts: list[float] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers) as ws:
        while orjson.loads((await ws.receive()).data)["type"] != "session.created":
            pass
        sent: dict[str, float] = {}

        async def reader() -> None:
            async for msg in ws:
                event = orjson.loads(msg.data)
                started = sent.pop(event.get("response_id", ""), None)
                if started is not None:
                    rtts.append((time.perf_counter() - started) * 1000)

        task = asyncio.ensure_future(reader())
        begin = time.perf_counter()
        n = 0
        while (now := time.perf_counter()) - begin < seconds:
            event_id = f"h{n}"
            sent[event_id] = now
            frame = {"type": "input_audio_buffer.append", "event_id": event_id, "audio": AUDIO}
            await ws.send_str(orjson.dumps(frame).decode())
            n += 1
            await asyncio.sleep(max(0.0, begin + n * 0.02 - time.perf_counter()))
        await ws.close()
        task.cancel()
    return rtts


def flood_process(url: str, headers: dict[str, str], stop: Any, kind: str, sent: Any) -> None:
    """The flooder, in a process of its own: it must not slow the measuring client's loop."""
    asyncio.run(flood(url, headers, stop, kind, sent))


async def flood(url: str, headers: dict[str, str], stop: Any, kind: str, counter: Any) -> None:
    """Sends tiny events (or pings) as fast as the relay takes them, reconnecting."""
    sent = 0
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            try:
                async with http.ws_connect(url, headers=headers, autoping=False) as ws:
                    while not stop.is_set() and not ws.closed:
                        if kind == "ping":
                            await ws.ping()
                        else:
                            await ws.send_str(TINY.decode())
                        sent += 1
                        if sent % 64 == 0:
                            counter.value = sent
                            await asyncio.sleep(0)
            except (aiohttp.ClientError, ConnectionError):
                await asyncio.sleep(0.01)


def phase(url: str, headers: dict[str, str], seconds: float, kind: str | None) -> dict[str, Any]:
    stop, sent = multiprocessing.Event(), multiprocessing.Value("q", 0)
    flooder = None
    if kind:
        flooder = multiprocessing.Process(
            target=flood_process, args=(url, headers, stop, kind, sent), daemon=True
        )
        flooder.start()
    rtts = asyncio.run(healthy(url, headers, seconds))
    stop.set()
    if flooder is not None:
        flooder.join(timeout=2)  # a throttled flooder may sit in a blocked write
        flooder.kill()
    samples = np.array(rtts)
    return {
        "phase": kind or "alone",
        "p50_ms": float(np.percentile(samples, 50)),
        "p99_ms": float(np.percentile(samples, 99)),
        "frames": len(rtts),
        "flood_sent": sent.value,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fairness", description=__doc__)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args(argv)
    key = "bench-upstream-" + secrets.token_hex(8)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        upstream, endpoint = start_upstream(work, key)
        relay = RelayPath("relay", key)
        try:
            at = relay.start(endpoint, work / "relay")
            url = f"ws://{at.host}:{at.port}{at.path}"
            results = [
                phase(url, at.headers, args.seconds, kind) for kind in (None, "events", "ping")
            ]
        finally:
            relay.stop()
            upstream.stop()
    base = results[0]["p99_ms"]
    print("| phase | healthy p50 ms | healthy p99 ms | p99 moved ms | flood sent |")
    print("|---|---|---|---|---|")
    for r in results:
        moved = r["p99_ms"] - base
        print(
            f"| {r['phase']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {moved:+.2f} | "
            f"{r['flood_sent']} |"
        )
    worst = max(r["p99_ms"] - base for r in results)
    print(f"\nworst p99 move: {worst:+.2f} ms (target < 5 ms): {'met' if worst < 5 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
