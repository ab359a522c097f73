"""The sessions in force share their strings, within a bound."""

from __future__ import annotations

import orjson

from relay.session import shared_strings

SESSION = (
    b'{"type":"realtime","instructions":"You are a helpful voice assistant.","tools":[{"type":'
    b'"function","name":"lookup","description":"Look an order up.","parameters":{"type":'
    b'"object","properties":{"order":{"type":"string"}}}}],"max_output_tokens":"inf",'
    b'"temperature":0.8,"tracing":null,"truncation":true,"expires_at":1764547200}'
)


def strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return []


def test_two_sessions_parsed_apart_hold_one_copy_of_each_string():
    first = shared_strings.share(orjson.loads(SESSION))
    second = shared_strings.share(orjson.loads(SESSION))
    assert first == second == orjson.loads(SESSION)  # nothing but the copies changed
    pairs = list(zip(strings(first), strings(second), strict=True))
    assert len(pairs) == 8 and all(a is b for a, b in pairs)


def test_what_is_kept_is_bounded_in_characters(monkeypatch):
    monkeypatch.setattr(shared_strings, "MAX_SHARED_CHARS", 100)
    monkeypatch.setattr(shared_strings, "_shared", {})
    monkeypatch.setattr(shared_strings, "_chars", 0)
    for n in range(50):  # a client sending a new string each time
        shared_strings.share({"instructions": f"{n:040d}"})
        assert shared_strings._chars <= 100 and len(shared_strings._shared) <= 2
    too_long = "x" * 101
    assert shared_strings.share(too_long) is too_long
    assert too_long not in shared_strings._shared
    kept = shared_strings.share("a" * 40)
    assert shared_strings.share("".join(["a"] * 40)) is kept
