"""The conversation engine: client events in, actions out; no sockets, no asyncio.

Theory of operation. ``Engine.receive_text`` takes one client frame and returns a list of
actions for the connection to perform in order: a ``dict`` is a server event to send,
``StartResponse`` asks it to play a ``ResponseRun`` in the background, ``CancelResponse``
asks it to stop a run's playback and then send ``run.finish(...)``'s closing events.

Rules:
1. All session, buffer, conversation and response state changes happen here (and in the
   ``ResponseRun`` being played), synchronously, so there are no races between them.
2. A handler validates before it changes anything: a client error leaves state untouched
   and becomes one ``error`` event; the connection stays open.
3. At most one response is active. Deciding to cancel it clears it at once, so a new one
   can start later in the same action list; its closing events come from the run itself.
4. Audio positions count milliseconds of audio received, never wall-clock time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from relay.simulator import validate as v
from relay.simulator.conversation import (
    Conversation,
    Item,
    decode_audio,
    item_from_client,
    user_audio_item,
)
from relay.simulator.errors import ClientEventError, describe, invalid_type, invalid_value
from relay.simulator.ids import IdFactory
from relay.simulator.options import SimulatorOptions
from relay.simulator.params import ResponseParams, defaults_from, parse_response_params
from relay.simulator.response import Event, ResponseRun
from relay.simulator.schema import Dialect, client_events
from relay.simulator.session import SESSION_TTL_S, apply_update, default_session
from relay.simulator.settings import parse_settings
from relay.simulator.usage import Usage, text_tokens, transcription_usage
from relay.simulator.vad import TurnDetection, VadEvent, VoiceActivityDetector

MIN_COMMIT_MS = 100
_MAX_ECHO_CHARS = 160


@dataclass(frozen=True, slots=True)
class StartResponse:
    """Play ``run.steps()`` in the background."""

    run: ResponseRun


@dataclass(frozen=True, slots=True)
class CancelResponse:
    """Stop playing ``run``, then send ``run.finish("cancelled", reason)``."""

    run: ResponseRun
    reason: str


Action = Event | StartResponse | CancelResponse


def transcript_for(audio_ms: float) -> str:
    """The deterministic "transcription" of user audio."""
    return f"Hello, this is {audio_ms / 1000:.1f} seconds of simulated speech."


def default_reply(context: Iterable[Item]) -> str:
    """The reply to the latest user message in ``context``."""
    for item in reversed(tuple(context)):
        if item.role != "user":
            continue
        for index, part in enumerate(item.content):
            said = part.get("text") or part.get("transcript")
            if isinstance(said, str) and said:
                clipped = said if len(said) <= _MAX_ECHO_CHARS else said[:_MAX_ECHO_CHARS] + "…"
                return f"You said: {clipped}"
            if index in item.audio_ms:
                return f"I heard {item.audio_ms[index] / 1000:.1f} seconds of audio."
    return "Hello! This is the simulated realtime service."


def input_usage(instructions: str, context: Iterable[Item]) -> Usage:
    """Input tokens of a response: its instructions plus every item of its context."""
    text, audio = text_tokens(instructions), 0
    for item in context:
        item_text, item_audio = item.tokens()
        text += item_text
        audio += item_audio
    return Usage(input_text=text, input_audio=audio)


class Engine:
    """One connection's session, input buffer, conversation and active response."""

    def __init__(
        self,
        dialect: Dialect,
        *,
        model: str,
        options: SimulatorOptions,
        ids: IdFactory,
        now: float,
    ) -> None:
        self.dialect = dialect
        self._options = options
        self._ids = ids
        self.session = default_session(
            dialect, session_id=ids.new("sess"), model=model, expires_at=int(now) + SESSION_TTL_S
        )
        self.settings = parse_settings(dialect, self.session)
        self.conversation = Conversation(ids.new("conv"))
        # Input audio appended since the last commit or clear.
        self._buffer = bytearray()
        self._vad = VoiceActivityDetector(
            self.settings.turn_detection or TurnDetection(), self.settings.input_format
        )
        # The user item id announced by speech_started, used when speech stops.
        self._speech_item_id: str | None = None
        self._active: ResponseRun | None = None
        # The voice is fixed once the assistant has spoken.
        self._assistant_spoke = False
        self._handlers: dict[str, Callable[[dict[str, Any]], list[Action]]] = {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit_request,
            "input_audio_buffer.clear": self._clear,
            "conversation.item.create": self._item_create,
            "conversation.item.retrieve": self._item_retrieve,
            "conversation.item.truncate": self._item_truncate,
            "conversation.item.delete": self._item_delete,
            "response.create": self._response_create,
            "response.cancel": self._response_cancel,
            "output_audio_buffer.clear": self._webrtc_only,
            "transcription_session.update": self._transcription_only,
        }

    @property
    def active_response(self) -> ResponseRun | None:
        return self._active

    def session_created(self) -> Event:
        return self._event("session.created", session=self.session)

    def receive_text(self, data: bytes | str) -> list[Action]:
        """Handle one text frame; client mistakes become an ``error`` event."""
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            error = ClientEventError(
                "invalid_json",
                f"The server failed to parse the event: {exc.msg} (line {exc.lineno}, "
                f"column {exc.colno}).",
            )
            return [self.error_event(error, None)]
        client_event_id = event.get("event_id") if isinstance(event, dict) else None
        try:
            return self._dispatch(event)
        except ClientEventError as error:
            echoed = client_event_id if isinstance(client_event_id, str) else None
            return [self.error_event(error, echoed)]

    def receive_binary(self) -> list[Action]:
        error = ClientEventError(
            "invalid_value",
            "Binary WebSocket messages are not supported; send events as JSON text messages.",
        )
        return [self.error_event(error, None)]

    def error_event(self, error: ClientEventError, client_event_id: str | None) -> Event:
        return self._event(
            "error",
            error={
                "type": "invalid_request_error",
                "code": error.code,
                "message": error.message,
                "param": error.param,
                "event_id": client_event_id,
            },
        )

    def _dispatch(self, event: Any) -> list[Action]:
        if not isinstance(event, dict):
            raise ClientEventError(
                "invalid_type", f"Invalid event: expected an object, but got {describe(event)}."
            )
        kind = v.required(event, "type", "")
        if not isinstance(kind, str):
            raise invalid_type("type", "a string", kind)
        known = client_events(self.dialect)
        if kind not in known:
            raise invalid_value("type", kind, tuple(known))
        v.check_keys(event, known[kind] | {"type", "event_id"}, "")
        if "event_id" in event:
            v.string(event["event_id"], "event_id")
        return self._handlers[kind](event)

    # -- session -------------------------------------------------------------------------

    def _session_update(self, event: dict[str, Any]) -> list[Action]:
        session, settings = apply_update(self.dialect, self.session, event.get("session"))
        if settings.voice != self.settings.voice and self._assistant_spoke:
            raise ClientEventError(
                "invalid_value",
                "Cannot update a conversation's voice if assistant audio is present.",
                "session.audio.output.voice" if self.dialect.is_ga else "session.voice",
            )
        self.session, self.settings = session, settings
        self._vad.configure(settings.turn_detection or TurnDetection(), settings.input_format)
        if settings.turn_detection is None:
            self._reset_turn()
        return [self._event("session.updated", session=session)]

    # -- input audio buffer ----------------------------------------------------------------

    def _append(self, event: dict[str, Any]) -> list[Action]:
        audio = decode_audio(v.required(event, "audio", ""), "audio")
        turn_detection = self.settings.turn_detection
        if turn_detection is None:
            self._vad.skip(audio)
            self._buffer += audio
            return []
        actions: list[Action] = []
        cursor = 0
        for change in self._vad.feed(audio):
            self._buffer += audio[cursor : change.offset]
            cursor = change.offset
            if change.kind == "speech_started":
                actions += self._speech_started(change, turn_detection)
            else:
                actions += self._speech_stopped(change, turn_detection)
        self._buffer += audio[cursor:]
        if not self._vad.in_speech:
            # Between utterances only the prefix padding is worth keeping.
            keep = turn_detection.prefix_padding_ms * self.settings.input_format.bytes_per_ms
            if len(self._buffer) > keep:
                del self._buffer[: len(self._buffer) - keep]
        return actions

    def _speech_started(self, change: VadEvent, turn_detection: TurnDetection) -> list[Action]:
        self._speech_item_id = self._ids.item()
        actions: list[Action] = [
            self._event(
                "input_audio_buffer.speech_started",
                audio_start_ms=change.audio_ms,
                item_id=self._speech_item_id,
            )
        ]
        active = self._active
        if turn_detection.interrupt_response and active and not active.params.out_of_band:
            actions.append(self._cancel(active, "turn_detected"))
        return actions

    def _speech_stopped(self, change: VadEvent, turn_detection: TurnDetection) -> list[Action]:
        item_id = self._speech_item_id or self._ids.item()
        actions: list[Action] = [
            self._event(
                "input_audio_buffer.speech_stopped", audio_end_ms=change.audio_ms, item_id=item_id
            )
        ]
        actions += self._commit(item_id)
        if turn_detection.create_response and self._active is None:
            actions.append(self._start_response(defaults_from(self.settings)))
        return actions

    def _commit_request(self, event: dict[str, Any]) -> list[Action]:
        buffered_ms = self.settings.input_format.duration_ms(len(self._buffer))
        if buffered_ms < MIN_COMMIT_MS:
            raise ClientEventError(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"{MIN_COMMIT_MS}ms of audio, but buffer only has {buffered_ms:.2f}ms of audio.",
            )
        return self._commit(self._speech_item_id or self._ids.item())

    def _commit(self, item_id: str) -> list[Action]:
        item = user_audio_item(item_id, bytes(self._buffer), self.settings.input_format)
        self._buffer.clear()
        self._reset_turn()
        previous = self.conversation.add(item)
        actions: list[Action] = [
            self._event("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)
        ]
        actions += self._announce(item, previous)
        if self.settings.transcription_model is not None:
            actions += self._transcribe(item, self.settings.transcription_model)
        return actions

    def _transcribe(self, item: Item, model: str) -> list[Action]:
        audio_ms = item.audio_ms[0]
        transcript = transcript_for(audio_ms)
        item.content[0] = {**item.content[0], "transcript": transcript}
        where = {"item_id": item.id, "content_index": 0}
        actions: list[Action] = []
        if not model.startswith("whisper"):
            actions.append(
                self._event(
                    "conversation.item.input_audio_transcription.delta", **where, delta=transcript
                )
            )
        actions.append(
            self._event(
                "conversation.item.input_audio_transcription.completed",
                **where,
                transcript=transcript,
                usage=transcription_usage(model, audio_ms, transcript),
            )
        )
        return actions

    def _clear(self, event: dict[str, Any]) -> list[Action]:
        self._buffer.clear()
        self._reset_turn()
        return [self._event("input_audio_buffer.cleared")]

    def _reset_turn(self) -> None:
        self._vad.reset()
        self._speech_item_id = None

    # -- conversation items ----------------------------------------------------------------

    def _item_create(self, event: dict[str, Any]) -> list[Action]:
        item = item_from_client(
            self.dialect, v.required(event, "item", ""), self._ids, self.settings.input_format
        )
        previous_id = event.get("previous_item_id")
        if previous_id is None:
            previous = self.conversation.add(item)
        else:
            v.string(previous_id, "previous_item_id")
            previous = self.conversation.add(item, previous_id, at_end=False)
        return self._announce(item, previous)

    def _announce(self, item: Item, previous: str | None) -> list[Action]:
        snapshot = item.snapshot()
        actions: list[Action] = [
            self._event(self.dialect.item_added, previous_item_id=previous, item=snapshot)
        ]
        if self.dialect.item_done is not None:
            actions.append(
                self._event(self.dialect.item_done, previous_item_id=previous, item=snapshot)
            )
        return actions

    def _item_retrieve(self, event: dict[str, Any]) -> list[Action]:
        item = self.conversation.get(v.required(event, "item_id", ""))
        return [self._event("conversation.item.retrieved", item=item.retrieved())]

    def _item_delete(self, event: dict[str, Any]) -> list[Action]:
        item = self.conversation.get(v.required(event, "item_id", ""))
        self._check_not_generating(item)
        self.conversation.delete(item.id)
        return [self._event("conversation.item.deleted", item_id=item.id)]

    def _item_truncate(self, event: dict[str, Any]) -> list[Action]:
        item = self.conversation.get(v.required(event, "item_id", ""))
        index = v.integer(v.required(event, "content_index", ""), "content_index")
        end_ms = v.integer(v.required(event, "audio_end_ms", ""), "audio_end_ms")
        if item.role != "assistant":
            raise ClientEventError(
                "invalid_value", "Only assistant messages can be truncated.", "item_id"
            )
        self._check_not_generating(item)
        if index not in item.audio_ms:
            raise invalid_value("content_index", index)
        if end_ms > item.audio_ms[index]:
            raise ClientEventError(
                "invalid_value",
                f"Audio content of {item.audio_ms[index]:.0f}ms is shorter than {end_ms}ms.",
                "audio_end_ms",
            )
        item.audio_ms[index] = end_ms
        # The service drops the transcript, so no unheard text stays in the context.
        item.content[index] = {**item.content[index], "transcript": ""}
        return [
            self._event(
                "conversation.item.truncated",
                item_id=item.id,
                content_index=index,
                audio_end_ms=end_ms,
            )
        ]

    def _check_not_generating(self, item: Item) -> None:
        if self._active is not None and self._active.item_id == item.id:
            raise ClientEventError(
                "invalid_value",
                f"Item '{item.id}' is still being generated by response '{self._active.id}'.",
                "item_id",
            )

    # -- responses ---------------------------------------------------------------------------

    def _response_create(self, event: dict[str, Any]) -> list[Action]:
        if self._active is not None:
            raise ClientEventError(
                "conversation_already_has_active_response",
                "Conversation already has an active response in progress: "
                f"{self._active.id}. Wait until the response is finished before creating a new "
                "one.",
            )
        params = parse_response_params(self.dialect, event.get("response"), self.settings)
        return [self._start_response(params, self._context(params))]

    def _context(self, params: ResponseParams) -> tuple[Item, ...]:
        if params.input_items is None:
            return self.conversation.items()
        context = []
        for index, raw in enumerate(params.input_items):
            param = f"response.input[{index}]"
            if isinstance(raw, dict) and raw.get("type") == "item_reference":
                context.append(self.conversation.get(raw.get("id"), f"{param}.id"))
            else:
                fmt = self.settings.input_format
                context.append(item_from_client(self.dialect, raw, self._ids, fmt, param))
        return tuple(context)

    def _start_response(
        self, params: ResponseParams, context: tuple[Item, ...] | None = None
    ) -> StartResponse:
        if context is None:
            context = self.conversation.items()
        reply = self._options.reply_text
        run = ResponseRun(
            dialect=self.dialect,
            ids=self._ids,
            params=params,
            text=default_reply(context) if reply is None else reply,
            chunk_ms=self._options.chunk_ms,
            input_usage=input_usage(params.instructions, context),
            conversation=None if params.out_of_band else self.conversation,
            on_done=self._response_done,
        )
        self._active = run
        return StartResponse(run)

    def _response_done(self, run: ResponseRun) -> None:
        if self._active is run:
            self._active = None
        if run.audio_ms > 0:
            self._assistant_spoke = True

    def _response_cancel(self, event: dict[str, Any]) -> list[Action]:
        requested = event.get("response_id")
        active = self._active
        if active is None or (requested is not None and requested != active.id):
            raise ClientEventError(
                "response_cancel_not_active", "Cancellation failed: no active response found."
            )
        return [self._cancel(active, "client_cancelled")]

    def _cancel(self, run: ResponseRun, reason: str) -> CancelResponse:
        self._active = None
        return CancelResponse(run, reason)

    def _webrtc_only(self, event: dict[str, Any]) -> list[Action]:
        raise ClientEventError(
            "invalid_value",
            "output_audio_buffer.clear is only supported for WebRTC and SIP sessions.",
            "type",
        )

    def _transcription_only(self, event: dict[str, Any]) -> list[Action]:
        raise ClientEventError(
            "invalid_value",
            "transcription_session.update is only supported in transcription sessions.",
            "type",
        )

    def _event(self, kind: str, **fields: Any) -> Event:
        return {"type": kind, "event_id": self._ids.event(), **fields}
