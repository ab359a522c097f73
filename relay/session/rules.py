"""The session rules (locked fields, allow-lists, caps) judged on one event's fragment. Pure.

`judge` finds every rule a `session` or `response` fragment breaks and corrects the fragment
in place, so that what the upstream runs keeps the rules:
- a locked field is set back to the value in force: merging the corrected fragment into the
  session leaves the field as it was (a parent table replaced by a null, or by a table of
  another `type`, is taken out of the fragment: the service would replace it whole);
- a value outside an allow-list is set back to the value in force (sending the value in
  force again breaks nothing, for locked fields and allow-lists alike);
- a cap clamps: anything that is not a number within it (`"inf"` included) becomes the cap.
Whether the corrected event is forwarded or the event refused is the caller's choice.

In a `response.create`, a null field is unset (the session's value applies), so it breaks
nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from relay.session.schema import get_path, merge_session, set_path

_ABSENT = object()


@dataclass(frozen=True, slots=True)
class Breach:
    """One rule an event broke: the param it names (`session.instructions`) and why."""

    param: str
    message: str


def judge(
    fragment: dict[str, Any],
    session: Mapping[str, Any],
    *,
    key: str,
    locked: tuple[str, ...],
    allowed_values: Mapping[str, tuple[str, ...]],
    max_values: Mapping[str, float],
) -> list[Breach]:
    """The rules ``fragment`` (the event's ``key`` object) breaks, each corrected in place."""
    unset_if_null = key == "response"
    breaches = []
    for path in locked:
        if unset_if_null and get_path(fragment, path)[1] is None:
            continue
        if restore(fragment, path.split("."), session):
            message = f"{path} is locked by the relay's policy and cannot be changed."
            breaches.append(Breach(f"{key}.{path}", message))
    for path, allowed in allowed_values.items():
        present, value = get_path(fragment, path)
        if not present or value in allowed or (unset_if_null and value is None):
            continue
        if not restore(fragment, path.split("."), session):
            continue  # the value in force, sent again
        message = f"{path} must be one of {', '.join(map(repr, allowed))}; got {value!r}."
        breaches.append(Breach(f"{key}.{path}", message))
    for path, cap in max_values.items():
        present, value = get_path(fragment, path)
        if not present or within(value, cap) or (unset_if_null and value is None):
            continue
        set_path(fragment, path, int(cap) if float(cap).is_integer() else cap)
        breaches.append(Breach(f"{key}.{path}", f"{path} may be at most {cap:g}; got {value!r}."))
    return breaches


def within(value: Any, cap: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value <= cap


def restore(fragment: dict[str, Any], parts: list[str], session: Any) -> bool:
    """Correct ``fragment`` so that merged into ``session`` it leaves the value at the path
    ``parts`` as it is in ``session``. True when something had to change."""
    name, rest = parts[0], parts[1:]
    if name not in fragment:
        return False
    given = fragment[name]
    in_force = session.get(name, _ABSENT) if isinstance(session, Mapping) else _ABSENT
    if not rest:
        return _put_back(fragment, name, given, in_force)
    if isinstance(in_force, Mapping):
        replaces = not isinstance(given, dict) or given.get(
            "type", in_force.get("type")
        ) != in_force.get("type")
        if replaces:  # the whole table in force would go, the locked field with it
            del fragment[name]
            return True
        return restore(given, rest, in_force)
    # Nothing in force below here (absent or null): the client may not create the field.
    if isinstance(given, Mapping) and get_path(given, ".".join(rest))[1] is not None:
        _set_or_drop(fragment, name, in_force)
        return True
    return False


def _put_back(fragment: dict[str, Any], name: str, given: Any, in_force: Any) -> bool:
    if in_force is _ABSENT:
        if given is None:
            return False  # unset either way
        del fragment[name]
        return True
    both_tables = isinstance(given, dict) and isinstance(in_force, dict)
    merged = merge_session({name: in_force}, {name: given})[name] if both_tables else given
    if merged == in_force:
        return False
    fragment[name] = copy.deepcopy(in_force)
    return True


def _set_or_drop(fragment: dict[str, Any], name: str, in_force: Any) -> None:
    if in_force is _ABSENT:
        del fragment[name]
    else:
        fragment[name] = copy.deepcopy(in_force)
