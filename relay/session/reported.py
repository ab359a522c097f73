"""A session the upstream reports (`session.updated`), judged against the policy. Pure.

The fields the policy governs (locked, allowed values, caps, the instructions prefix) are
compared with the session in force. On a WebRTC call the device's `session.update` travels
on its data channel, out of the relay's reach, and its effect comes back on the relay's
sideband socket: a change the policy refuses is undone with a `session.update` that restores
them, and one that drops the instructions prefix gets it back (`edge/webrtc/observer.py`).
On a WebSocket session every client update was judged before it went up, so a reported
session that breaks the policy is the upstream's doing: the pump logs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import orjson

from relay.session.policy import PolicyViolation, SessionPolicy
from relay.session.schema import get_path, set_path

RESTORE_EVENT_ID = "relay_session_restore"


@dataclass(frozen=True, slots=True)
class Verdict:
    # The session now in force (the reported one, or the one being restored).
    in_force: dict[str, Any]
    # The `session.update` to send, or None.
    update: bytes | None = None
    violation: PolicyViolation | None = None


def judge_reported(
    policy: SessionPolicy, in_force: Mapping[str, Any], reported: dict[str, Any]
) -> Verdict:
    """Judge a `session.updated` ``reported`` against the session ``in_force``."""
    paths = (*policy.locked, *policy.allowed_values, *policy.max_values)
    changed: dict[str, Any] = {}
    for path in dict.fromkeys(paths):
        present, value = get_path(reported, path)
        if present and value != get_path(in_force, path)[1]:
            set_path(changed, path, value)
    instructions = reported.get("instructions")
    if policy.instructions_prefix and instructions != in_force.get("instructions"):
        changed["instructions"] = instructions
    if not changed:
        return Verdict(reported)
    frame = orjson.dumps({"type": policy.update_event, "session": changed})
    # The change is already in force on the call: whatever the policy's on_violation, a
    # change that breaks a rule is undone, not corrected in passing.
    strict = replace(policy, on_violation="refuse")
    try:
        judged = strict.check(policy.update_event, frame, in_force)
    except PolicyViolation as violation:
        restore: dict[str, Any] = {}
        for path in dict.fromkeys(paths):
            if get_path(changed, path)[0]:
                set_path(restore, *_in_force_at(in_force, path))
        return Verdict(dict(in_force), _update(policy, restore), violation)
    if judged is frame or not isinstance(judged, bytes):
        return Verdict(reported)
    # The instructions lost the prefix: put it back.
    fixed = orjson.loads(judged)["session"]["instructions"]
    return Verdict(reported, _update(policy, {"instructions": fixed}))


def _in_force_at(in_force: Mapping[str, Any], path: str) -> tuple[str, Any]:
    """Where and what to restore for ``path``: its value in force, or the nearest table on
    the way that is null or absent there, as null (`transcription: null`, not
    `transcription: {model: null}`, which the service refuses)."""
    parts = path.split(".")
    node: Any = in_force
    for depth, part in enumerate(parts):
        if not isinstance(node, Mapping):
            return ".".join(parts[:depth]), node
        if part not in node:
            return ".".join(parts[: depth + 1]), None
        node = node[part]
    return path, node


def _update(policy: SessionPolicy, session: dict[str, Any]) -> bytes:
    if policy.flavour == "ga":
        session = {"type": policy.defaults.get("type", "realtime"), **session}
    return orjson.dumps(
        {"type": policy.update_event, "event_id": RESTORE_EVENT_ID, "session": session}
    )
