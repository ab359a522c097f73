"""Server event construction: every event gets a fresh ``event_id`` and the dialect's names."""

from __future__ import annotations

from typing import Any

from relay.simulator.conversation import Item
from relay.simulator.errors import ClientEventError
from relay.simulator.ids import IdFactory
from relay.simulator.schema import Dialect
from relay.simulator.usage import transcription_usage

Event = dict[str, Any]
_SERVER_ERROR = "The server had an error while processing your request. Sorry about that!"


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

    def server_error(self) -> Event:
        """What the service says when it fails internally (a simulator bug, here)."""
        return self.make(
            "error",
            error={
                "type": "server_error",
                "code": None,
                "message": _SERVER_ERROR,
                "param": None,
                "event_id": None,
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
