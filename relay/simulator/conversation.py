"""Conversation items: client-created items, user audio items, and their ordering."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

from relay.simulator import validate as v
from relay.simulator.audio import AudioFormat, reply_duration_ms
from relay.simulator.errors import ClientEventError, invalid_type
from relay.simulator.ids import IdFactory
from relay.simulator.schema import Dialect
from relay.simulator.usage import input_audio_tokens, output_audio_tokens, text_tokens

_ITEM_KEYS = frozenset(
    {"id", "type", "object", "status", "role", "content", "call_id", "name", "arguments", "output"}
)
_PART_KEYS = frozenset({"type", "text", "audio", "transcript", "image_url", "detail", "id"})


@dataclass(slots=True)
class Item:
    """A conversation item: its wire form (no audio payloads) plus audio kept on the side."""

    wire: dict[str, Any]
    # Decoded audio by content index (user audio), for retrieval.
    audio: dict[int, bytes] = field(default_factory=dict)
    # Audio duration by content index, for token accounting and truncation.
    audio_ms: dict[int, float] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return str(self.wire["id"])

    @property
    def role(self) -> str | None:
        role = self.wire.get("role")
        return role if isinstance(role, str) else None

    @property
    def content(self) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = self.wire.get("content", [])
        return content

    def snapshot(self) -> dict[str, Any]:
        """A copy safe to serialize later, whatever happens to the item meanwhile."""
        copy = dict(self.wire)
        if "content" in copy:
            copy["content"] = [dict(part) for part in self.content]
        return copy

    def retrieved(self) -> dict[str, Any]:
        """The item as ``conversation.item.retrieved`` shows it: with its input audio."""
        copy = self.snapshot()
        for index, pcm in self.audio.items():
            copy["content"][index]["audio"] = base64.b64encode(pcm).decode("ascii")
        return copy

    def tokens(self) -> tuple[int, int]:
        """(text, audio) tokens this item adds to a model's input."""
        text = audio = 0
        for index, part in enumerate(self.content):
            if index in self.audio_ms:
                rate = output_audio_tokens if self.role == "assistant" else input_audio_tokens
                audio += rate(self.audio_ms[index])
            else:
                text += text_tokens(str(part.get("text") or part.get("transcript") or ""))
        for key in ("arguments", "output"):
            if isinstance(self.wire.get(key), str):
                text += text_tokens(self.wire[key])
        return text, audio


def user_audio_item(item_id: str, pcm: bytes, fmt: AudioFormat) -> Item:
    """The user message a committed input audio buffer becomes."""
    wire = {
        "id": item_id,
        "type": "message",
        "object": "realtime.item",
        "status": "completed",
        "role": "user",
        "content": [{"type": "input_audio", "transcript": None}],
    }
    return Item(wire, audio={0: pcm}, audio_ms={0: fmt.duration_ms(len(pcm))})


