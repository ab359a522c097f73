"""Server event construction: every event gets a fresh ``event_id`` and the dialect's names."""

from __future__ import annotations

from typing import Any

from relay.simulator.conversation import Item
from relay.simulator.errors import ClientEventError
from relay.simulator.ids import IdFactory
from relay.simulator.schema import Dialect
from relay.simulator.usage import transcription_usage

Event = dict[str, Any]


class ServerEvents:
    """Builds one connection's server events."""

    def __init__(self, dialect: Dialect, ids: IdFactory) -> None:
        self.dialect = dialect
        self.ids = ids

    def make(self, kind: str, **fields: Any) -> Event:
        """``{"type": kind, "event_id": …, **fields}``, in the service's key order."""
        return {"type": kind, "event_id": self.ids.event(), **fields}

    def error(self, error: ClientEventError, client_event_id: str | None) -> Event:
        return self.make(
            "error",
            error={
                "type": "invalid_request_error",
                "code": error.code,
                "message": error.message,
                "param": error.param,
                "event_id": client_event_id,
            },
        )

    def item_added(self, item: Item, previous: str | None) -> list[Event]:
        """GA: ``conversation.item.added`` and ``.done``; beta: ``conversation.item.created``."""
        snapshot = item.snapshot()
        events = [self.make(self.dialect.item_added, previous_item_id=previous, item=snapshot)]
        if self.dialect.item_done is not None:
            events.append(
                self.make(self.dialect.item_done, previous_item_id=previous, item=snapshot)
            )
        return events

    def transcription(self, item: Item, model: str, transcript: str) -> list[Event]:
        """Input audio transcription; models other than whisper also stream a delta."""
        where = {"item_id": item.id, "content_index": 0}
        events = []
        if not model.startswith("whisper"):
            events.append(
                self.make(
                    "conversation.item.input_audio_transcription.delta", **where, delta=transcript
                )
            )
        usage = transcription_usage(model, item.audio_ms[0], transcript)
        events.append(
            self.make(
                "conversation.item.input_audio_transcription.completed",
                **where,
                transcript=transcript,
                usage=usage,
            )
        )
        return events
