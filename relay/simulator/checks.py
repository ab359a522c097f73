"""Validation of session fields the simulator echoes but does not act on.

Tools, tool choice, tracing, prompt, reasoning, truncation, include, transcription and
noise-reduction options only need to be well-formed: the service rejects malformed ones,
and whatever the simulator accepts it shows back in ``session.updated``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from relay.simulator import validate as v
from relay.simulator.errors import invalid_type
from relay.simulator.schema import Dialect

_FUNCTION_TOOL_KEYS = ("type", "name", "description", "parameters")
_MCP_TOOL_KEYS = (
    "type",
    "server_label",
    "allowed_callers",
    "allowed_tools",
    "authorization",
    "connector_id",
    "defer_loading",
    "headers",
    "require_approval",
    "server_description",
    "server_url",
    "tunnel_id",
)
_TRANSCRIPTION_KEYS = {
    "ga": ("model", "language", "prompt", "delay", "keywords", "languages"),
    "beta": ("model", "language", "prompt"),
}
_TOOL_CHOICE_MODES = ("auto", "none", "required")


def check_passthrough(dialect: Dialect, session: Mapping[str, Any], path: str = "session") -> None:
    """Raises ClientEventError for a malformed field the simulator only echoes."""
    check_tools(dialect, session, path)
    check_tracing(session.get("tracing"), f"{path}.tracing")
    if dialect.is_ga:
        _check_prompt(session.get("prompt"), f"{path}.prompt")
        _check_reasoning(session.get("reasoning"), f"{path}.reasoning")
        _check_truncation(session.get("truncation", "auto"), f"{path}.truncation")
        _check_include(session.get("include"), f"{path}.include")
        if session.get("parallel_tool_calls") is not None:
            v.boolean(session["parallel_tool_calls"], f"{path}.parallel_tool_calls")


def check_tools(dialect: Dialect, container: Mapping[str, Any], path: str) -> None:
    tools = container.get("tools", [])
    if not isinstance(tools, list):
        raise invalid_type(f"{path}.tools", "an array", tools)
    kinds = ("function", "mcp") if dialect.is_ga else ("function",)
    for index, raw in enumerate(tools):
        where = f"{path}.tools[{index}]"
        tool = v.obj(raw, where)
        kind = v.choice(tool.get("type", "function"), f"{where}.type", kinds)
        v.check_keys(tool, _FUNCTION_TOOL_KEYS if kind == "function" else _MCP_TOOL_KEYS, where)
        if kind == "function":
            v.string(v.required(tool, "name", where), f"{where}.name")
            if tool.get("description") is not None:
                v.string(tool["description"], f"{where}.description")
            if tool.get("parameters") is not None:
                v.obj(tool["parameters"], f"{where}.parameters")
        else:
            v.string(v.required(tool, "server_label", where), f"{where}.server_label")
    _check_tool_choice(dialect, container.get("tool_choice", "auto"), f"{path}.tool_choice")


def _check_tool_choice(dialect: Dialect, choice: Any, param: str) -> None:
    if not isinstance(choice, dict):
        v.choice(choice, param, _TOOL_CHOICE_MODES)
        return
    if not dialect.is_ga:
        # A forced function, as the beta SDK documents it ({"function": {"name"}}) or in the
        # flat form clients of both dialects send ({"name"}, LiveKit's preview mode).
        v.choice(choice.get("type"), f"{param}.type", ("function",))
        v.check_keys(choice, ("type", "name", "function"), param)
        named = choice.get("function")
        if named is not None:
            named = v.obj(named, f"{param}.function")
            v.string(v.required(named, "name", f"{param}.function"), f"{param}.function.name")
        else:
            v.string(v.required(choice, "name", param), f"{param}.name")
        return
    kind = v.choice(choice.get("type"), f"{param}.type", ("function", "mcp"))
    if kind == "function":
        v.check_keys(choice, ("type", "name"), param)
        v.string(v.required(choice, "name", param), f"{param}.name")
    else:
        v.check_keys(choice, ("type", "server_label", "name"), param)
        v.string(v.required(choice, "server_label", param), f"{param}.server_label")


def check_tracing(value: Any, param: str) -> None:
    if value is None or value == "auto":
        return
    tracing = v.obj(value, param)
    v.check_keys(tracing, ("group_id", "metadata", "workflow_name"), param)
    for key in ("group_id", "workflow_name"):
        if tracing.get(key) is not None:
            v.string(tracing[key], f"{param}.{key}")


def check_transcription(dialect: Dialect, value: Any, param: str) -> str | None:
    """The transcription model, or None when transcription is off."""
    if value is None:
        return None
    transcription = v.obj(value, param)
    v.check_keys(transcription, _TRANSCRIPTION_KEYS[dialect.name], param)
    for key in ("language", "prompt"):
        if transcription.get(key) is not None:
            v.string(transcription[key], f"{param}.{key}")
    for key in ("keywords", "languages"):
        if transcription.get(key) is not None:
            _string_list(transcription[key], f"{param}.{key}")
    if transcription.get("delay") is not None:
        v.choice(
            transcription["delay"], f"{param}.delay", ("minimal", "low", "medium", "high", "xhigh")
        )
    return v.string(transcription.get("model", "whisper-1"), f"{param}.model")


def check_noise_reduction(dialect: Dialect, value: Any, param: str) -> None:
    if value is None:
        return
    noise = v.obj(value, param)
    v.check_keys(noise, ("type", "strength") if dialect.is_ga else ("type",), param)
    v.choice(noise.get("type"), f"{param}.type", ("near_field", "far_field"))
    if noise.get("strength") is not None:
        v.number(noise["strength"], f"{param}.strength", 0.0, 1.0)


def _check_prompt(value: Any, param: str) -> None:
    if value is None:
        return
    prompt = v.obj(value, param)
    v.check_keys(prompt, ("id", "variables", "version"), param)
    v.string(v.required(prompt, "id", param), f"{param}.id")
    if prompt.get("version") is not None:
        v.string(prompt["version"], f"{param}.version")
    if prompt.get("variables") is not None:
        for key, item in v.obj(prompt["variables"], f"{param}.variables").items():
            # A string, or a Responses input (text, image, file).
            if not isinstance(item, str):
                kind = v.obj(item, f"{param}.variables.{key}").get("type")
                v.choice(
                    kind,
                    f"{param}.variables.{key}.type",
                    ("input_text", "input_image", "input_file"),
                )


def _check_reasoning(value: Any, param: str) -> None:
    if value is not None:
        reasoning = v.obj(value, param)
        v.check_keys(reasoning, ("effort",), param)
        if reasoning.get("effort") is not None:
            efforts = ("minimal", "low", "medium", "high", "xhigh")
            v.choice(reasoning["effort"], f"{param}.effort", efforts)


def _check_truncation(value: Any, param: str) -> None:
    if value in ("auto", "disabled") or value is None:
        return
    truncation = v.obj(value, param)
    v.check_keys(truncation, ("type", "retention_ratio", "token_limits"), param)
    v.choice(truncation.get("type"), f"{param}.type", ("retention_ratio",))
    v.number(v.required(truncation, "retention_ratio", param), f"{param}.retention_ratio", 0, 1)
    if truncation.get("token_limits") is not None:
        limits = v.obj(truncation["token_limits"], f"{param}.token_limits")
        v.check_keys(limits, ("post_instructions",), f"{param}.token_limits")
        if limits.get("post_instructions") is not None:
            v.integer(limits["post_instructions"], f"{param}.token_limits.post_instructions")


def _check_include(value: Any, param: str) -> None:
    if value is None:
        return
    for index, entry in enumerate(_string_list(value, param)):
        v.choice(entry, f"{param}[{index}]", ("item.input_audio_transcription.logprobs",))


def _string_list(value: Any, param: str) -> list[str]:
    if not isinstance(value, list):
        raise invalid_type(param, "an array", value)
    return [v.string(entry, f"{param}[{index}]") for index, entry in enumerate(value)]
