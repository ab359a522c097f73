"""The two wire dialects the simulator speaks: GA (``/openai/v1/realtime``) and beta/preview.

Everything that differs between them in *names and shapes* lives in one ``Dialect`` table,
so the conversation engine is written once. Session-field differences are in ``session.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.session.schema import CONTENT_TO_PREVIEW, EVENT_TO_PREVIEW
from relay.simulator.audio import G711_ALAW, G711_ULAW, PCM16, AudioFormat


@dataclass(frozen=True, slots=True)
class Dialect:
    """Event names and content shapes of one protocol flavour."""

    name: str
    audio_delta: str
    audio_done: str
    transcript_delta: str
    transcript_done: str
    text_delta: str
    text_done: str
    # Conversation-item announcement, and the GA-only completion event.
    item_added: str
    item_done: str | None
    # Content part types of assistant message items.
    audio_content: str
    text_content: str
    modalities_key: str
    # The GA usage object adds image tokens and a cached-token breakdown.
    detailed_usage: bool

    @property
    def is_ga(self) -> bool:
        return self is GA

    def modalities(self, audio: bool) -> list[str]:
        """GA ``output_modalities`` (audio or text) or beta ``modalities`` (text [+ audio])."""
        if self.is_ga:
            return ["audio"] if audio else ["text"]
        return ["text", "audio"] if audio else ["text"]

    def audio_format(self, fmt: AudioFormat) -> Any:
        """How a session shows an audio format: an object in GA, a string in beta."""
        if self.is_ga:
            return dict(_GA_FORMATS[fmt.name])
        return fmt.name


GA = Dialect(
    name="ga",
    audio_delta="response.output_audio.delta",
    audio_done="response.output_audio.done",
    transcript_delta="response.output_audio_transcript.delta",
    transcript_done="response.output_audio_transcript.done",
    text_delta="response.output_text.delta",
    text_done="response.output_text.done",
    item_added="conversation.item.added",
    item_done="conversation.item.done",
    audio_content="output_audio",
    text_content="output_text",
    modalities_key="output_modalities",
    detailed_usage=True,
)

# The beta names are the GA ones renamed, by the table the relay translates with.
BETA = Dialect(
    name="beta",
    audio_delta=EVENT_TO_PREVIEW[GA.audio_delta],
    audio_done=EVENT_TO_PREVIEW[GA.audio_done],
    transcript_delta=EVENT_TO_PREVIEW[GA.transcript_delta],
    transcript_done=EVENT_TO_PREVIEW[GA.transcript_done],
    text_delta=EVENT_TO_PREVIEW[GA.text_delta],
    text_done=EVENT_TO_PREVIEW[GA.text_done],
    item_added=EVENT_TO_PREVIEW[GA.item_added],
    item_done=None,
    audio_content=CONTENT_TO_PREVIEW[GA.audio_content],
    text_content=CONTENT_TO_PREVIEW[GA.text_content],
    modalities_key="modalities",
    detailed_usage=False,
)

_GA_FORMATS: dict[str, dict[str, Any]] = {
    PCM16.name: {"type": "audio/pcm", "rate": 24000},
    G711_ULAW.name: {"type": "audio/pcmu"},
    G711_ALAW.name: {"type": "audio/pcma"},
}
GA_FORMAT_TYPES: dict[str, AudioFormat] = {
    "audio/pcm": PCM16,
    "audio/pcmu": G711_ULAW,
    "audio/pcma": G711_ALAW,
}
BETA_FORMATS: dict[str, AudioFormat] = {fmt.name: fmt for fmt in (PCM16, G711_ULAW, G711_ALAW)}

# Client event types and the top-level fields each accepts (besides ``type``, ``event_id``).
CLIENT_EVENTS: dict[str, frozenset[str]] = {
    "session.update": frozenset({"session"}),
    "input_audio_buffer.append": frozenset({"audio"}),
    "input_audio_buffer.commit": frozenset(),
    "input_audio_buffer.clear": frozenset(),
    "conversation.item.create": frozenset({"item", "previous_item_id"}),
    "conversation.item.retrieve": frozenset({"item_id"}),
    "conversation.item.truncate": frozenset({"item_id", "content_index", "audio_end_ms"}),
    "conversation.item.delete": frozenset({"item_id"}),
    "response.create": frozenset({"response"}),
    "response.cancel": frozenset({"response_id"}),
    "output_audio_buffer.clear": frozenset(),
}
BETA_ONLY_CLIENT_EVENTS: dict[str, frozenset[str]] = {
    "transcription_session.update": frozenset({"session"}),
}


def client_events(dialect: Dialect) -> dict[str, frozenset[str]]:
    if dialect.is_ga:
        return CLIENT_EVENTS
    return {**CLIENT_EVENTS, **BETA_ONLY_CLIENT_EVENTS}
