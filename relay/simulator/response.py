"""One model response: its event sequence in audio time, and how it ends.

``ResponseRun.steps()`` yields two kinds of step: a ``float`` is a deadline in milliseconds of
reply audio since the response started (the runner waits for it, scaled by its speed), and a
``dict`` is an event to send now. The run updates its progress just before it yields an
event, so whatever ends it between steps (``finish``) reports exactly what was handed out:
cancellation usage counts the audio and text sent so far.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Generator, Iterator
from enum import IntEnum
from typing import Any

from relay.simulator.audio import reply_chunks
from relay.simulator.conversation import Conversation, assistant_item, function_call_item
from relay.simulator.events import Event, ServerEvents
from relay.simulator.params import ResponseParams
from relay.simulator.tools import ToolCall
from relay.simulator.usage import Usage, output_audio_tokens, text_tokens

Step = float | Event
# Text-only replies stream a word every TEXT_DELTA_MS at speed 1.
TEXT_DELTA_MS = 25
# Function call arguments stream in pieces of this many characters, one per TEXT_DELTA_MS.
ARGUMENTS_DELTA_CHARS = 16
_REQUESTS_PER_MINUTE = 1000
_TOKENS_PER_MINUTE = 100_000
_WORD = re.compile(r"\s*\S+")


class _Stage(IntEnum):
    NEW = 0
    CREATED = 1
    ITEM = 2
    PART = 3
    DONE = 4


def split_transcript(text: str) -> list[str]:
    """Word-sized deltas (leading whitespace attached) that join back to ``text``."""
    pieces = _WORD.findall(text)
    rest = text[sum(map(len, pieces)) :]
    if rest:
        if pieces:
            pieces[-1] += rest
        else:
            pieces.append(rest)
    return pieces


class ResponseRun:
    """A response being generated; see the module docstring for the step protocol."""

    def __init__(
        self,
        *,
        events: ServerEvents,
        params: ResponseParams,
        text: str,
        chunk_ms: int,
        input_usage: Usage,
        conversation: Conversation | None,
        on_done: Callable[[ResponseRun], None],
        call: ToolCall | None = None,
    ) -> None:
        self.id = events.ids.response()
        self.params = params
        self._dialect = events.dialect
        self._events = events
        self._text = text
        self._chunk_ms = chunk_ms
        self._input = input_usage
        # None for out-of-band responses (``conversation: "none"``).
        self._conversation = conversation
        self._on_done = on_done
        # A response either calls a function tool or speaks (or writes).
        self._call = call
        if call is None:
            self._item = assistant_item(events.ids.item())
        else:
            self._item = function_call_item(events.ids.item(), events.ids.new("call"), call.name)
        self._stage = _Stage.NEW
        # Whether the assistant item was announced as added to the conversation.
        self._announced = False
        # Progress: transcript (or text) and audio handed out so far.
        self._sent_text = ""
        self._sent_audio_ms = 0.0

    @property
    def item_id(self) -> str:
        return self._item.id

    @property
    def audio_ms(self) -> float:
        return self._sent_audio_ms

    def usage(self) -> Usage:
        return Usage(
            input_text=self._input.input_text,
            input_audio=self._input.input_audio,
            output_text=text_tokens(self._sent_text),
            output_audio=output_audio_tokens(self._sent_audio_ms),
        )

    def steps(self) -> Iterator[Step]:
        """The whole response, from ``response.created`` to ``response.done``."""
        yield self._created()
        yield self._event("rate_limits.updated", rate_limits=self._rate_limits())
        if self._call is not None:
            yield from self._function_call(self._call)
            yield from self.finish("completed", None)
            return
        yield from self._open()
        body = self._audio() if self.params.audio_output else self._text_only()
        status = yield from body
        reason = "max_output_tokens" if status == "incomplete" else None
        yield from self.finish(status, reason)

    def finish(self, status: str, reason: str | None) -> list[Event]:
        """End the response (completed, incomplete, or cancelled) and return the closing events.

        Idempotent: a response that already ended returns nothing.
        """
        if self._stage is _Stage.DONE:
            return []
        # Cancelled before it could start: the client still learns it existed.
        events: list[Event] = [self._created()] if self._stage is _Stage.NEW else []
        output: list[dict[str, Any]] = []
        if self._stage >= _Stage.PART:
            events += self._close_part()
        if self._stage >= _Stage.ITEM:
            events += self._close_item(status)
            output.append(self._item.snapshot())
        self._stage = _Stage.DONE
        details = None if reason is None else {"type": status, "reason": reason}
        response = self._response(status, details, output)
        events.append(self._event("response.done", response=response))
        self._on_done(self)
        return events

    def _created(self) -> Event:
        self._stage = _Stage.CREATED
        return self._event("response.created", response=self._response("in_progress", None, []))

    def _open(self) -> Iterator[Event]:
        yield from self._add_item()
        self._stage = _Stage.PART
        yield self._event("response.content_part.added", **self._where(), part=self._part(""))

    def _add_item(self) -> Iterator[Event]:
        item = self._item
        self._stage = _Stage.ITEM
        yield self._event(
            "response.output_item.added",
            response_id=self.id,
            output_index=0,
            item=item.snapshot(),
        )
        if self._conversation is not None:
            previous = self._conversation.add(item)
            self._announced = True
            yield self._event(
                self._dialect.item_added, previous_item_id=previous, item=item.snapshot()
            )

    def _function_call(self, call: ToolCall) -> Iterator[Step]:
        """The call's item, its arguments streamed in pieces, then the whole arguments."""
        yield from self._add_item()
        item = self._item
        where = {
            "response_id": self.id,
            "item_id": item.id,
            "output_index": 0,
            "call_id": item.wire["call_id"],
        }
        arguments = call.arguments
        pieces = [
            arguments[i : i + ARGUMENTS_DELTA_CHARS]
            for i in range(0, len(arguments), ARGUMENTS_DELTA_CHARS)
        ]
        for index, piece in enumerate(pieces):
            if index:
                yield float(index * TEXT_DELTA_MS)
            self._sent_text += piece
            yield self._event("response.function_call_arguments.delta", **where, delta=piece)
        item.wire["arguments"] = self._sent_text
        done = {**where, "name": call.name} if self._dialect.is_ga else where
        yield self._event(
            "response.function_call_arguments.done", **done, arguments=self._sent_text
        )

    def _audio(self) -> Generator[Step, None, str]:
        chunks = reply_chunks(self._text, self._chunk_ms, self.params.output_format)
        pieces = split_transcript(self._text)
        sent = 0
        elapsed = 0.0
        for index, chunk in enumerate(chunks):
            if index:
                yield elapsed
            due = math.ceil((index + 1) * len(pieces) / len(chunks))
            upcoming = "".join(pieces[sent:due])
            if self._over_budget(self._sent_audio_ms + chunk.ms, self._sent_text + upcoming):
                return "incomplete"
            for piece in pieces[sent:due]:
                self._sent_text += piece
                yield self._event(self._dialect.transcript_delta, **self._where(), delta=piece)
            sent = due
            self._sent_audio_ms += chunk.ms
            elapsed += chunk.ms
            yield self._event(self._dialect.audio_delta, **self._where(), delta=chunk.b64)
        return "completed"

    def _text_only(self) -> Generator[Step, None, str]:
        for index, piece in enumerate(split_transcript(self._text)):
            if index:
                yield float(index * TEXT_DELTA_MS)
            if self._over_budget(0.0, self._sent_text + piece):
                return "incomplete"
            self._sent_text += piece
            yield self._event(self._dialect.text_delta, **self._where(), delta=piece)
        return "completed"

    def _over_budget(self, audio_ms: float, text: str) -> bool:
        limit = self.params.max_output_tokens
        return limit is not None and output_audio_tokens(audio_ms) + text_tokens(text) > limit

    def _close_part(self) -> list[Event]:
        dialect, text, where = self._dialect, self._sent_text, self._where()
        if self.params.audio_output:
            self._item.wire["content"] = [{"type": dialect.audio_content, "transcript": text}]
            self._item.audio_ms[0] = self._sent_audio_ms
            done = [
                self._event(dialect.audio_done, **where),
                self._event(dialect.transcript_done, **where, transcript=text),
            ]
        else:
            self._item.wire["content"] = [{"type": dialect.text_content, "text": text}]
            done = [self._event(dialect.text_done, **where, text=text)]
        done.append(self._event("response.content_part.done", **where, part=self._part(text)))
        return done

    def _close_item(self, status: str) -> list[Event]:
        item = self._item
        item.wire["status"] = "completed" if status == "completed" else "incomplete"
        events = [
            self._event(
                "response.output_item.done",
                response_id=self.id,
                output_index=0,
                item=item.snapshot(),
            )
        ]
        if self._announced and self._dialect.item_done is not None:
            events.append(self._event(self._dialect.item_done, item=item.snapshot()))
        return events

    def _where(self) -> dict[str, Any]:
        return {
            "response_id": self.id,
            "item_id": self._item.id,
            "output_index": 0,
            "content_index": 0,
        }

    def _part(self, text: str) -> dict[str, Any]:
        if self.params.audio_output:
            return {"type": "audio", "transcript": text}
        return {"type": "text", "text": text}

    def _event(self, kind: str, **fields: Any) -> Event:
        return self._events.make(kind, **fields)

    def _response(
        self, status: str, details: dict[str, Any] | None, output: list[dict[str, Any]]
    ) -> dict[str, Any]:
        params, dialect = self.params, self._dialect
        ended = status != "in_progress"
        body: dict[str, Any] = {
            "object": "realtime.response",
            "id": self.id,
            "status": status,
            "status_details": details,
            "output": output,
            "conversation_id": None if self._conversation is None else self._conversation.id,
            dialect.modalities_key: dialect.modalities(params.audio_output),
            "max_output_tokens": params.max_output_tokens or "inf",
        }
        if dialect.is_ga:
            body["audio"] = {
                "output": {
                    "format": dialect.audio_format(params.output_format),
                    "voice": params.voice,
                }
            }
        else:
            body["voice"] = params.voice
            body["output_audio_format"] = params.output_format.name
            body["temperature"] = params.temperature
        body["usage"] = self.usage().to_wire(detailed=dialect.detailed_usage) if ended else None
        body["metadata"] = params.metadata
        return body

    def _rate_limits(self) -> list[dict[str, Any]]:
        reserved = self._input.input_tokens + (self.params.max_output_tokens or 4096)
        return [
            {
                "name": "requests",
                "limit": _REQUESTS_PER_MINUTE,
                "remaining": _REQUESTS_PER_MINUTE - 1,
                "reset_seconds": round(60 / _REQUESTS_PER_MINUTE, 3),
            },
            {
                "name": "tokens",
                "limit": _TOKENS_PER_MINUTE,
                "remaining": max(_TOKENS_PER_MINUTE - reserved, 0),
                "reset_seconds": round(60 * reserved / _TOKENS_PER_MINUTE, 3),
            },
        ]
