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

from collections.abc import Callable
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
from relay.simulator.events import Event, ServerEvents
from relay.simulator.ids import IdFactory
from relay.simulator.input_buffer import InputBuffer, SpeechStarted, SpeechStopped
from relay.simulator.options import SimulatorOptions
from relay.simulator.params import ResponseParams, defaults_from, parse_response_params
from relay.simulator.replies import default_reply, input_usage, transcript_for
from relay.simulator.response import ResponseRun
from relay.simulator.schema import Dialect, client_events
from relay.simulator.session import apply_update, default_session
from relay.simulator.settings import parse_settings
from relay.simulator.tools import choose_call
from relay.simulator.transcription import (
    REFUSED_EVENTS,
    apply_transcription_update,
    default_transcription_session,
    server_event,
    transcription_settings,
    update_event,
)


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
# The service's limit on one `input_audio_buffer.append` (decoded audio).
MAX_APPEND_AUDIO_BYTES = 15 * 1024 * 1024
Handler = Callable[["Engine", dict[str, Any]], list[Action]]


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
        transcription: bool = False,
    ) -> None:
        self.dialect = dialect
        # A transcription-only session (intent=transcription): no responses.
        self.transcription = transcription
        self._options = options
        self._ids = ids
        self._events = ServerEvents(dialect, ids)
        expires_at = int(now + options.max_session_seconds)
        if transcription:
            self.session = default_transcription_session(
                dialect, session_id=ids.new("sess"), expires_at=expires_at
            )
            self.settings = transcription_settings(dialect, self.session)
        else:
            self.session = default_session(
                dialect, session_id=ids.new("sess"), model=model, expires_at=expires_at
            )
            self.settings = parse_settings(dialect, self.session)
        self.conversation = Conversation(ids.new("conv"))
        self._input = InputBuffer(self.settings.turn_detection, self.settings.input_format, ids)
        self._active: ResponseRun | None = None
        # The voice is fixed once the assistant has spoken.
        self._assistant_spoke = False
        # Unbound: bound methods here would make every engine a reference cycle, left to
        # the cycle collector when its session ends.
        self._handlers: dict[str, Handler] = {
            "session.update": Engine._session_update,
            "input_audio_buffer.append": Engine._append,
            "input_audio_buffer.commit": Engine._commit_request,
            "input_audio_buffer.clear": Engine._clear,
            "conversation.item.create": Engine._item_create,
            "conversation.item.retrieve": Engine._item_retrieve,
            "conversation.item.truncate": Engine._item_truncate,
            "conversation.item.delete": Engine._item_delete,
            "response.create": Engine._response_create,
            "response.cancel": Engine._response_cancel,
            "output_audio_buffer.clear": Engine._unsupported,
            "transcription_session.update": Engine._unsupported,
        }
        if transcription:
            for kind in REFUSED_EVENTS:
                self._handlers[kind] = Engine._not_transcribing
            self._handlers["session.update"] = Engine._not_transcribing
            self._handlers[update_event(dialect)] = Engine._transcription_update

    @property
    def active_response(self) -> ResponseRun | None:
        return self._active

    def session_created(self) -> Event:
        kind = server_event(self.dialect, "created") if self.transcription else "session.created"
        return self.event(kind, session=self.session)

    def use_session(self, fragment: dict[str, Any]) -> None:
        """Start from ``fragment`` over the defaults (a call's secret or offer carried it)."""
        apply = apply_transcription_update if self.transcription else apply_update
        self.session, self.settings = apply(self.dialect, self.session, fragment)
        self._input.configure(self.settings.turn_detection, self.settings.input_format)

    def greeting(self) -> list[Event]:
        """What a new connection gets first: ``session.created``, and on the preview dialect
        ``conversation.created``."""
        events = [self.session_created()]
        if not self.dialect.is_ga and not self.transcription:
            conversation = {"id": self.conversation.id, "object": "realtime.conversation"}
            events.append(self.event("conversation.created", conversation=conversation))
        return events

    def expired_event(self) -> Event:
        """The ``error`` the service sends when a session reaches its maximum duration."""
        minutes = self._options.max_session_seconds / 60
        error = ClientEventError(
            "session_expired", f"Your session hit the maximum duration of {minutes:g} minutes."
        )
        return self.error_event(error, None)

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
            _echoable(data, event)
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
        return self._events.error(error, client_event_id)

    def server_error_event(self) -> Event:
        return self._events.server_error()

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
        return self._handlers[kind](self, event)

    def event(self, kind: str, **fields: Any) -> Event:
        """A server event of this session (fresh event id)."""
        return self._events.make(kind, **fields)

    def _session_update(self, event: dict[str, Any]) -> list[Action]:
        session, settings = apply_update(self.dialect, self.session, event.get("session"))
        if settings.voice != self.settings.voice and self._assistant_spoke:
            raise ClientEventError(
                "invalid_value",
                "Cannot update a conversation's voice if assistant audio is present.",
                "session.audio.output.voice" if self.dialect.is_ga else "session.voice",
            )
        self.session, self.settings = session, settings
        self._input.configure(settings.turn_detection, settings.input_format)
        return [self.event("session.updated", session=session)]

    # -- input audio buffer ----------------------------------------------------------------

    def _append(self, event: dict[str, Any]) -> list[Action]:
        audio = decode_audio(v.required(event, "audio", ""), "audio")
        if len(audio) > MAX_APPEND_AUDIO_BYTES:
            raise ClientEventError(
                "invalid_value",
                f"Audio chunk too large: {len(audio)} bytes; the maximum is 15 MiB per append.",
                "audio",
            )
        actions: list[Action] = []
        for turn in self._input.append(audio):
            if isinstance(turn, SpeechStarted):
                actions += self._speech_started(turn)
            else:
                actions += self._speech_stopped(turn)
        return actions

    def _speech_started(self, turn: SpeechStarted) -> list[Action]:
        actions: list[Action] = [
            self.event(
                "input_audio_buffer.speech_started",
                audio_start_ms=turn.audio_start_ms,
                item_id=turn.item_id,
            )
        ]
        active, turn_detection = self._active, self.settings.turn_detection
        interrupts = turn_detection is not None and turn_detection.interrupt_response
        if active is not None and interrupts and not active.params.out_of_band:
            actions.append(self._cancel(active, "turn_detected"))
        return actions

    def _speech_stopped(self, turn: SpeechStopped) -> list[Action]:
        actions: list[Action] = [
            self.event(
                "input_audio_buffer.speech_stopped",
                audio_end_ms=turn.audio_end_ms,
                item_id=turn.item_id,
            )
        ]
        actions += self._commit(turn.item_id, turn.audio)
        turn_detection = self.settings.turn_detection
        responds = turn_detection and turn_detection.create_response and not self.transcription
        if responds and self._active is None:
            actions.append(self._start_response(defaults_from(self.settings)))
        return actions

    def _commit_request(self, event: dict[str, Any]) -> list[Action]:
        return self._commit(*self._input.commit())

    def _commit(self, item_id: str, audio: bytes) -> list[Action]:
        item = user_audio_item(item_id, audio, self.settings.input_format)
        previous = self.conversation.add(item)
        actions: list[Action] = [
            self.event("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)
        ]
        actions += self._events.item_added(item, previous)
        model = self.settings.transcription_model
        if model is not None:
            transcript = transcript_for(item.audio_ms[0])
            item.content[0] = {**item.content[0], "transcript": transcript}
            actions += self._events.transcription(item, model, transcript)
        return actions

    def _clear(self, event: dict[str, Any]) -> list[Action]:
        self._input.clear()
        return [self.event("input_audio_buffer.cleared")]

    # -- conversation items ----------------------------------------------------------------

    def _item_create(self, event: dict[str, Any]) -> list[Action]:
        fmt = self.settings.input_format
        item = item_from_client(self.dialect, v.required(event, "item", ""), self._ids, fmt)
        previous_id = event.get("previous_item_id")
        if previous_id is None:
            previous = self.conversation.add(item)
        else:
            v.string(previous_id, "previous_item_id")
            previous = self.conversation.add(item, previous_id, at_end=False)
        return list(self._events.item_added(item, previous))

    def _item_retrieve(self, event: dict[str, Any]) -> list[Action]:
        item = self.conversation.get(v.required(event, "item_id", ""))
        return [self.event("conversation.item.retrieved", item=item.retrieved())]

    def _item_delete(self, event: dict[str, Any]) -> list[Action]:
        item = self.conversation.get(v.required(event, "item_id", ""))
        self._check_not_generating(item.id)
        self.conversation.delete(item.id)
        return [self.event("conversation.item.deleted", item_id=item.id)]

    def _item_truncate(self, event: dict[str, Any]) -> list[Action]:
        item_id = v.required(event, "item_id", "")
        index = v.integer(v.required(event, "content_index", ""), "content_index")
        end_ms = v.integer(v.required(event, "audio_end_ms", ""), "audio_end_ms")
        self._check_not_generating(item_id)
        self.conversation.truncate(item_id, index, end_ms)
        return [
            self.event(
                "conversation.item.truncated",
                item_id=item_id,
                content_index=index,
                audio_end_ms=end_ms,
            )
        ]

    def _check_not_generating(self, item_id: Any) -> None:
        if self._active is not None and self._active.item_id == item_id:
            raise ClientEventError(
                "invalid_value",
                f"Item '{item_id}' is still being generated by response '{self._active.id}'.",
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
        """The items a response answers: its ``input`` if given, else the conversation."""
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
        call = choose_call(params.tools, params.tool_choice, context, self._options.tool_trigger)
        run = ResponseRun(
            events=self._events,
            params=params,
            text=default_reply(context) if reply is None else reply,
            chunk_ms=self._options.chunk_ms,
            input_usage=input_usage(params.instructions, context),
            conversation=None if params.out_of_band else self.conversation,
            on_done=self._response_done,
            call=call,
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

    def _transcription_update(self, event: dict[str, Any]) -> list[Action]:
        session, settings = apply_transcription_update(
            self.dialect, self.session, event.get("session")
        )
        self.session, self.settings = session, settings
        self._input.configure(settings.turn_detection, settings.input_format)
        return [self.event(server_event(self.dialect, "updated"), session=session)]

    def _not_transcribing(self, event: dict[str, Any]) -> list[Action]:
        raise ClientEventError(
            "invalid_value",
            f"{event['type']} is not supported in transcription sessions.",
            "type",
        )

    def _unsupported(self, event: dict[str, Any]) -> list[Action]:
        where = (
            "WebRTC and SIP sessions"
            if event["type"] == "output_audio_buffer.clear"
            else "transcription sessions"
        )
        raise ClientEventError(
            "invalid_value", f"{event['type']} is only supported in {where}.", "type"
        )


# orjson writes at most this many levels: an event nested deeper could not be echoed.
_MAX_ECHO_DEPTH = 254


def _echoable(data: bytes | str, event: Any) -> None:
    """Refuse, as the service refuses what it cannot hold, an event nested deeper than the
    session could report back (it would otherwise fail in every later `session.updated`).
    Counting brackets bounds the depth from above: only such frames are tried."""
    raw = data.encode() if isinstance(data, str) else data
    if raw.count(b"{") + raw.count(b"[") <= _MAX_ECHO_DEPTH:
        return
    try:
        orjson.dumps(event)
    except orjson.JSONEncodeError as exc:
        raise ClientEventError(
            "invalid_value", "The event is nested too deeply; flatten it and try again."
        ) from exc
