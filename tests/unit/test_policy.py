import base64

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.edge.auth import hash_key
from relay.ops.config import CredentialConfig, DeploymentConfig, PolicyConfig, TeamConfig
from relay.session import codec
from relay.session.codec import FrameError, base64_size, delta_size, sniff_type
from relay.session.policy import (
    DOCUMENTED_CLIENT_EVENTS,
    LARGE_EVENT_BYTES,
    PolicyViolation,
    Rewritten,
    SessionPolicy,
    build_policy,
    event_id_of,
    with_prefix,
)
from relay.session.schema import get_path, merge_session, to_preview_session

KEYS = (hash_key("k"),)
DEFAULTS = {
    "instructions": "Be brief.",
    "audio": {
        "input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "transcription": {"model": "whisper-1"},
            "turn_detection": {"type": "server_vad"},
        },
        "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy"},
    },
}


def deployment(protocol="ga", **policy):
    return DeploymentConfig(
        "d",
        "https://r.openai.azure.com",
        CredentialConfig(),
        protocol=protocol,
        session=DEFAULTS,
        policy=PolicyConfig(**policy),
    )


def team(session=None, **policy):
    return TeamConfig("t", KEYS, ("d",), session=session or {}, policy=PolicyConfig(**policy))


def frame(event) -> bytes:
    return orjson.dumps(event)


def violation(policy: SessionPolicy, event, session=None) -> PolicyViolation:
    with pytest.raises(PolicyViolation) as info:
        policy.check_client_frame(frame(event), session or {})
    return info.value


def rewritten(policy: SessionPolicy, event, session=None) -> tuple[dict, tuple[str, ...]]:
    """The event as forwarded after correction, and the params corrected."""
    out = policy.check_client_frame(frame(event), session or {})
    assert isinstance(out, Rewritten), out
    return orjson.loads(out.frame), out.params


# --- codec -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b'{"type":"input_audio_buffer.append","audio":"AAAA"}', "input_audio_buffer.append"),
        (b'{"type": "response.create"}', "response.create"),
        (b'{"event_id":"e1","type":"session.update","session":{}}', "session.update"),
        (b'{"type":"a\\"b"}', 'a"b'),
        (b'{"type":"response.output_audio.delta","delta":"AAAA"}', "response.output_audio.delta"),
        (b'{"type":"response.output_audio.delta_x","delta":""}', "response.output_audio.delta_x"),
    ],
)
def test_sniff_type(raw, kind):
    assert sniff_type(raw) == kind


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"not json", "invalid_json"),
        (b"[1, 2]", "invalid_event"),
        (b'{"event_id": "x"}', "missing_event_type"),
        (b'{"type": 3}', "missing_event_type"),
        (b'{"type": ""}', "missing_event_type"),
    ],
)
def test_sniff_type_refuses_what_is_not_an_event(raw, code):
    with pytest.raises(FrameError) as info:
        sniff_type(raw)
    assert info.value.code == code


@pytest.mark.parametrize("size", [0, 1, 2, 3, 300, 301, 302])
def test_base64_size_without_decoding(size):
    audio = base64.b64encode(b"\x01" * size).decode()
    assert base64_size(frame({"type": "x", "audio": audio}), b"audio") == size
    spaced = f'{{"type": "x", "event_id": "audio", "audio" :  "{audio}"}}'.encode()
    assert base64_size(spaced, b"audio") == size
    escaped = f'{{"type": "x", "audio": "{audio}", "note": "\\""}}'.encode()
    assert base64_size(escaped, b"audio") == size


