"""One copy of each string the sessions in force have in common.

Every live session keeps the session the upstream last reported, parsed: its instructions,
voice, formats, model, tool descriptions. Parsed per session, each string is a copy of its
own, and a team's instructions or tool schemas can run to kilobytes, the same in every one
of its sessions. `share` swaps each string of a freshly parsed value for the one already
kept (strings are immutable, so sharing them is invisible).

What is kept is bounded in bytes: the cache starts over when full, so a client that sends
a new long string every time only stops the sharing, it cannot grow the relay.
"""

from __future__ import annotations

from typing import Any

MAX_SHARED_CHARS = 1 << 20

_shared: dict[str, str] = {}
_chars = 0


def share(value: Any) -> Any:
    """``value`` (a parsed JSON value, not yet seen by anyone else) with its strings swapped
    in place for shared ones; a string is returned shared."""
    if type(value) is str:
        return _one(value)
    if type(value) is dict:
        for key, item in value.items():
            if type(item) is str or type(item) is dict or type(item) is list:
                value[key] = share(item)
    elif type(value) is list:
        for index, item in enumerate(value):
            if type(item) is str or type(item) is dict or type(item) is list:
                value[index] = share(item)
    return value


def _one(text: str) -> str:
    global _chars
    kept = _shared.get(text)
    if kept is not None:
        return kept
    if _chars + len(text) > MAX_SHARED_CHARS:
        _shared.clear()
        _chars = 0
        if len(text) > MAX_SHARED_CHARS:
            return text
    _shared[text] = text
    _chars += len(text)
    return text
