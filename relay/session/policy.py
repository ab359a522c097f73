"""Session policy: team defaults and rules, decided on (policy, current session, event). Pure.

Rules:
- Defaults and rules are written in GA field names and merged team over deployment over
  built-in defaults, once per (team, deployment) at start-up. A preview deployment gets them
  translated to preview names then, so checking a frame never translates anything.
- `check_client_frame` returns the bytes to forward (the very same object when the frame is
  untouched), a `Rewritten` when it corrected the event, or raises `PolicyViolation`. Only
  the event types a rule concerns are parsed: an audio append is judged by its type prefix
  and lengths, never decoded.
- An event that breaks a rule (`rules.py`) is corrected and forwarded as a `Rewritten`
  (``on_violation = "rewrite"``, the default), or refused (``"refuse"``). Events off the
  allow-list and oversized frames or appends are always refused: there is nothing to correct.
- A locked field is "changed" when the client sets it to a value other than the one in
  force; sending the current value again (as SDKs do) is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from relay.ops.config import DeploymentConfig, PolicyConfig, TeamConfig
from relay.session.codec import (
    FrameError,
    base64_size,
    dump_json,
    parse_event_strict,
    read_client_frame,
)
from relay.session.event_types import CLIENT_EVENT_TYPES, PREVIEW_CLIENT_EVENT_TYPES
from relay.session.rules import judge
from relay.session.schema import (
    get_path,
    merge_session,
    preview_path,
    set_path,
    to_preview_session,
)

Flavour = Literal["ga", "preview"]
OnViolation = Literal["rewrite", "refuse"]

# Client events of the realtime API (protocol reference 3.1).
DOCUMENTED_CLIENT_EVENTS = CLIENT_EVENT_TYPES
API_MAX_APPEND_AUDIO_BYTES = 15 * 1024 * 1024
DEFAULT_MAX_VIOLATIONS = 10
# Audio in 10 ms chunks is 100 events a second, a browser worklet's 128-sample chunks under
# 200; the burst lets a client upload 20 s of 20 ms chunks at once.
DEFAULT_MAX_EVENTS_PER_SECOND = 250.0
DEFAULT_EVENT_BURST = 1000
# Capped fields whose service default is unbounded: the cap becomes the default.
_UNBOUNDED_BY_DEFAULT = ("max_output_tokens",)
# The client events that carry conversation items of the client's making.
_ITEM_EVENTS = frozenset({"conversation.item.create", "response.create"})
# Client frames this size and more are judged by the pump (not in the read callback), which
# checks their size before reading them (`check_size`).
LARGE_EVENT_BYTES = 256 * 1024
DEFAULTS_EVENT_ID = "relay_session_defaults"


class PolicyViolation(Exception):
    """A client event the policy refuses; becomes an `error` event, not a close."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        event_id: str | None = None,
        code: str = "policy_violation",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.event_id = event_id
        self.code = code


