"""Pipecat's Azure realtime service, unchanged, through the relay.

Run with the frameworks' venv (`make client-deps`) against `make run`'s relay:

    RELAY_WS_URL=ws://127.0.0.1:8080/openai/v1/realtime RELAY_KEY=rk-local-demo \
    RELAY_DEPLOYMENT=gpt-realtime .venv-clients/bin/python tests/compat/python_clients/pipecat_azure.py

It configures `AzureRealtimeLLMService` as Pipecat's docs tell users to point it at Azure
(the v1 GA URL, `api_key=`, the deployment as `Settings.model`), runs one text turn that
makes the model call `get_weather` (answered by a registered handler) and one audio turn
(a tone then silence, ended by server VAD), and prints one JSON line on stdout:
{"session", "errors", "frames", "calls", "transcript", "audioBytes", "status"}.
Pipecat's own (loguru) logging stays on stderr. Exits 0 unless the script itself crashes.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import struct
import sys
import time
from typing import Any

from loguru import logger
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    EndFrame,
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    LLMMessagesAppendFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.azure.realtime.llm import AzureRealtimeLLMService
from pipecat.services.llm_service import FunctionCallParams
from pipecat.services.openai.realtime import events
from pipecat.services.openai.realtime import llm as realtime_llm_module
from pipecat.workers.runner import WorkerRunner

DEADLINE_S = 30.0
TEARDOWN_S = 3.0  # the last seconds of the deadline, kept for closing the pipeline
RATE = 24_000  # PCM16 mono, the session's input format

started = time.monotonic()
result: dict[str, Any] = {
    "session": None,
    "errors": [],
    "frames": [],
    "calls": [],
    "transcript": "",
    "audioBytes": 0,
    "status": "timeout",
}
frame_types: set[str] = set()
sent_types: list[str] = []  # client events Pipecat sent (for stderr diagnostics)
received_types: list[str] = []  # server events Pipecat received
replies_done = 0  # responses with an assistant message that Pipecat has received in full
progress = asyncio.Event()  # set on each finished reply and on each error


# -- Observe the socket Pipecat opens, without changing what it does -----------------------
# Pipecat has no public hook for raw server events (session.updated is consumed internally),
# so the module's `websocket_connect` is wrapped to record every message both ways and pass
# it on untouched.
class _RecordingSocket:
    def __init__(self, ws: Any) -> None:
        self._ws = ws

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ws, name)

    async def send(self, message: Any) -> None:
        sent_types.append(json.loads(message).get("type", "?"))
        await self._ws.send(message)

    def __aiter__(self) -> Any:
        return self._iterate()

    async def _iterate(self) -> Any:
        global replies_done
        async for message in self._ws:
            event = json.loads(message)
            received_types.append(event.get("type", "?"))
            if event.get("type") == "session.updated":
                result["session"] = event.get("session")
            elif event.get("type") == "error":
                result["errors"].append({"event": event.get("error")})
                progress.set()
            yield message  # Pipecat handles the event before the loop resumes here
            if event.get("type") == "response.done" and any(
                item.get("type") == "message" for item in event["response"].get("output") or []
            ):
                replies_done += 1
                progress.set()
        logger.info(f"relay closed the socket: {self._ws.close_code} {self._ws.close_reason!r}")


_real_connect = realtime_llm_module.websocket_connect


async def _recording_connect(*args: Any, **kwargs: Any) -> _RecordingSocket:
    return _RecordingSocket(await _real_connect(*args, **kwargs))


realtime_llm_module.websocket_connect = _recording_connect


# -- Pipeline ends -------------------------------------------------------------------------
class Source(FrameProcessor):
    """The pipeline's input end: frames are queued on the worker and pass through here."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)