@pytest.mark.parametrize("size", [0, 1, 2, 3, 960, 961, 962])
def test_delta_size_as_azure_lays_a_delta_out_and_otherwise(size):
    delta = base64.b64encode(b"\x01" * size).decode()
    azure = (
        '{"type":"response.output_audio.delta","event_id":"e","response_id":"r","item_id":"i",'
        f'"output_index":0,"content_index":0,"delta":"{delta}"}}'
    ).encode()
    assert delta_size(azure) == size
    # Not last, or spaced: measured by base64_size's search.
    assert delta_size(frame({"delta": delta, "type": "response.output_audio.delta"})) == size
    spaced = f'{{"type": "response.output_audio.delta", "delta": "{delta}"}}'.encode()
    assert delta_size(spaced) == size
    assert delta_size(b'{"type":"response.output_audio.delta"}') == 0


def test_base64_size_when_absent():
    assert base64_size(b'{"type":"x"}', b"audio") == 0
    assert base64_size(b'{"type":"x","audio":3}', b"audio") == 0


# --- merging and dialects ----------------------------------------------------------------


def test_team_overrides_deployment():
    policy = build_policy(
        deployment(locked=("instructions",), max_violations=3),
        team({"audio": {"output": {"voice": "marin"}}}, max_violations=1),
    )
    assert policy.defaults["audio"]["output"]["voice"] == "marin"
    assert policy.defaults["audio"]["input"]["transcription"] == {"model": "whisper-1"}
    assert policy.defaults["type"] == "realtime"
    assert policy.locked == ("instructions",)
    assert policy.max_violations == 1


def test_preview_dialect_of_the_same_policy():
    policy = build_policy(
        deployment(
            "preview",
            locked=("audio.output.voice", "audio.input.transcription.model"),
            max_values={"max_output_tokens": 100},
            on_violation="refuse",
        ),
        team(),
    )
    assert policy.defaults == {
        "instructions": "Be brief.",
        "input_audio_format": "pcm16",
        "input_audio_transcription": {"model": "whisper-1"},
        "turn_detection": {"type": "server_vad"},
        "output_audio_format": "pcm16",
        "voice": "alloy",
        "max_response_output_tokens": 100,  # the cap, as no default set it
    }
    assert policy.locked == ("voice", "input_audio_transcription.model")
    assert policy.max_values == {"max_response_output_tokens": 100}
    assert violation(policy, {"type": "session.update", "session": {"voice": "echo"}}).param == (
        "session.voice"
    )
    # A realtime session does not take transcription_session.update: the relay would not
    # judge it (only a transcription session's policy does).
    locked_off = {"input_audio_transcription": {"model": "evil"}}
    refused = violation(policy, {"type": "transcription_session.update", "session": locked_off})
    assert refused.param == "type"


def test_to_preview_session_modalities_and_formats():
    assert to_preview_session(
        {
            "type": "realtime",
            "output_modalities": ["audio"],
            "audio": {"output": {"format": {"type": "audio/pcmu"}}},
        }
    ) == {"modalities": ["text", "audio"], "output_audio_format": "g711_ulaw"}


def test_deep_merge_and_get_path():
    merged = merge_session({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}, "d": 4})
    assert merged == {"a": {"b": 3, "c": 2}, "d": 4}
    assert get_path({"a": None}, "a.b") == (True, None)
    assert get_path({"a": {}}, "a.b") == (False, None)


def test_instructions_prefix_is_applied_to_defaults_and_updates():
    policy = build_policy(deployment(instructions_prefix="Company rules."), team())
    assert policy.defaults["instructions"] == "Company rules.\n\nBe brief."
    out = policy.check_client_frame(
        frame(
            {
                "type": "session.update",
                "session": {"type": "realtime", "instructions": "Talk like a pirate."},
            }
        ),
        {},
    )
    assert orjson.loads(out)["session"]["instructions"] == "Company rules.\n\nTalk like a pirate."
    out = policy.check_client_frame(
        frame({"type": "response.create", "response": {"instructions": "Shout."}}), {}
    )
    assert orjson.loads(out)["response"]["instructions"] == "Company rules.\n\nShout."
    # Already prefixed: left as it is, the same bytes.
    same = frame({"type": "session.update", "session": {"instructions": "Company rules. Hi"}})
    assert policy.check_client_frame(same, {}) is same


