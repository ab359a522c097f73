"""Continuity: how long does a client wait at an upstream switch? (`make bench-continuity`)

Voice sessions run through the relay (continuity on) to the simulator, whose sessions last
``--session-seconds``, so each session is renewed every few seconds. Each client streams
20 ms of silence every 20 ms (its microphone), asks a question, hears the whole answer at
real-time pace, pauses ``--think-ms`` and asks again; during the pause it probes every 20 ms
with a `conversation.item.retrieve` and times the answer (perf_counter). The relay switches
at quiet points, i.e. in those pauses, holding client frames while it does.

With ``--replay audio`` the relay keeps the users' audio and replays it at each renewal, and
each question is spoken instead: 1 s of tone in the microphone stream, which the service's
VAD commits and answers (time to first audio counts from the end of the speech, so it
includes the VAD's 500 ms of silence). Spoken turns need longer quiet points: run it with
``--session-seconds 8 --think-ms 1000``.

Reported: the relay's switch pauses (from its `session_renewed` log lines), the client's
probe round trips (p50/p99/max: a probe held by a switch shows the gap the client sees),
and the time to first audio of each answer. The target (issue 16): switch p99 under 300 ms.
The relay, the simulator and the clients share one process and event loop, so every figure
includes the others' work: an upper bound.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import time
from typing import Any

import aiohttp
import numpy as np
import orjson
import structlog
from aiohttp import web

from relay.app import create_app
from relay.edge.auth import hash_key
from relay.ops.config import parse_config
from relay.simulator import SimulatorOptions, start_simulator

KEY, AZURE_KEY = "rk-bench-continuity", "bench-azure-key"
SILENCE = base64.b64encode(bytes(960)).decode()  # 20 ms of 24 kHz PCM16
# 20 ms of a 440 Hz tone (a whole number of periods): the simulator's VAD hears speech.
TONE = base64.b64encode(
    np.round(8000 * np.sin(2 * np.pi * 440 * np.arange(480) / 24000)).astype("<i2").tobytes()
).decode()
SPEECH_FRAMES = 50  # 1 s


class Client:
    def __init__(self, spoken: bool = False) -> None:
        self.spoken = spoken
        self.probes: list[float] = []
        self.first_audio: list[float] = []
        self.errors: list[Any] = []
        # Tone frames the microphone still has to send (a spoken question in progress).
        self.speech_left = 0
        self.speech_done = asyncio.Event()
        self.spoken_at = 0.0

    async def run(self, url: str, seconds: float, think_ms: float) -> None:
        headers = {"api-key": KEY}
        async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers) as ws:
            await self._event(ws, "session.created")
            mic = asyncio.ensure_future(self._microphone(ws))
            try:
                began, n = time.perf_counter(), 0
                first = await self._ask(ws, n)
                while time.perf_counter() - began < seconds:
                    pause_until = time.perf_counter() + think_ms / 1000
                    while time.perf_counter() < pause_until:
                        await self._probe(ws, first)
                        await asyncio.sleep(max(0.0, 0.02 - (self.probes[-1] / 1000)))
                    n += 1
                    await self._ask(ws, n)
            finally:
                mic.cancel()
            if ws.closed:
                self.errors.append(f"closed {ws.close_code}")

    async def _microphone(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        frame = orjson.dumps({"type": "input_audio_buffer.append", "audio": SILENCE}).decode()
        tone = orjson.dumps({"type": "input_audio_buffer.append", "audio": TONE}).decode()
        began, n = time.perf_counter(), 0
        while not ws.closed:
            await ws.send_str(tone if self.speech_left else frame)
            if self.speech_left:
                self.speech_left -= 1
                if not self.speech_left:
                    self.spoken_at = time.perf_counter()
                    self.speech_done.set()
            n += 1
            await asyncio.sleep(max(0.0, began + n * 0.02 - time.perf_counter()))

    async def _ask(self, ws: aiohttp.ClientWebSocketResponse, n: int) -> str:
        if self.spoken:
            return await self._say(ws)
        item_id = f"bench_user_{n:05d}"
        content = [{"type": "input_text", "text": f"Question {n}?"}]
        item = {"id": item_id, "type": "message", "role": "user", "content": content}
        await ws.send_str(orjson.dumps({"type": "conversation.item.create", "item": item}).decode())
        asked = time.perf_counter()
        await ws.send_str('{"type":"response.create"}')
        await self._event(ws, "response.output_audio.delta")
        self.first_audio.append((time.perf_counter() - asked) * 1000)
        await self._event(ws, "response.done")
        return "bench_user_00000"

    async def _say(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        """A spoken question: the service's VAD commits it and answers."""
        self.speech_done.clear()
        self.speech_left = SPEECH_FRAMES
        committed = await self._event(ws, "input_audio_buffer.committed")
        await self.speech_done.wait()
        await self._event(ws, "response.output_audio.delta")
        self.first_audio.append((time.perf_counter() - self.spoken_at) * 1000)
        await self._event(ws, "response.done")
        item_id: str = committed["item_id"]
        return item_id

    async def _probe(self, ws: aiohttp.ClientWebSocketResponse, item_id: str) -> None:
        sent = time.perf_counter()
        await ws.send_str(
            orjson.dumps({"type": "conversation.item.retrieve", "item_id": item_id}).decode()
        )
        await self._event(ws, "conversation.item.retrieved")
        self.probes.append((time.perf_counter() - sent) * 1000)

    async def _event(self, ws: aiohttp.ClientWebSocketResponse, wanted: str) -> dict[str, Any]:
        while True:
            msg = await ws.receive()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"the relay closed the session: {msg.type.name} {ws.close_code}")
            event: dict[str, Any] = orjson.loads(msg.data)
            if event["type"] == "error":
                self.errors.append(event["error"])
            if event["type"] == wanted:
                return event


