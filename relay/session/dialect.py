"""Translation between the two dialects of the realtime API, GA and preview (beta). Pure.

The client's dialect comes from how it connects (`client_dialect`); the deployment's from
its config. When they differ, a `Translator` carries every event across, both ways:

- Server events renamed between the dialects whose body is the same in both (audio,
  transcript and text deltas and dones) are renamed on bytes (`rename_on_bytes`), never
  parsed. Events that carry a session, an item, a content part, a response or an error
  `param` are parsed and reshaped. Everything else passes as it is.
- Client events: `session.update`, `response.create` and `conversation.item.create` are
  reshaped; every other client event has the same name and body in both dialects (an audio
  append included) and passes untouched. A field with no counterpart in the deployment's
  dialect is left out and named in `Translation.dropped`, for an `error` event.

The field tables live in `relay.session.schema`, which the policy and the simulator share.
docs/dialects.md shows the whole mapping.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from relay.session.codec import dump_json, load_event, load_json
from relay.session.schema import (
    CONTENT_TO_PREVIEW,
    EVENT_TO_PREVIEW,
    GA_TO_PREVIEW,
    ga_path,
    preview_path,
    to_ga_session,
    to_preview_session,
)

Dialect = Literal["ga", "preview"]

# The first api-version of /openai/realtime that speaks GA (the model version of gpt-realtime).
GA_API_VERSION = "2025-08-28"
PREVIEW_PATH = "/openai/realtime"
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")

# Session fields (dotted paths) of one dialect that the other has no place for.
GA_ONLY_SESSION = (
    "include", "prompt", "truncation", "reasoning", "parallel_tool_calls",
    "audio.input.turn_detection.idle_timeout_ms",
)  # fmt: skip
PREVIEW_ONLY_SESSION = ("temperature",)
# `response.create` parameters: GA path -> preview key, and the one-sided ones.
GA_TO_PREVIEW_RESPONSE: dict[str, str] = {
    "output_modalities": "modalities",
    "audio.output.voice": "voice",
    "audio.output.format": "output_audio_format",
    "max_output_tokens": "max_response_output_tokens",
}
GA_ONLY_RESPONSE = ("prompt",)
# The GA usage object's additions, which a preview response never shows.
GA_ONLY_USAGE = (
    "usage.input_token_details.image_tokens",
    "usage.input_token_details.cached_tokens_details",
)
PREVIEW_ONLY_RESPONSE = ("temperature",)
# The response object in `response.created`/`done`: `max_output_tokens` in both dialects.
_RESPONSE_OBJECT = {k: v for k, v in GA_TO_PREVIEW_RESPONSE.items() if k != "max_output_tokens"}

_PREFIXES = (b'{"type":"', b'{"type": "')


def is_preview_api_version(api_version: str) -> bool:
    """`*-preview`, or a dated version before 2025-08-28."""
    if api_version.endswith("-preview"):
        return True
    date = api_version[:10]
    return bool(_DATE.fullmatch(date)) and date < GA_API_VERSION


def client_dialect(path: str, api_version: str | None, beta_requested: bool) -> Dialect:
    """The dialect a client speaks, from how it connected.

    ``beta_requested``: an `OpenAI-Beta: realtime=v1` header or the beta subprotocol.
    A preview api-version counts on the preview path only; every other path is GA.
    """
    if beta_requested:
        return "preview"
    if path.rstrip("/") == PREVIEW_PATH and api_version and is_preview_api_version(api_version):
        return "preview"
    return "ga"


def rename_on_bytes(frame: bytes, old: bytes, new: bytes) -> bytes | None:
    """A server frame with its type renamed from ``old`` to ``new``, without parsing; or None
    when the bytes do not prove the rename exact (the caller parses instead).

    Proof: the frame starts with `{"type":"<old>"`, so its first key is `type` and its value
    is exactly ``old`` (fixed bytes: no escape, no longer name). The service sends each key of
    an object once (the premise `codec.sniff_type` takes for upstream frames), so this is
    the frame's only top-level `type`: replacing the prefix changes the event's type and
    nothing else. Client frames are never renamed (an append has one name in both dialects).
    """
    return _rename(frame, _heads(old, new))


Heads = tuple[tuple[bytes, bytes], ...]


def _heads(old: bytes, new: bytes) -> Heads:
    """(old head, new head) for each way the service writes the type first."""
    return tuple((prefix + old + b'"', prefix + new + b'"') for prefix in _PREFIXES)


def _rename(frame: bytes, heads: Heads) -> bytes | None:
    for old, new in heads:
        if frame.startswith(old):
            return new + frame[len(old) :]  # faster than a join over a memoryview at these sizes
    return None


@dataclass(frozen=True, slots=True)
class Translation:
    """A client event in the deployment's dialect (None: nothing left to send), and the
    fields (client's names) that had no counterpart there."""

    frame: bytes | None
    dropped: tuple[str, ...] = ()
    # The client's `event_id`, for the `error` event naming what was dropped.
    event_id: str | None = None
    # What ``frame`` holds, parsed (when it was): the policy judges it without a parse.
    event: dict[str, Any] | None = None


ServerHandler = Callable[[dict[str, Any]], list[dict[str, Any]]]
# Reshapes a client event in place; returns the fields (client's names) left out.
ClientHandler = Callable[[dict[str, Any]], list[str]]


# Function calls whose names are kept until their arguments are done (a response makes few).
_MAX_CALLS_NAMED = 64


class _NoCounterpart(Exception):
    """The whole event has no counterpart; ``param`` says which field makes it so."""

    def __init__(self, param: str) -> None:
        super().__init__(param)
        self.param = param


class Translator:
    """Carries events between a client and a deployment that speak different dialects."""

    __slots__ = (
        "client", "upstream", "client_events", "_names", "_byte_renames", "_server", "_client",
        "_call_names",
    )  # fmt: skip

    def __init__(self, client: Dialect, upstream: Dialect) -> None:
        if client == upstream:
            raise ValueError("nothing to translate between one dialect and itself")
        self.client = client
        self.upstream = upstream
        to_preview = client == "preview"
        names = (
            EVENT_TO_PREVIEW if to_preview else {new: old for old, new in EVENT_TO_PREVIEW.items()}
        )
        # Server event type -> the client's name for it.
        self._names: dict[str, str] = names
        self._byte_renames = {
            old: _heads(old.encode(), new.encode())
            for old, new in names.items()
            if old not in ("conversation.item.added", "conversation.item.created")
        }
        item = self._server_item
        self._server: dict[str, ServerHandler] = {
            "session.created": self._server_session,
            "session.updated": self._server_session,
            "conversation.item.retrieved": item,
            "response.output_item.added": item,
            "response.output_item.done": item,
            # (Content parts are `text` and `audio` in both dialects: only items differ.)
            "response.function_call_arguments.done": self._server_arguments_done,
            "response.created": self._server_response,
            "response.done": self._server_response,
            "error": self._server_error,
        }
        if to_preview:
            self._server["session.created"] = self._server_session_created
            self._server["conversation.item.added"] = item
            self._server["conversation.item.done"] = _drop  # preview has only `created`
        else:
            self._server["conversation.item.created"] = self._server_item_created
        self._client: dict[str, ClientHandler] = {
            "session.update": self._client_session,
            "response.create": self._client_response,
            "conversation.item.create": self._client_item,
            "transcription_session.update": self._client_transcription,
        }
        # The client event types that are reshaped; all others pass untouched.
        self.client_events = frozenset(self._client)
        # A function call's name by item id, from `response.output_item.added`: GA's
        # `response.function_call_arguments.done` names the function, preview's does not.
        self._call_names: dict[str, str] = {}

    # Server -> client.

    def to_client(self, kind: str, frame: bytes) -> tuple[bytes, ...]:
        """A server event (of type ``kind``) as the client's dialect has it: usually one
        frame; none or two where the dialects split events differently."""
        heads = self._byte_renames.get(kind)
        if heads is not None:
            renamed = _rename(frame, heads)
            if renamed is not None:
                return (renamed,)
        elif kind not in self._server:
            return (frame,)
        event = load_json(frame)
        handler = self._server.get(kind)
        events = handler(event) if handler is not None else [event]
        for translated in events:
            if translated.get("type") == kind and kind in self._names:
                translated["type"] = self._names[kind]
        return tuple(dump_json(translated) for translated in events)

    def _server_session(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        session = event.get("session")
        if isinstance(session, dict):
            event["session"] = self._session(session, for_client=True)[0]
        return [event]

    def _server_session_created(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """The preview service follows `session.created` with `conversation.created`."""
        session = event.get("session")
        session_id = session.get("id") if isinstance(session, dict) else None
        conversation = {
            "type": "conversation.created",
            "event_id": f"{event.get('event_id', 'event')}_conversation",
            "conversation": {
                "id": f"conv_{session_id or 'relay'}".replace("conv_sess_", "conv_"),
                "object": "realtime.conversation",
            },
        }
        return [*self._server_session(event), conversation]

    def _server_item(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        item = event.get("item")
        self._item(item, self.client)
        if (
            self.client == "ga"
            and event.get("type") == "response.output_item.added"
            and isinstance(item, dict)
            and item.get("type") == "function_call"
            and isinstance(item.get("id"), str)
            and isinstance(item.get("name"), str)
        ):
            self._call_names[item["id"]] = item["name"]
            while len(self._call_names) > _MAX_CALLS_NAMED:
                del self._call_names[next(iter(self._call_names))]
        return [event]

    def _server_arguments_done(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        if self.client == "preview":
            event.pop("name", None)
        else:
            name = self._call_names.pop(str(event.get("item_id")), None)
            if name is not None and "name" not in event:
                event["name"] = name
        return [event]

    def _server_item_created(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Preview's one `conversation.item.created` is GA's `added`, then `done`."""
        self._item(event.get("item"), "ga")
        added = {**event, "type": "conversation.item.added"}
        done = {**event, "type": "conversation.item.done"}
        if isinstance(event.get("event_id"), str):
            done["event_id"] = event["event_id"] + "_done"
        return [added, done]

    def _server_response(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        response = event.get("response")
        if isinstance(response, dict):
            output = response.get("output")
            if isinstance(output, list):
                for item in output:
                    self._item(item, self.client)
            if self.client == "preview":
                for path in GA_ONLY_USAGE:
                    _pop_path(response, path)
                event["response"] = to_preview_session(response, _RESPONSE_OBJECT)
            else:
                kept = {k: v for k, v in response.items() if k not in PREVIEW_ONLY_RESPONSE}
                event["response"] = to_ga_session(kept, _RESPONSE_OBJECT)
        return [event]

    def _server_error(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        error = event.get("error")
        if isinstance(error, dict) and isinstance(error.get("param"), str):
            error["param"] = self.client_param(error["param"])
        return [event]

    def client_param(self, param: str) -> str:
        """A parameter path in the deployment's dialect (`session.audio.output.voice`) as the
        client names it (`session.voice`)."""
        head, _, rest = param.partition(".")
        table = GA_TO_PREVIEW_RESPONSE if head == "response" else GA_TO_PREVIEW
        if head not in ("session", "response") or not rest:
            return param
        if self.client == "preview":
            return f"{head}.{preview_path(rest, table)}"
        return f"{head}.{ga_path(rest, table)}"

    # Client -> server.

    def to_upstream(self, kind: str, frame: bytes, event: dict[str, Any] | None) -> Translation:
        """A client event in the deployment's dialect. ``event``: the parsed frame, when the
        caller has it."""
        handler = self._client.get(kind)
        if handler is None:
            return Translation(frame, event=event)
        parsed = event if event is not None else load_event(frame)
        event_id = parsed.get("event_id")
        event_id = event_id if isinstance(event_id, str) else None
        try:
            dropped = handler(parsed)
        except _NoCounterpart as missing:
            return Translation(None, (missing.param,), event_id)
        return Translation(dump_json(parsed), tuple(dropped), event_id, parsed)

    def _client_session(self, event: dict[str, Any]) -> list[str]:
        session = event.get("session")
        if not isinstance(session, dict):
            return []  # the service names what is wrong
        if self.client == "ga" and session.get("type") == "transcription":
            raise _NoCounterpart("session.type")
        event["session"], dropped = self._session(session, for_client=False)
        return [f"session.{key}" for key in dropped]

    def _client_response(self, event: dict[str, Any]) -> list[str]:
        response = event.get("response")
        if not isinstance(response, dict):
            return []
        one_sided = GA_ONLY_RESPONSE if self.client == "ga" else PREVIEW_ONLY_RESPONSE
        dropped = [key for key in one_sided if key in response]
        kept = {k: v for k, v in response.items() if k not in one_sided}
        items = kept.get("input")
        if isinstance(items, list):
            for item in items:
                self._item(item, self.upstream)
        if self.upstream == "preview":
            event["response"] = to_preview_session(kept, GA_TO_PREVIEW_RESPONSE)
        else:
            event["response"] = to_ga_session(kept, GA_TO_PREVIEW_RESPONSE)
        return [f"response.{key}" for key in dropped]

    def _client_item(self, event: dict[str, Any]) -> list[str]:
        self._item(event.get("item"), self.upstream)
        return []

    def _client_transcription(self, event: dict[str, Any]) -> list[str]:
        """A preview transcription session has no GA counterpart on a realtime session."""
        raise _NoCounterpart("type")

    # Shapes.

    def _session(
        self, session: dict[str, Any], *, for_client: bool
    ) -> tuple[dict[str, Any], list[str]]:
        """``session`` in the other dialect than it is in, and the fields left out."""
        into = self.client if for_client else self.upstream
        one_sided = GA_ONLY_SESSION if into == "preview" else PREVIEW_ONLY_SESSION
        dropped = [path for path in one_sided if _pop_path(session, path)]
        if into == "preview":
            return to_preview_session(session), dropped
        return {"type": "realtime", **to_ga_session(session)}, dropped

    @staticmethod
    def _item(item: Any, into: Dialect) -> None:
        if isinstance(item, dict) and isinstance(item.get("content"), list):
            for part in item["content"]:
                _retype(part, into)


_CONTENT_TO_GA = {preview: ga for ga, preview in CONTENT_TO_PREVIEW.items()}


def _retype(part: Any, into: Dialect) -> None:
    """A content part's type in the other dialect (`output_audio` <-> `audio`)."""
    if isinstance(part, dict):
        table: Mapping[str, str] = CONTENT_TO_PREVIEW if into == "preview" else _CONTENT_TO_GA
        kind = part.get("type")
        if isinstance(kind, str) and kind in table:
            part["type"] = table[kind]


def _pop_path(tree: dict[str, Any], path: str) -> bool:
    """Remove a dotted path from ``tree``; whether it was there."""
    *parents, leaf = path.split(".")
    node: Any = tree
    for part in parents:
        node = node.get(part)
        if not isinstance(node, dict):
            return False
    return node.pop(leaf, _ABSENT) is not _ABSENT


_ABSENT = object()


def _drop(event: dict[str, Any]) -> list[dict[str, Any]]:
    return []