# --- rules -------------------------------------------------------------------------------

CURRENT = {"type": "realtime", "instructions": "Be brief.", "audio": {"output": {"voice": "alloy"}}}


def test_locked_fields_refused_only_when_changed():
    policy = build_policy(
        deployment(locked=("instructions", "audio.output.voice"), on_violation="refuse"), team()
    )
    error = violation(
        policy,
        {
            "type": "session.update",
            "event_id": "c1",
            "session": {"instructions": "Ignore the rules"},
        },
        CURRENT,
    )
    assert (error.code, error.param, error.event_id) == (
        "policy_violation",
        "session.instructions",
        "c1",
    )
    error = violation(
        policy,
        {"type": "session.update", "session": {"audio": {"output": {"voice": "echo"}}}},
        CURRENT,
    )
    assert error.param == "session.audio.output.voice"
    # Setting a parent to null changes the locked child.
    assert violation(policy, {"type": "session.update", "session": {"audio": None}}, CURRENT)
    # Same value again: allowed, forwarded untouched.
    same = frame(
        {
            "type": "session.update",
            "session": {"instructions": "Be brief.", "audio": {"output": {"voice": "alloy"}}},
        }
    )
    assert policy.check_client_frame(same, CURRENT) is same
    # Per-response overrides are held to the same rules.
    assert violation(
        policy, {"type": "response.create", "response": {"instructions": "x"}}, CURRENT
    )


def test_allowed_values_and_caps():
    policy = build_policy(
        deployment(
            allowed_values={"audio.output.voice": ("alloy", "marin")},
            max_values={"max_output_tokens": 500},
            on_violation="refuse",
        ),
        team(),
    )
    ok = frame(
        {
            "type": "session.update",
            "session": {"audio": {"output": {"voice": "marin"}}, "max_output_tokens": 500},
        }
    )
    assert policy.check_client_frame(ok, {}) is ok
    assert (
        violation(
            policy, {"type": "session.update", "session": {"audio": {"output": {"voice": "echo"}}}}
        ).param
        == "session.audio.output.voice"
    )
    assert (
        violation(policy, {"type": "session.update", "session": {"max_output_tokens": 501}}).param
        == "session.max_output_tokens"
    )
    assert violation(policy, {"type": "session.update", "session": {"max_output_tokens": "inf"}})
    assert violation(policy, {"type": "response.create", "response": {"max_output_tokens": 4096}})


# The whole default session an agent SDK sends on connect (openai-agents' shape).
AGENT_SESSION = {
    "type": "realtime",
    "model": "gpt-realtime",
    "instructions": "You are a weather bot.",
    "output_modalities": ["audio"],
    "audio": {
        "input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "transcription": {"model": "gpt-4o-mini-transcribe"},
            "turn_detection": {"type": "semantic_vad", "interrupt_response": True},
        },
        "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "ash"},
    },
    "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
    "tool_choice": "auto",
    "max_output_tokens": "inf",
}
IN_FORCE = {
    "type": "realtime",
    "instructions": "Be brief.",
    "max_output_tokens": "inf",
    "audio": {
        "input": {
            "transcription": {"model": "whisper-1", "language": None},
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 200},
        },
        "output": {"voice": "alloy"},
    },
}


def rewriting_policy(**rules):
    rules = {
        "locked": ("audio.input.transcription.model",),
        "allowed_values": {"audio.output.voice": ("alloy", "marin")},
        "max_values": {"max_output_tokens": 4096},
        **rules,
    }
    return build_policy(deployment(**rules), team())


