"""Function calls the model made whose output has not come yet, from the upstream's events.

A drain gives a session its grace to finish the turn in progress: a response, and also a
tool the client is still running (its output, then the answer it asks for). Ended between
the call and its output, the output never went up and the user never heard an answer.
Parsed only when a frame can bear on it (its bytes name a function call, or calls wait).
"""

from __future__ import annotations

from typing import Any

import orjson

EVENTS = frozenset(
    {
        "response.done", "conversation.item.added", "conversation.item.created",
        "conversation.item.deleted",
    }
)  # fmt: skip


class ToolCalls:
    """The calls waiting for their output, by item id."""

    __slots__ = ("waiting",)

    def __init__(self) -> None:
        self.waiting: dict[str, str] = {}  # the call's item id -> its call_id

    def observe(self, kind: str, frame: bytes) -> bool:
        """Take an upstream event of `EVENTS`; True when it brought the last waiting call
        its output (the client then asks for the answer)."""
        if kind == "response.done":
            if b'"function_call"' in frame:
                for item in _response_output(frame):
                    if item.get("type") == "function_call" and item.get("status") == "completed":
                        item_id, call_id = item.get("id"), item.get("call_id")
                        if isinstance(item_id, str) and isinstance(call_id, str):
                            self.waiting[item_id] = call_id
            return False
        if not self.waiting:
            return False
        if kind == "conversation.item.deleted":
            event = _load(frame)
            self.waiting.pop(str(event.get("item_id")), None)
            return False
        if b'"function_call_output"' not in frame:
            return False
        output = _load(frame).get("item")
        if not isinstance(output, dict) or output.get("type") != "function_call_output":
            return False
        answered = [i for i, c in self.waiting.items() if c == output.get("call_id")]
        for item_id in answered:
            del self.waiting[item_id]
        return bool(answered) and not self.waiting


def _load(frame: bytes) -> dict[str, Any]:
    try:
        event = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return {}
    return event if isinstance(event, dict) else {}


def _response_output(frame: bytes) -> list[dict[str, Any]]:
    response = _load(frame).get("response")
    output = response.get("output") if isinstance(response, dict) else None
    return [i for i in output if isinstance(i, dict)] if isinstance(output, list) else []