def stats(values: list[float]) -> str:
    if not values:
        return "n=0"
    a = np.array(values)
    return (
        f"n={len(a)} p50={np.percentile(a, 50):.1f} ms p99={np.percentile(a, 99):.1f} ms "
        f"max={a.max():.1f} ms"
    )


async def main(args: argparse.Namespace) -> int:
    simulator = await start_simulator(
        SimulatorOptions(
            api_keys=frozenset({AZURE_KEY}),
            speed=1.0,
            reply_text="Sure, here is a short answer.",
            max_session_seconds=args.session_seconds,
        )
    )
    config = parse_config(
        {
            "upstream": {"connect_timeout_seconds": 5.0},
            "deployments": {
                "gpt-realtime": {
                    "endpoint": simulator.url,
                    "credential": {"env": "BENCH_AZURE_KEY"},
                    "continuity": {
                        "enabled": True,
                        "renew_before_seconds": args.session_seconds - 1.5,
                        "replay": args.replay,
                    },
                }
            },
            "teams": {"bench": {"keys": [hash_key(KEY)], "deployments": ["gpt-realtime"]}},
        },
        source="bench",
    )
    runner = web.AppRunner(create_app(config, {"BENCH_AZURE_KEY": AZURE_KEY}), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}/openai/v1/realtime?model=gpt-realtime"
    clients = [Client(spoken=args.replay == "audio") for _ in range(args.sessions)]
    try:
        with structlog.testing.capture_logs() as logs:
            await asyncio.gather(*(c.run(url, args.seconds, args.think_ms) for c in clients))
    finally:
        await runner.cleanup()
        await simulator.close()
    renewed = [e for e in logs if e["event"] == "session_renewed"]
    failed = [e for e in logs if e["event"] == "session_renewal_failed"]
    pauses = [e["switch_pause_seconds"] * 1000 for e in renewed]
    errors = [err for c in clients for err in c.errors]
    print(f"continuity: {args.sessions} sessions x {args.seconds:g} s, upstream sessions of "
          f"{args.session_seconds:g} s, replay = {args.replay}")  # fmt: skip
    print(f"  renewals: {len(renewed)} done, {len(failed)} failed "
          f"({', '.join(sorted({e['outcome'] for e in failed})) or 'none'})")  # fmt: skip
    print(f"  switch pause (relay):     {stats(pauses)}")
    tokens = [e["replayed_tokens"] for e in renewed]
    print(f"  replayed tokens a renewal: mean {np.mean(tokens) if tokens else 0:.0f}")
    print(f"  probe round trip (client): {stats([p for c in clients for p in c.probes])}")
    print(f"  time to first audio:       {stats([p for c in clients for p in c.first_audio])}")
    print(f"  client errors or closes:   {len(errors)} {errors[:3]}")
    p99 = float(np.percentile(pauses, 99)) if pauses else float("nan")
    print(f"  target switch p99 < 300 ms: {'met' if p99 < 300 else 'NOT met'}")
    return 0 if renewed and not errors and p99 < 300 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--session-seconds", type=float, default=5.0)
    parser.add_argument("--think-ms", type=float, default=400.0)
    parser.add_argument("--replay", choices=("text", "audio"), default="text")
    raise SystemExit(asyncio.run(main(parser.parse_args())))