def test_an_agent_session_is_corrected_and_keeps_everything_else():
    forwarded, params = rewritten(
        rewriting_policy(),
        {"type": "session.update", "event_id": "a1", "session": AGENT_SESSION},
        IN_FORCE,
    )
    session = forwarded["session"]
    assert params == (
        "session.audio.input.transcription.model",
        "session.audio.output.voice",
        "session.max_output_tokens",
    )
    assert session["audio"]["input"]["transcription"] == {"model": "whisper-1"}
    assert session["audio"]["output"]["voice"] == "alloy"
    assert session["max_output_tokens"] == 4096  # an integer, as the API wants
    # The rest of the agent's session goes through as it sent it.
    for key in ("instructions", "tools", "tool_choice", "output_modalities", "model"):
        assert session[key] == AGENT_SESSION[key]
    assert session["audio"]["input"]["turn_detection"] == {
        "type": "semantic_vad",
        "interrupt_response": True,
    }
    assert forwarded["event_id"] == "a1"


@pytest.mark.parametrize(
    ("event", "expected", "params"),
    [
        # A locked table's parent set to null is taken out (the service would drop it whole).
        (
            {"audio": None, "instructions": "Hi"},
            {"instructions": "Hi"},
            ("session.audio.input.transcription.model",),
        ),
        # Transcription off where it is on: the locked model would go with it.
        (
            {"audio": {"input": {"transcription": None}}},
            {"audio": {"input": {}}},
            ("session.audio.input.transcription.model",),
        ),
        ({"max_output_tokens": 5000}, {"max_output_tokens": 4096}, ("session.max_output_tokens",)),
        ({"max_output_tokens": None}, {"max_output_tokens": 4096}, ("session.max_output_tokens",)),
        (
            {"audio": {"output": {"voice": 3}}},
            {"audio": {"output": {"voice": "alloy"}}},
            ("session.audio.output.voice",),
        ),
    ],
)
def test_rewrites(event, expected, params):
    forwarded, got = rewritten(
        rewriting_policy(), {"type": "session.update", "session": event}, IN_FORCE
    )
    assert forwarded["session"] == expected
    assert got == params


