"""LiveKit Agents, unchanged, through the relay: an `AgentSession` on the OpenAI plugin's
`RealtimeModel.with_azure`, as LiveKit's Azure docs show, with a function tool.

No LiveKit room exists here: the session runs without one, as LiveKit's own tests drive it
(`session.run(user_input=...)`). Prints one JSON line with what it saw.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
from typing import Any

import aiohttp
from livekit import rtc
from livekit.agents import Agent, AgentSession, RunContext, function_tool
from livekit.plugins.openai.realtime import RealtimeModel
from openai.types.realtime import AudioTranscription

INSTRUCTIONS = "Answer in one short sentence."
VOICE = "marin"
CLIENT_TRANSCRIPTION = "gpt-4o-mini-transcribe"
RATE = 24000


def frame(ms: int, loud: bool) -> rtc.AudioFrame:
    """``ms`` of 24 kHz mono PCM16: a 440 Hz tone loud enough to be speech, or silence."""
    samples = RATE * ms // 1000
    pcm = bytearray(samples * 2)
    if loud:
        for i in range(samples):
            value = round(8000 * math.sin(2 * math.pi * 440 * i / RATE))
            pcm[2 * i : 2 * i + 2] = value.to_bytes(2, "little", signed=True)
    return rtc.AudioFrame(bytes(pcm), RATE, 1, samples)


class WeatherAgent(Agent):
    def __init__(self, calls: list[str]) -> None:
        super().__init__(instructions=INSTRUCTIONS)
        self.calls = calls

    @function_tool
    async def get_weather(self, context: RunContext, city: str) -> str:
        """Look up the weather in a city."""
        self.calls.append(city)
        return f"It is sunny in {city}."


async def main() -> dict[str, Any]:
    seen: list[str] = []
    errors: list[Any] = []
    sessions: list[dict[str, Any]] = []
    calls: list[str] = []
    said: list[str] = []
    api_version = os.environ.get("RELAY_API_VERSION") or None
    recycle = os.environ.get("RELAY_RECYCLE_SECONDS")
    options: dict[str, Any] = {}
    if api_version:
        options["api_version"] = api_version
    if recycle:
        # The plugin's own answer to the service's session limit: a new connection after
        # this long, with the conversation so far replayed into it.
        options["max_session_duration"] = float(recycle)
    async with aiohttp.ClientSession() as http:
        model = RealtimeModel.with_azure(
            azure_deployment=os.environ["RELAY_DEPLOYMENT"],
            azure_endpoint=os.environ["RELAY_URL"],
            api_key=os.environ["RELAY_KEY"],
            voice=VOICE,
            input_audio_transcription=AudioTranscription(model=CLIENT_TRANSCRIPTION),
            http_session=http,
            **options,
        )
        session: AgentSession[None] = AgentSession(llm=model)

        def on_server_event(event: dict[str, Any]) -> None:
            seen.append(event["type"])
            if event["type"] == "session.updated":
                sessions.append(event["session"])
            elif event["type"] == "error":
                errors.append(event["error"])

        def on_error(event: Any) -> None:
            errors.append(repr(event.error))

        session.on("error", on_error)
        await session.start(WeatherAgent(calls))
        realtime = session._activity.realtime_llm_session  # type: ignore[union-attr]
        realtime.on("openai_server_event_received", on_server_event)
        # What the plugin replays into a new connection: the items it sends after the turn's
        # own and before it says it has reconnected.
        queued_items: list[str] = []
        reconnected = asyncio.Event()
        replayed_up_to = 0

        def on_client_event(event: dict[str, Any]) -> None:
            if event["type"] == "conversation.item.create":
                item = event["item"]
                queued_items.append(item.get("role") or item["type"])

        def on_reconnected(_: Any) -> None:
            nonlocal replayed_up_to
            if not reconnected.is_set():
                replayed_up_to = len(queued_items)
                reconnected.set()

        realtime.on("openai_client_event_queued", on_client_event)
        realtime.on("session_reconnected", on_reconnected)
        result = await session.run(user_input="Please get weather for Paris.")
        turn_items = len(queued_items)
        if recycle:
            await reconnected.wait()
        replayed = queued_items[turn_items:replayed_up_to]
        # A spoken turn: the plugin streams the audio, the server's VAD ends the turn and
        # answers it, and the plugin reports the user's transcript.
        heard: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        spoken = asyncio.Event()

        def on_transcribed(event: Any) -> None:
            if event.is_final and not heard.done():
                heard.set_result(event.transcript)

        def on_audio_reply(event: dict[str, Any]) -> None:
            if event["type"] == "response.done" and heard.done():
                spoken.set()

        session.on("user_input_transcribed", on_transcribed)
        realtime.on("openai_server_event_received", on_audio_reply)
        realtime.push_audio(frame(600, loud=True))
        realtime.push_audio(frame(800, loud=False))
        transcript = await heard
        await spoken.wait()
        for event in result.events:
            item = getattr(event, "item", None)
            if getattr(item, "role", None) == "assistant" and item.text_content:
                said.append(item.text_content)
        await session.aclose()
    return {
        "session": sessions[-1] if sessions else None,
        "seen": sorted(set(seen)),
        "errors": errors,
        "calls": calls,
        "said": said,
        "heard": transcript,
        "replayed": replayed,
    }


if __name__ == "__main__":
    result = asyncio.run(asyncio.wait_for(main(), timeout=30))
    print(json.dumps(result, default=str))
    sys.stdout.flush()
