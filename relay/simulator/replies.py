"""The simulated model: what it "hears" (input tokens, transcripts) and what it says."""

from __future__ import annotations

from collections.abc import Iterable

from relay.simulator.conversation import Item
from relay.simulator.usage import Usage, text_tokens

_MAX_ECHO_CHARS = 160


def transcript_for(audio_ms: float) -> str:
    """The deterministic "transcription" of user audio."""
    return f"Hello, this is {audio_ms / 1000:.1f} seconds of simulated speech."


def default_reply(context: Iterable[Item]) -> str:
    """The reply to the latest user message in ``context``, or to a tool's output that
    follows it."""
    items = tuple(context)
    if items and items[-1].wire.get("type") == "function_call_output":
        return f"The tool answered: {_clip(str(items[-1].wire.get('output', '')))}"
    for item in reversed(items):
        if item.role != "user":
            continue
        for index, part in enumerate(item.content):
            said = part.get("text") or part.get("transcript")
            if isinstance(said, str) and said:
                return f"You said: {_clip(said)}"
            if index in item.audio_ms:
                return f"I heard {item.audio_ms[index] / 1000:.1f} seconds of audio."
    return "Hello! This is the simulated realtime service."


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_ECHO_CHARS else text[:_MAX_ECHO_CHARS] + "…"


def input_usage(instructions: str, context: Iterable[Item]) -> Usage:
    """Input tokens of a response: its instructions plus every item of its context."""
    text, audio = text_tokens(instructions), 0
    for item in context:
        item_text, item_audio = item.tokens()
        text += item_text
        audio += item_audio
    return Usage(input_text=text, input_audio=audio)