def test_a_new_table_type_over_a_locked_field_is_taken_out():
    policy = build_policy(
        deployment(locked=("audio.input.turn_detection.silence_duration_ms",)), team()
    )
    event = {
        "type": "session.update",
        "session": {
            "instructions": "Hi",
            "audio": {"input": {"turn_detection": {"type": "semantic_vad"}}},
        },
    }
    forwarded, _ = rewritten(policy, event, IN_FORCE)
    assert forwarded["session"] == {"instructions": "Hi", "audio": {"input": {}}}
    # The same type, other fields: merged key by key, the locked one kept.
    same_type = {"audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 0.7}}}}
    raw = frame({"type": "session.update", "session": same_type})
    assert policy.check_client_frame(raw, IN_FORCE) is raw


def test_nothing_in_force_means_the_client_may_not_create_a_locked_field():
    policy = build_policy(deployment(locked=("audio.input.transcription.model",)), team())
    off = {"audio": {"input": {"transcription": None}}}
    forwarded, _ = rewritten(
        policy,
        {
            "type": "session.update",
            "session": {"audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}}},
        },
        off,
    )
    assert forwarded["session"] == {"audio": {"input": {"transcription": None}}}
    raw = frame({"type": "session.update", "session": off})
    assert policy.check_client_frame(raw, off) is raw


def test_response_overrides_are_corrected_and_null_means_unset():
    policy = rewriting_policy(locked=("instructions", "audio.input.transcription.model"))
    forwarded, params = rewritten(
        policy,
        {
            "type": "response.create",
            "response": {
                "instructions": "Shout.",
                "max_output_tokens": "inf",
                "audio": {"output": {"voice": "echo"}},
                "metadata": {"topic": "x"},
            },
        },
        IN_FORCE,
    )
    assert forwarded["response"] == {
        "instructions": "Be brief.",
        "max_output_tokens": 4096,
        "audio": {"output": {"voice": "alloy"}},
        "metadata": {"topic": "x"},
    }
    assert params == (
        "response.instructions",
        "response.audio.output.voice",
        "response.max_output_tokens",
    )
    # LiveKit's generate_reply(): nulls for what it leaves to the session.
    livekit = frame(
        {
            "type": "response.create",
            "response": {"instructions": None, "max_output_tokens": None, "audio": None},
        }
    )
    assert policy.check_client_frame(livekit, IN_FORCE) is livekit


def test_refuse_mode_refuses_what_rewrite_mode_corrects():
    policy = rewriting_policy(on_violation="refuse")
    error = violation(
        policy, {"type": "session.update", "event_id": "a1", "session": AGENT_SESSION}, IN_FORCE
    )
    assert (error.param, error.event_id) == ("session.audio.input.transcription.model", "a1")
    assert build_policy(deployment(), team()).on_violation == "rewrite"
    overridden = build_policy(deployment(on_violation="refuse"), team(on_violation="rewrite"))
    assert overridden.on_violation == "rewrite"


def test_the_prefix_applies_to_a_corrected_event():
    policy = rewriting_policy(instructions_prefix="Rules.")
    forwarded, _ = rewritten(
        policy,
        {"type": "session.update", "session": {"instructions": "Hi", "max_output_tokens": "inf"}},
        IN_FORCE,
    )
    assert forwarded["session"] == {"instructions": "Rules.\n\nHi", "max_output_tokens": 4096}


def test_event_allow_list():
    policy = build_policy(deployment(), team())
    assert policy.allowed_events == DOCUMENTED_CLIENT_EVENTS
    error = violation(policy, {"type": "transcription_session.update", "event_id": "e9"})
    assert (error.param, error.event_id) == ("type", "e9")
    narrow = build_policy(deployment(allowed_events=("input_audio_buffer.append",)), team())
    assert violation(narrow, {"type": "response.create"})


def test_malformed_events_are_refused_with_their_own_codes():
    policy = build_policy(deployment(), team())
    for raw, code in [
        (b"{", "invalid_json"),
        (b'"x"', "invalid_event"),
        (b"{}", "missing_event_type"),
    ]:
        with pytest.raises(PolicyViolation) as info:
            policy.check_client_frame(raw, {})
        assert info.value.code == code


def test_frame_and_append_size_limits():
    policy = build_policy(deployment(max_frame_bytes=2000, max_append_audio_bytes=960), team())
    small = frame(
        {"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\0" * 960).decode()}
    )
    assert policy.check_client_frame(small, {}) is small
    big = {
        "type": "input_audio_buffer.append",
        "event_id": "a1",
        "audio": base64.b64encode(b"\0" * 963).decode(),
    }
    error = violation(policy, big)
    assert (error.param, error.event_id) == ("audio", "a1")
    error = violation(
        policy, {"type": "conversation.item.create", "event_id": "x", "item": {"pad": "p" * 3000}}
    )
    assert error.event_id == "x"


def test_a_large_frame_over_the_size_is_refused_without_being_read():
    policy = build_policy(deployment(max_frame_bytes=300_000), team())
    # Crafted: a second, escaped `type` and a broken end, so reading it would parse all of it
    # (and refuse it as invalid JSON); over the size, it is refused for that alone.
    crafted = (
        b'{"event_id": "evt_big", "type": "conversation.item.create", "\\u0074ype": '
        + b"["
        + b'{"a":1},' * 40_000
        + b"!"
    )
    with pytest.raises(PolicyViolation) as info:
        policy.check_size(crafted)
    assert info.value.message.startswith(f"The event is {len(crafted)} bytes")
    assert info.value.event_id == "evt_big"  # found in its first 4 KiB, not by a parse
    # Under LARGE_EVENT_BYTES the event id is parsed as before. A large frame's id is also
    # found as its last member (the agents SDK's layout, `{...event, event_id}`), but not
    # as a nested object's last member, nor in its middle.
    assert event_id_of(b'{"type": "x", "event_id": "e\\u0031"}') == "e1"
    pad = b'"pad": "' + b"p" * LARGE_EVENT_BYTES + b'"'
    assert event_id_of(b'{"type": "x", ' + pad + b', "event_id": "e2"}\n') == "e2"
    assert event_id_of(b'{"type": "x", ' + pad + b', "m": {"event_id": "e3"}}') is None
    middle = b'{"type": "x", ' + pad + b', "event_id": "e4", ' + pad.replace(b"pad", b"p2") + b"}"
    assert event_id_of(middle) is None


def test_item_roles_outside_the_allowed_ones_are_refused():
    policy = build_policy(deployment(allowed_item_roles=("user", "assistant")), team())
    system = {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "x"}]}
    user = {**system, "role": "user"}
    error = violation(
        policy, {"type": "conversation.item.create", "event_id": "e1", "item": system}
    )
    assert (error.param, error.event_id, error.code) == ("item.role", "e1", "policy_violation")
    assert "'system'" in error.message
    ok = frame({"type": "conversation.item.create", "item": user})
    assert policy.check_client_frame(ok, {}) is ok
    # An out-of-band response's own input items, the same.
    error = violation(policy, {"type": "response.create", "response": {"input": [user, system]}})
    assert error.param == "response.input[1].role"
    ok = frame({"type": "response.create", "response": {"input": [user]}})
    assert policy.check_client_frame(ok, {}) is ok
    # Read as the upstream reads it: an escaped key is the same key.
    escaped = b'{"type":"conversation.item.create","item":{"type":"message","r\\u006fle":"system"}}'
    assert violation_of(policy, escaped).param == "item.role"
    assert policy.parses("conversation.item.create") and policy.parses("response.create")
    # Unset (the default): any role.
    anything = build_policy(deployment(), team())
    raw = frame({"type": "conversation.item.create", "item": system})
    assert anything.check_client_frame(raw, {}) is raw
    assert not anything.parses("conversation.item.create")