@dataclass(frozen=True, slots=True)
class Rewritten:
    """A client event the policy corrected: forward ``frame``; ``params`` broke a rule."""

    frame: bytes
    params: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """The effective rules of one team on one deployment, in that deployment's dialect."""

    flavour: Flavour = "ga"
    defaults: Mapping[str, Any] = field(default_factory=dict)
    locked: tuple[str, ...] = ()
    allowed_values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    max_values: Mapping[str, float] = field(default_factory=dict)
    on_violation: OnViolation = "rewrite"
    instructions_prefix: str = ""
    allowed_events: frozenset[str] = DOCUMENTED_CLIENT_EVENTS
    max_frame_bytes: int | None = None
    max_append_audio_bytes: int = API_MAX_APPEND_AUDIO_BYTES
    # The roles the client's items may have; None: any.
    allowed_item_roles: frozenset[str] | None = None
    max_session_seconds: float | None = None
    idle_timeout_seconds: float | None = None
    max_violations: int = DEFAULT_MAX_VIOLATIONS
    max_events_per_second: float = DEFAULT_MAX_EVENTS_PER_SECOND
    event_burst: int = DEFAULT_EVENT_BURST
    on_rate_exceeded: Literal["throttle", "refuse"] = "throttle"
    # The client event that changes the session: `transcription_session.update` for a
    # preview transcription session.
    update_event: str = "session.update"

    def session_event(self, what: str) -> str:
        """The server event that reports the session ``what`` ("created", "updated")."""
        return self.update_event.removesuffix("update") + what

    @property
    def inspects_session(self) -> bool:
        return bool(self.locked or self.allowed_values or self.max_values)

    def defaults_event(self) -> bytes | None:
        """The `session.update` that puts the defaults in force, or None when there are none."""
        if not self.defaults:
            return None
        return orjson.dumps(
            {"type": self.update_event, "event_id": DEFAULTS_EVENT_ID, "session": self.defaults}
        )

    def check_client_frame(self, frame: bytes, session: Mapping[str, Any]) -> bytes | Rewritten:
        """The frame to forward upstream, given the session in force; or PolicyViolation."""
        try:
            kind, event, audio_bytes = read_client_frame(frame)
        except FrameError as exc:
            raise PolicyViolation(exc.message, code=exc.code) from exc
        return self.check(kind, frame, session, audio_bytes, event)

    def check(
        self,
        kind: str,
        frame: bytes,
        session: Mapping[str, Any],
        audio_bytes: int = -1,
        event: dict[str, Any] | None = None,
    ) -> bytes | Rewritten:
        """As `check_client_frame`, for a frame the caller already read with
        `codec.read_client_frame`: its type, an append's decoded audio size
        (``audio_bytes``) and the parsed event when reading it needed a parse."""
        self.check_size(frame)
        if kind not in self.allowed_events:
            raise PolicyViolation(
                f"The event type {kind!r} is not allowed here.",
                param="type",
                event_id=event_id_of(frame),
            )
        if kind == "input_audio_buffer.append":
            if not 0 <= audio_bytes <= self.max_append_audio_bytes:
                self._check_append(frame, audio_bytes)  # unmeasured yet, or refused
            return frame
        if self.allowed_item_roles is not None and kind in _ITEM_EVENTS:
            event = self._check_roles(kind, frame, event)
        if kind == "session.update" or kind == self.update_event:
            return self._check_update(frame, "session", session, event)
        if kind == "response.create":
            return self._check_update(frame, "response", session, event)
        return frame

    def check_size(self, frame: bytes) -> None:
        """PolicyViolation when the frame is over `max_frame_bytes`. `check` starts with it;
        the pump asks it first for a frame of `LARGE_EVENT_BYTES` and more, so that one too
        large is refused before it is read (the strict parse of crafted JSON holds the loop
        for tens of milliseconds a MiB)."""
        if self.max_frame_bytes is not None and len(frame) > self.max_frame_bytes:
            raise PolicyViolation(
                f"The event is {len(frame)} bytes; this deployment allows "
                f"{self.max_frame_bytes} per event.",
                event_id=event_id_of(frame),
            )

    def parses(self, kind: str) -> bool:
        """Whether judging an event of this type reads its fields (`check`'s ``event``)."""
        if self.allowed_item_roles is not None and kind in _ITEM_EVENTS:
            return True
        judged = kind in ("session.update", "response.create") or kind == self.update_event
        return judged and bool(self.inspects_session or self.instructions_prefix)

    def _check_roles(self, kind: str, frame: bytes, event: dict[str, Any] | None) -> dict[str, Any]:
        """PolicyViolation for an item whose role is not allowed: the conversation item
        created, or one of a response's own `input` items. The parsed event otherwise."""
        if event is None:
            try:
                event = parse_event_strict(frame)
            except FrameError as exc:
                raise PolicyViolation(exc.message, code=exc.code) from exc
        assert self.allowed_item_roles is not None
        if kind == "conversation.item.create":
            items: list[tuple[str, Any]] = [("item", event.get("item"))]
        else:
            response = event.get("response")
            inputs = response.get("input") if isinstance(response, dict) else None
            listed = inputs if isinstance(inputs, list) else []
            items = [(f"response.input[{i}]", item) for i, item in enumerate(listed)]
        for where, item in items:
            role = item.get("role") if isinstance(item, dict) else None
            if isinstance(role, str) and role not in self.allowed_item_roles:
                event_id = event.get("event_id")
                raise PolicyViolation(
                    f"Items with the role {role!r} are not allowed here; allowed: "
                    f"{', '.join(sorted(self.allowed_item_roles))}.",
                    param=f"{where}.role",
                    event_id=event_id if isinstance(event_id, str) else None,
                )
        return event

    def _check_append(self, frame: bytes, decoded: int) -> None:
        if decoded < 0:
            decoded = base64_size(frame, b"audio")
        if decoded > self.max_append_audio_bytes:
            raise PolicyViolation(
                f"The appended audio is {decoded} bytes; at most "
                f"{self.max_append_audio_bytes} are allowed per append.",
                param="audio",
                event_id=event_id_of(frame),
            )

    def _check_update(
        self,
        frame: bytes,
        key: str,
        session: Mapping[str, Any],
        event: dict[str, Any] | None,
    ) -> bytes | Rewritten:
        if not (self.inspects_session or self.instructions_prefix):
            return frame
        if event is None:
            try:
                event = parse_event_strict(frame)
            except FrameError as exc:
                raise PolicyViolation(exc.message, code=exc.code) from exc
        fragment = event.get(key)
        if not isinstance(fragment, dict):
            return frame  # nothing set; the upstream judges the shape
        breaches = judge(
            fragment,
            session,
            key=key,
            locked=self.locked,
            allowed_values=self.allowed_values,
            max_values=self.max_values,
        )
        if breaches and self.on_violation == "refuse":
            event_id = event.get("event_id")
            raise PolicyViolation(
                breaches[0].message,
                param=breaches[0].param,
                event_id=event_id if isinstance(event_id, str) else None,
            )
        instructions = fragment.get("instructions")
        prefixed = False
        if self.instructions_prefix and isinstance(instructions, str):
            fragment["instructions"] = with_prefix(self.instructions_prefix, instructions)
            prefixed = fragment["instructions"] != instructions
        if breaches:
            return Rewritten(dump_json(event), tuple(b.param for b in breaches))
        return dump_json(event) if prefixed else frame


