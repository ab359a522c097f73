"""When the simulated model calls a function tool, and with which arguments.

The model calls a tool when the latest item of its context is the user's message (text or
transcript) and that message names the tool (`get_weather` or "get weather"), or contains
the simulator's `tool_trigger` phrase (which then calls the first tool). `tool_choice`
behaves as the service's: "none" never calls, "required" or a named function always call
unless the context ends with a tool's output (then the model answers it). Arguments are
filled from the tool's JSON schema, so the same tool always gets the same call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from relay.simulator.conversation import Item


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as the model streams it


def choose_call(
    tools: Sequence[Any], tool_choice: Any, context: Sequence[Item], trigger: str | None
) -> ToolCall | None:
    """The function call a response makes instead of speaking, or None."""
    functions = [
        t for t in tools if isinstance(t, dict) and t.get("type", "function") == "function"
    ]
    last = context[-1] if context else None
    if not functions or tool_choice == "none" or last is None:
        return None
    if last.wire.get("type") == "function_call_output":
        return None  # the model answers the tool's output
    if isinstance(tool_choice, dict):
        named = [t for t in functions if t.get("name") == tool_choice.get("name")]
        return _call(named[0]) if named else None
    if tool_choice == "required":
        return _call(_mentioned(functions, last) or functions[0])
    if last.role != "user":
        return None
    mentioned = _mentioned(functions, last)
    if mentioned is not None:
        return _call(mentioned)
    if trigger and trigger.lower() in said(last):
        return _call(functions[0])
    return None


def said(item: Item) -> str:
    """What a message says, lower-cased: its text and transcripts."""
    parts = (part.get("text") or part.get("transcript") for part in item.content)
    return " ".join(p for p in parts if isinstance(p, str)).lower()


def _mentioned(functions: list[dict[str, Any]], item: Item) -> dict[str, Any] | None:
    text = said(item)
    for tool in functions:
        name = str(tool.get("name", "")).lower()
        if name and (name in text or name.replace("_", " ") in text):
            return tool
    return None


def _call(tool: dict[str, Any]) -> ToolCall:
    arguments = sample_value(tool.get("parameters") or {"type": "object"})
    return ToolCall(str(tool["name"]), orjson.dumps(arguments).decode())


def sample_value(schema: Any) -> Any:
    """A value the JSON schema admits: an enum's first value, or a placeholder by type;
    an object gets its required properties (all of them when none are marked)."""
    if not isinstance(schema, dict):
        return "simulated"
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        names = required if isinstance(required, list) else list(properties)
        return {name: sample_value(properties.get(name)) for name in names if isinstance(name, str)}
    return _PLACEHOLDERS.get(str(kind), "simulated")


_PLACEHOLDERS: dict[str, Any] = {
    "string": "simulated",
    "integer": 1,
    "number": 1,
    "boolean": True,
    "array": [],
    "null": None,
}