def violation_of(policy: SessionPolicy, raw: bytes) -> PolicyViolation:
    with pytest.raises(PolicyViolation) as info:
        policy.check_client_frame(raw, {})
    return info.value


def test_no_rules_means_frames_pass_untouched():
    policy = SessionPolicy()
    raw = frame({"type": "session.update", "session": {"instructions": "anything"}})
    assert policy.check_client_frame(raw, {}) is raw
    assert policy.defaults_event() is None


# --- property: no forwarded event changes a locked field -----------------------------------

LOCKED = ("instructions", "audio.output.voice", "tools", "audio.input.transcription.model")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
fragments = st.fixed_dictionaries(
    {},
    optional={
        "instructions": st.text(max_size=10) | json_values,
        "tools": json_values,
        "audio": st.fixed_dictionaries(
            {},
            optional={
                "output": st.fixed_dictionaries(
                    {}, optional={"voice": st.sampled_from(["alloy", "echo"]) | json_values}
                )
                | json_values,
                "input": st.fixed_dictionaries(
                    {},
                    optional={
                        "transcription": st.fixed_dictionaries(
                            {}, optional={"model": st.text(max_size=5)}
                        )
                        | json_values
                    },
                ),
            },
        )
        | json_values,
        "max_output_tokens": st.integers(1, 5000) | st.sampled_from(["inf", None]),
    },
)