def with_prefix(prefix: str, instructions: str) -> str:
    if instructions.startswith(prefix):
        return instructions
    return f"{prefix}\n\n{instructions}" if instructions else prefix


def event_id_of(frame: bytes) -> str | None:
    """The event's `event_id`, for the `error` event that refuses it. A frame of
    `LARGE_EVENT_BYTES` and more is not parsed for it (orjson took 0.75 s, holding every
    session of the process, for 30 MiB of tiny objects): its first `"event_id"` is looked
    for in its first 4 KiB, where most clients put it, else as the event's last member,
    where the agents SDK puts it (`{...event, event_id}`): ending the frame with only the
    top-level object's brace after it, it can be no nested object's."""
    if len(frame) >= LARGE_EVENT_BYTES:
        found = _EVENT_ID.search(frame, 0, 4096) or _LAST_EVENT_ID.search(frame, len(frame) - 4096)
        return found.group(1).decode() if found is not None else None
    try:
        event_id = orjson.loads(frame).get("event_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return event_id if isinstance(event_id, str) else None


# An event id without escapes, as clients make them (`event_...`, UUIDs).
_EVENT_ID = re.compile(rb'"event_id"\s*:\s*"([\x20-\x21\x23-\x5b\x5d-\x7e]{1,256})"')
_LAST_EVENT_ID = re.compile(rb'"event_id"\s*:\s*"([\x20-\x21\x23-\x5b\x5d-\x7e]{1,256})"\s*\}\s*\Z')


def build_policy(deployment: DeploymentConfig, team: TeamConfig) -> SessionPolicy:
    """Team over deployment over built-in defaults, in the deployment's dialect."""
    rules = _overlay(deployment.policy, team.policy)
    defaults = merge_session(deployment.session, team.session)
    transcribing = deployment.kind == "transcription"
    # A transcription session has no instructions.
    prefix = "" if transcribing else rules.instructions_prefix or ""
    if prefix and "instructions" in defaults:
        defaults["instructions"] = with_prefix(prefix, str(defaults["instructions"]))
    elif prefix:
        defaults["instructions"] = prefix
    allowed_events = frozenset(rules.allowed_events or DOCUMENTED_CLIENT_EVENTS)
    locked = tuple(rules.locked or ())
    allowed_values = dict(rules.allowed_values or {})
    max_values = dict(rules.max_values or {})
    for path in _UNBOUNDED_BY_DEFAULT:
        cap = max_values.get(path)
        # The service's default is "inf": a client that never sets it would run uncapped.
        if cap is not None and not transcribing and not get_path(defaults, path)[0]:
            set_path(defaults, path, int(cap) if float(cap).is_integer() else cap)
    if deployment.protocol == "preview":
        defaults = to_preview_session(defaults)
        locked = tuple(preview_path(p) for p in locked)
        allowed_values = {preview_path(p): v for p, v in allowed_values.items()}
        max_values = {preview_path(p): v for p, v in max_values.items()}
        if rules.allowed_events is None and transcribing:
            # Only a transcription session takes it (its `update_event`, judged as such);
            # on a realtime session it would go unjudged.
            allowed_events |= PREVIEW_CLIENT_EVENT_TYPES
    elif defaults or transcribing:
        defaults.setdefault("type", "transcription" if transcribing else "realtime")  # required
    return SessionPolicy(
        flavour=deployment.protocol,
        defaults=defaults,
        locked=locked,
        allowed_values=allowed_values,
        max_values=max_values,
        on_violation=rules.on_violation or "rewrite",
        instructions_prefix=prefix,
        allowed_events=allowed_events,
        max_frame_bytes=rules.max_frame_bytes,
        max_append_audio_bytes=rules.max_append_audio_bytes or API_MAX_APPEND_AUDIO_BYTES,
        allowed_item_roles=(
            None if rules.allowed_item_roles is None else frozenset(rules.allowed_item_roles)
        ),
        max_session_seconds=rules.max_session_seconds,
        idle_timeout_seconds=rules.idle_timeout_seconds,
        max_violations=(
            DEFAULT_MAX_VIOLATIONS if rules.max_violations is None else rules.max_violations
        ),
        max_events_per_second=rules.max_events_per_second or DEFAULT_MAX_EVENTS_PER_SECOND,
        event_burst=rules.event_burst or DEFAULT_EVENT_BURST,
        on_rate_exceeded=rules.on_rate_exceeded or "throttle",
        update_event=(
            "transcription_session.update"
            if transcribing and deployment.protocol == "preview"
            else "session.update"
        ),
    )


def _overlay(base: PolicyConfig, override: PolicyConfig) -> PolicyConfig:
    values = {
        name: getattr(override, name)
        if getattr(override, name) is not None
        else getattr(base, name)
        for name in PolicyConfig.__dataclass_fields__
    }
    return PolicyConfig(**values)