def assistant_item(item_id: str) -> Item:
    """An assistant message as a response starts it: in progress, no content yet."""
    return Item(
        {
            "id": item_id,
            "type": "message",
            "object": "realtime.item",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
    )


def function_call_item(item_id: str, call_id: str, name: str) -> Item:
    """A function call as a response starts it: in progress, arguments still to come."""
    return Item(
        {
            "id": item_id,
            "type": "function_call",
            "object": "realtime.item",
            "status": "in_progress",
            "name": name,
            "call_id": call_id,
            "arguments": "",
        }
    )


def _content_types(dialect: Dialect, role: str) -> tuple[str, ...]:
    if role == "assistant":
        return (dialect.text_content, dialect.audio_content)
    if role == "system":
        return ("input_text",)
    return (
        ("input_text", "input_audio", "input_image")
        if dialect.is_ga
        else ("input_text", "input_audio")
    )


def item_from_client(
    dialect: Dialect, raw: Any, ids: IdFactory, fmt: AudioFormat, param: str = "item"
) -> Item:
    """Validate a client-supplied item (``conversation.item.create``, ``response.input``).

    Raises:
        ClientEventError: the item is malformed.
    """
    given = v.obj(raw, param)
    v.check_keys(given, _ITEM_KEYS, param)
    kind = v.choice(
        v.required(given, "type", param),
        f"{param}.type",
        ("message", "function_call", "function_call_output"),
    )
    item_id = v.string(given["id"], f"{param}.id") if "id" in given else ids.item()
    wire: dict[str, Any] = {"id": item_id, "type": kind, "object": "realtime.item"}
    wire["status"] = "completed"
    item = Item(wire)
    if kind == "message":
        _message(dialect, given, item, fmt, param)
    elif kind == "function_call":
        wire["name"] = v.string(v.required(given, "name", param), f"{param}.name")
        wire["arguments"] = v.string(given.get("arguments", ""), f"{param}.arguments")
        wire["call_id"] = v.string(given.get("call_id", ids.new("call")), f"{param}.call_id")
    else:
        wire["call_id"] = v.string(v.required(given, "call_id", param), f"{param}.call_id")
        wire["output"] = v.string(v.required(given, "output", param), f"{param}.output")
    return item


def _message(
    dialect: Dialect, given: dict[str, Any], item: Item, fmt: AudioFormat, param: str
) -> None:
    role = v.choice(
        v.required(given, "role", param), f"{param}.role", ("user", "assistant", "system")
    )
    parts = v.required(given, "content", param)
    if not isinstance(parts, list):
        raise invalid_type(f"{param}.content", "an array", parts)
    allowed = _content_types(dialect, role)
    content: list[dict[str, Any]] = []
    for index, raw_part in enumerate(parts):
        where = f"{param}.content[{index}]"
        part = v.obj(raw_part, where)
        v.check_keys(part, _PART_KEYS, where)
        kind = v.choice(part.get("type"), f"{where}.type", allowed)
        content.append(_content_part(kind, part, where, item, index, fmt))
    item.wire["role"] = role
    item.wire["content"] = content


def _content_part(
    kind: str, part: dict[str, Any], where: str, item: Item, index: int, fmt: AudioFormat
) -> dict[str, Any]:
    if kind in ("input_text", "output_text", "text"):
        return {"type": kind, "text": v.string(v.required(part, "text", where), f"{where}.text")}
    if kind == "input_image":
        image = {
            "type": kind,
            "image_url": v.string(part.get("image_url", ""), f"{where}.image_url"),
        }
        if part.get("detail") is not None:
            image["detail"] = v.choice(part["detail"], f"{where}.detail", ("auto", "low", "high"))
        return image
    transcript = part.get("transcript")
    if transcript is not None:
        v.string(transcript, f"{where}.transcript")
    if kind == "input_audio" and part.get("audio") is not None:
        pcm = decode_audio(part["audio"], f"{where}.audio")
        item.audio[index] = pcm
        item.audio_ms[index] = fmt.duration_ms(len(pcm))
    elif kind != "input_audio" and transcript is not None:
        # Assistant audio supplied as text only: as long as we would have spoken it.
        item.audio_ms[index] = reply_duration_ms(transcript)
    return {"type": kind, "transcript": transcript}


def decode_audio(value: Any, param: str) -> bytes:
    """Strict base64 decoding of an audio payload."""
    text = v.string(value, param)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ClientEventError(
            "invalid_value", "Invalid 'audio'. Expected base64-encoded audio bytes.", param
        ) from exc


class Conversation:
    """The default conversation: items in order, indexed by id."""

    def __init__(self, conversation_id: str) -> None:
        self.id = conversation_id
        self._items: list[Item] = []
        self._by_id: dict[str, Item] = {}

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._by_id

    def items(self) -> tuple[Item, ...]:
        return tuple(self._items)

    def last_id(self) -> str | None:
        return self._items[-1].id if self._items else None

    def get(self, item_id: Any, param: str = "item_id") -> Item:
        """Raises ClientEventError when there is no such item."""
        item = self._by_id.get(item_id) if isinstance(item_id, str) else None
        if item is None:
            raise ClientEventError(
                "invalid_value",
                f"Conversation item with id '{item_id}' does not exist.",
                param,
            )
        return item

    def add(
        self, item: Item, previous_item_id: str | None = None, *, at_end: bool = True
    ) -> str | None:
        """Insert ``item``; returns the id of the item before it (None when first).

        With ``at_end`` False, ``previous_item_id`` places the item ("root" = first).
        """
        if item.id in self._by_id:
            raise ClientEventError(
                "invalid_value", f"Item with id '{item.id}' already exists.", "item.id"
            )
        if at_end:
            position = len(self._items)
        elif previous_item_id == "root":
            position = 0
        else:
            position = self._items.index(self.get(previous_item_id, "previous_item_id")) + 1
        self._items.insert(position, item)
        self._by_id[item.id] = item
        return self._items[position - 1].id if position else None

    def truncate(self, item_id: Any, content_index: int, audio_end_ms: int) -> None:
        """Cut an assistant item's audio at ``audio_end_ms`` and drop its transcript.

        Raises:
            ClientEventError: not an assistant audio part, or the audio is shorter.
        """
        item = self.get(item_id)
        if item.role != "assistant":
            raise ClientEventError(
                "invalid_value", "Only assistant messages can be truncated.", "item_id"
            )
        if content_index not in item.audio_ms:
            raise ClientEventError(
                "invalid_value",
                f"Item '{item.id}' has no audio content at index {content_index}.",
                "content_index",
            )
        duration = item.audio_ms[content_index]
        if audio_end_ms > duration:
            raise ClientEventError(
                "invalid_value",
                f"Audio content of {duration:.0f}ms is shorter than {audio_end_ms}ms.",
                "audio_end_ms",
            )
        item.audio_ms[content_index] = audio_end_ms
        # The service drops the transcript, so no unheard text stays in the context.
        item.content[content_index] = {**item.content[content_index], "transcript": ""}

    def delete(self, item_id: str) -> None:
        item = self.get(item_id)
        self._items.remove(item)
        del self._by_id[item_id]