@given(
    fragment=fragments,
    kind=st.sampled_from(["session.update", "response.create"]),
    prefix=st.sampled_from(["", "P."]),
    mode=st.sampled_from(["rewrite", "refuse"]),
)
def test_forwarded_events_never_change_a_locked_field(fragment, kind, prefix, mode):
    policy = build_policy(
        deployment(
            locked=LOCKED,
            max_values={"max_output_tokens": 4096},
            instructions_prefix=prefix or None,
            on_violation=mode,
        ),
        team(),
    )
    current = {
        # In force, the instructions carry the prefix (defaults and updates get it).
        "instructions": with_prefix(prefix, "Be brief."),
        "tools": [],
        "max_output_tokens": 4096,
        "audio": {"output": {"voice": "alloy"}, "input": {"transcription": {"model": "whisper-1"}}},
    }
    key = "session" if kind == "session.update" else "response"
    try:
        out = policy.check_client_frame(frame({"type": kind, key: fragment}), current)
    except PolicyViolation:
        assert mode == "refuse"  # rewriting corrects every such event instead
        return
    forwarded = orjson.loads(out.frame if isinstance(out, Rewritten) else out)[key]
    if kind == "session.update":
        effective = merge_session(current, forwarded)  # as the upstream applies it
        for path in LOCKED:
            assert get_path(effective, path)[1] == get_path(current, path)[1], path
    else:
        for path in LOCKED:
            present, value = get_path(forwarded, path)
            if present and value is not None:  # null: unset, the session's value applies
                assert value == get_path(current, path)[1], path
    present, tokens = get_path(forwarded, "max_output_tokens")
    if present and (kind == "session.update" or tokens is not None):
        assert isinstance(tokens, int) and tokens <= 4096


def test_a_cap_on_max_output_tokens_becomes_the_default_when_none_is_set():
    # The service's own default is "inf": without this, a client that never sets it runs
    # uncapped.
    policy = build_policy(deployment(max_values={"max_output_tokens": 1024}), team())
    assert policy.defaults["max_output_tokens"] == 1024
    preview = build_policy(deployment("preview", max_values={"max_output_tokens": 1024}), team())
    assert preview.defaults["max_response_output_tokens"] == 1024
    chosen = build_policy(
        deployment(max_values={"max_output_tokens": 1024}), team(session={"max_output_tokens": 500})
    )
    assert chosen.defaults["max_output_tokens"] == 500


# --- writing back what the strict parse accepted -------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"x","n":123456789012345678901234567890}',
        '{"type":"x","s":"\\ud800"}',
        '{"type":"x","deep":' + "[" * 300 + "]" * 300 + "}",
    ],
    ids=["integer_past_64_bits", "lone_surrogate", "nested_past_254"],
)
def test_what_only_json_reads_is_written_back_as_json_reads_it(text):
    event = codec.parse_event_strict(text.encode())
    written = codec.dump_json(event)
    assert codec.parse_event_strict(written) == event
    # orjson reads an integer past 64 bits as the nearest float; the rest exactly.
    assert codec.load_json(written).keys() == codec.load_event(text.encode()).keys() == event.keys()


def test_an_event_past_pythons_recursion_limit_is_refused_not_a_crash():
    with pytest.raises(codec.FrameError) as info:
        codec.dump_json({"deep": nested(5_000)})
    assert info.value.code == "invalid_event"


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("frame", "code"),
    [(b'{"type":"session.update","session":{', "invalid_json"), (b"[1]", "invalid_event")],
)
def test_an_unparsed_frame_parsed_to_be_changed_is_refused_cleanly(frame, code):
    with pytest.raises(codec.FrameError) as info:
        codec.load_event(frame)
    assert info.value.code == code


@pytest.mark.parametrize("number", ["1e400", "-1E400", "1" + "0" * 400, "-" + "9" * 400])
def test_a_number_past_a_doubles_range_is_invalid_json_as_the_service_reads_it(number):
    """json reads it as infinity (orjson, and the service, refuse it): judged as that and
    written back, it reached the upstream as null."""
    text = '{"type":"x","s":"\\ud800","n":' + number + "}"  # the surrogate: past orjson
    with pytest.raises(codec.FrameError) as refused:
        codec.parse_event_strict(text.encode())
    assert refused.value.code == "invalid_json" and "infinity" in str(refused.value)
    with pytest.raises(ValueError):
        codec.load_json(text.encode())