class Sink(FrameProcessor):
    """Records what the service pushes downstream, and plays the part of an output
    transport: it reports the bot's speech as started/stopped once a reply's audio ends
    (a real transport broadcasts these as it plays; Pipecat resets its audio tracking on
    BotStoppedSpeakingFrame)."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            frame_types.add(type(frame).__name__)
            if isinstance(frame, TTSAudioRawFrame):
                result["audioBytes"] += len(frame.audio)
            elif isinstance(frame, TTSTextFrame):
                result["transcript"] += frame.text
            elif isinstance(frame, TTSStartedFrame):
                await self.broadcast_frame(BotStartedSpeakingFrame)
        await self.push_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM and isinstance(frame, TTSStoppedFrame):
            await self.broadcast_frame(BotStoppedSpeakingFrame)
            result["transcript"] += "\n"


# -- The tool ------------------------------------------------------------------------------
async def get_weather(params: FunctionCallParams) -> None:
    result["calls"].append({"name": params.function_name, "arguments": dict(params.arguments)})
    city = params.arguments.get("city", "?")
    await params.result_callback({"weather": f"It is sunny in {city}."})


WEATHER = FunctionSchema(
    name="get_weather",
    description="The weather in a city.",
    properties={"city": {"type": "string", "description": "The city."}},
    required=["city"],
)


def tone_then_silence(tone_ms: int = 600, silence_ms: int = 1000) -> bytes:
    """A 440 Hz tone loud enough for server VAD, then silence longer than its
    silence_duration_ms (500, Pipecat's TurnDetection default), so VAD ends the turn."""
    tone = (
        round(8000 * math.sin(2 * math.pi * 440 * i / RATE)) for i in range(RATE * tone_ms // 1000)
    )
    return struct.pack(f"<{RATE * tone_ms // 1000}h", *tone) + bytes(2 * RATE * silence_ms // 1000)


def _runs(types: list[str]) -> str:
    """Event types in order, repeats collapsed: `a, b x12, c`."""
    out: list[list[Any]] = []
    for t in types:
        if out and out[-1][0] == t:
            out[-1][1] += 1
        else:
            out.append([t, 1])
    return ", ".join(t if n == 1 else f"{t} x{n}" for t, n in out)


async def wait_reply(count: int, until: float) -> str | None:
    """None once ``count`` replies are done; else "error" (Pipecat treats every error as
    fatal, so nothing more will come) or "timeout"."""
    while replies_done < count:
        if result["errors"]:
            return "error"
        progress.clear()
        try:
            await asyncio.wait_for(progress.wait(), max(0.0, until - time.monotonic()))
        except TimeoutError:
            return "timeout"
    return None


async def main() -> None:
    llm = AzureRealtimeLLMService(
        api_key=os.environ["RELAY_KEY"],
        base_url=os.environ["RELAY_WS_URL"],
        settings=AzureRealtimeLLMService.Settings(
            model=os.environ["RELAY_DEPLOYMENT"],
            system_instruction="Answer in one short sentence.",
            session_properties=events.SessionProperties(
                audio=events.AudioConfiguration(
                    input=events.AudioInput(
                        transcription=events.InputAudioTranscription(
                            model="gpt-4o-mini-transcribe"
                        ),
                        turn_detection=events.TurnDetection(),
                    ),
                    output=events.AudioOutput(voice="marin"),
                ),
                tools=ToolsSchema(standard_tools=[WEATHER]),
                max_output_tokens="inf",  # the API's default; the policy caps it
            ),
        ),
    )
    llm.register_function("get_weather", get_weather)

    context = LLMContext()
    user, assistant = LLMContextAggregatorPair(context)
    pipeline = Pipeline([Source(), user, llm, Sink(), assistant])
    worker = PipelineWorker(pipeline, enable_rtvi=False, idle_timeout_secs=None)

    @worker.event_handler("on_pipeline_error")
    async def on_error(_worker: Any, frame: ErrorFrame) -> None:
        result["errors"].append({"frame": str(frame.error)})
        progress.set()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.create_task(runner.run())

    async def drive() -> str:
        until = started + DEADLINE_S - TEARDOWN_S
        # Text turn: the model calls get_weather (the simulated model calls a tool its user
        # message names), Pipecat runs the handler and asks for the spoken answer.
        await worker.queue_frame(
            LLMMessagesAppendFrame(
                messages=[
                    {"role": "user", "content": "What is the weather in Paris? Use get_weather."}
                ],
                run_llm=True,
            )
        )
        if failed := await wait_reply(1, until):
            return failed
        # Audio turn: 20 ms frames in real time, as an input transport delivers them (unpaced,
        # VAD's start and stop would arrive together and Pipecat's local interruption for the
        # user's turn would land on the reply already under way).
        audio = tone_then_silence()
        chunk = 2 * RATE // 50
        for i in range(0, len(audio), chunk):
            await worker.queue_frame(
                InputAudioRawFrame(audio=audio[i : i + chunk], sample_rate=RATE, num_channels=1)
            )
            await asyncio.sleep(0.02)  # an input transport's pace: 20 ms of audio a frame
        if failed := await wait_reply(2, until):
            return failed
        return "completed"

    try:
        result["status"] = await asyncio.wait_for(
            drive(), started + DEADLINE_S - TEARDOWN_S - time.monotonic()
        )
    except TimeoutError:
        result["status"] = "timeout"
    if result["errors"] and result["status"] == "completed":
        result["status"] = "error"

    # Tear down: end the pipeline gracefully (closes the socket), cancel if it hangs.
    await worker.queue_frame(EndFrame())
    try:
        await asyncio.wait_for(asyncio.shield(run), TEARDOWN_S - 1)
    except TimeoutError:
        await runner.cancel()
        try:
            await asyncio.wait_for(run, 1)
        except (TimeoutError, asyncio.CancelledError):
            pass

    result["frames"] = sorted(frame_types)
    result["transcript"] = result["transcript"].strip()
    logger.info(f"client events sent: {_runs(sent_types)}")
    logger.info(f"server events received: {_runs(received_types)}")
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
