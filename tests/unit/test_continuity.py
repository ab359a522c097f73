"""Continuity's pure core: settings, the shadow conversation, replay plans. No sockets."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from relay.errors import ConfigError
from relay.ops.config import parse_config
from relay.session.continuity import (
    DEFAULT_MAX_REPLAY_AUDIO_SECONDS,
    KEEP_SPEAKING_NOTE,
    ContinuitySettings,
    ShadowConversation,
    answers_turns,
    build_continuity,
    cut_response_done,
    emptying_frames,
    estimate_tokens,
    manual_turns,
    plan_delta,
    plan_replay,
    replay_item,
    session_update,
    speaks,
    spoken_reply,
)

HASH = "sha256:" + "a" * 64


def config(deployment: dict[str, Any] | None = None, team: dict[str, Any] | None = None) -> Any:
    return parse_config(
        {
            "deployments": {
                "d": {
                    "endpoint": "https://r.openai.azure.com",
                    "credential": {"env": "K"},
                    **({"continuity": deployment} if deployment is not None else {}),
                }
            },
            "teams": {
                "t": {
                    "keys": [HASH],
                    "deployments": ["d"],
                    **({"continuity": team} if team is not None else {}),
                }
            },
        },
        source="relay.toml",
    )


def settings_of(deployment: Any = None, team: Any = None) -> ContinuitySettings | None:
    c = config(deployment, team)
    return build_continuity(c.deployments["d"], c.teams["t"])


# --- settings --------------------------------------------------------------------------------


def test_off_unless_enabled():
    assert settings_of() is None
    assert settings_of({"renew_before_seconds": 60}) is None


def test_team_over_deployment_over_defaults():
    assert settings_of({"enabled": True}) == ContinuitySettings()
    got = settings_of(
        {"enabled": True, "renew_before_seconds": 120, "on_upstream_loss": "close"},
        {"max_replay_tokens": 500},
    )
    assert got == ContinuitySettings(120.0, 500, "close", "ga")
    assert settings_of({"enabled": True}, {"enabled": False}) is None
    assert settings_of(None, {"enabled": True}) == ContinuitySettings()


def test_audio_replay_is_accepted_with_its_memory_bound():
    got = settings_of({"enabled": True, "replay": "audio"}, {"max_replay_audio_seconds": 30})
    assert got is not None and got.replay == "audio" and got.max_replay_audio_seconds == 30.0
    default = settings_of({"enabled": True, "replay": "audio"})
    assert default is not None
    assert default.max_replay_audio_seconds == DEFAULT_MAX_REPLAY_AUDIO_SECONDS


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"renew_before_seconds": 0}, "renew_before_seconds must be greater than 0"),
        ({"max_replay_tokens": -1}, "max_replay_tokens must be greater than 0"),
        ({"max_replay_audio_seconds": 0}, "max_replay_audio_seconds must be greater than 0"),
        ({"replay": "video"}, "must be one of 'text', 'audio'"),
        ({"on_upstream_loss": "retry"}, "must be one of 'resume', 'close'"),
        ({"enabled": "yes"}, "must be true or false"),
        ({"renew_after": 3}, "unknown key"),
    ],
)
def test_bad_settings_are_reported(values, message):
    with pytest.raises(ConfigError) as info:
        config(values)
    assert any(message in p and "deployments.d.continuity" in p for p in info.value.problems)


# --- the shadow ----------------------------------------------------------------------------


def user_text(item_id: str, text: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "role": "user",
        "status": "completed",
        "content": [{"type": "input_text", "text": text}],
    }


def user_audio(item_id: str, transcript: str | None = None) -> dict[str, Any]:
    part = {"type": "input_audio", "transcript": transcript}
    return {"id": item_id, "type": "message", "role": "user", "content": [part]}


def assistant(item_id: str, transcript: str) -> dict[str, Any]:
    part = {"type": "output_audio", "transcript": transcript}
    return {"id": item_id, "type": "message", "role": "assistant", "content": [part]}


LAST = "<the last item>"  # as the service reports an item added at the end


def added(item: dict[str, Any], previous: str | None = LAST) -> tuple[str, dict[str, Any]]:
    return "conversation.item.added", {"item": item, "previous_item_id": previous}


def shadow_of(*events: tuple[str, dict[str, Any]]) -> ShadowConversation:
    shadow = ShadowConversation()
    for kind, event in events:
        if event.get("previous_item_id") == LAST:
            event = {**event, "previous_item_id": shadow.order[-1] if shadow.order else None}
        shadow.observe(kind, event)
    return shadow


def created_items(frames: tuple[bytes, ...] | list[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(f) for f in frames]


def test_items_follow_the_upstream_events():
    shadow = shadow_of(
        added(user_text("u1", "hi")),
        added(user_audio("u2"), "u1"),
        ("conversation.item.input_audio_transcription.completed",
         {"item_id": "u2", "content_index": 0, "transcript": "what time is it"}),
        ("response.output_item.done", {"item": assistant("a1", "It is noon.")}),
        added(user_text("u0", "first"), None),  # put at "root": a null previous item
        added(user_text("u1b", "between"), "u1"),
    )  # fmt: skip
    assert shadow.order == ["u0", "u1", "u1b", "u2", "a1"]
    assert shadow.items["u2"].wire["content"][0]["transcript"] == "what time is it"


def test_a_later_report_keeps_a_transcript_that_came_first():
    shadow = shadow_of(
        added(user_audio("u1")),
        ("conversation.item.input_audio_transcription.completed",
         {"item_id": "u1", "content_index": 0, "transcript": "hello"}),
        ("conversation.item.done", {"item": user_audio("u1")}),
    )  # fmt: skip
    assert shadow.items["u1"].wire["content"][0]["transcript"] == "hello"


def test_deletions_and_truncations_are_honoured():
    shadow = shadow_of(
        added(user_text("u1", "hi")),
        ("response.output_item.done", {"item": assistant("a1", "A long answer nobody heard")}),
        added(user_text("u2", "bye")),
        ("conversation.item.truncated", {"item_id": "a1", "content_index": 0, "audio_end_ms": 0}),
        ("conversation.item.deleted", {"item_id": "u1"}),
    )
    assert shadow.order == ["a1", "u2"]
    plan = plan_replay(shadow, flavour="ga", max_tokens=8000, note_id=None)
    # The truncated answer has no text left: it keeps its place, empty (a client refers to
    # it: a history edit next to it failed when it was left out).
    assert plan.item_ids == ("a1", "u2")
    assert created_items(plan.frames)[0]["item"]["content"] == [{"type": "output_text", "text": ""}]


def test_quiet_only_when_nothing_is_in_flight():
    shadow = ShadowConversation()
    assert shadow.quiet
    shadow.observe("response.created", {"response": {"id": "r1"}})
    assert not shadow.quiet and shadow.response_id == "r1"
    shadow.observe("response.done", {"response": {"id": "r1"}})
    shadow.observe("input_audio_buffer.speech_started", {})
    assert not shadow.quiet
    shadow.observe("input_audio_buffer.speech_stopped", {})
    assert shadow.quiet
    call = {"id": "f1", "type": "function_call", "status": "completed", "call_id": "c1",
            "name": "lookup", "arguments": "{}"}  # fmt: skip
    shadow.observe("response.output_item.done", {"item": call})
    assert not shadow.quiet  # the client owes the output
    output = {"id": "o1", "type": "function_call_output", "call_id": "c1", "output": "42"}
    shadow.observe(*added(output))
    assert shadow.quiet


def test_a_deleted_call_waits_for_no_output():
    """A client that deletes a call it will not answer: the call held off every switch for
    the rest of the session (no quiet point, then the session expired)."""
    call = {"id": "f1", "type": "function_call", "status": "completed", "call_id": "c1",
            "name": "lookup", "arguments": "{}"}  # fmt: skip
    shadow = shadow_of(("response.output_item.done", {"item": call}))
    assert not shadow.quiet
    shadow.observe("conversation.item.deleted", {"item_id": "f1"})
    assert shadow.quiet


def test_manual_turns_are_a_session_without_turn_detection():
    assert manual_turns({"audio": {"input": {"turn_detection": None}}}, "ga")
    assert not manual_turns({"audio": {"input": {"turn_detection": {"type": "server_vad"}}}}, "ga")
    assert not manual_turns({"audio": {"input": {}}}, "ga")  # not said: the service's default
    assert manual_turns({"turn_detection": None}, "preview")
    assert not manual_turns({}, "preview")


def test_the_service_answers_turns_its_turn_detection_ends_unless_told_not_to():
    vad = {"type": "server_vad"}
    assert answers_turns({"audio": {"input": {"turn_detection": vad}}}, "ga")
    off = {**vad, "create_response": False}
    assert not answers_turns({"audio": {"input": {"turn_detection": off}}}, "ga")
    assert not answers_turns({"audio": {"input": {"turn_detection": None}}}, "ga")
    assert answers_turns({"turn_detection": {"type": "semantic_vad"}}, "preview")


def test_an_image_counts_as_an_image_not_as_its_data_url():
    """A 60 KB photo was estimated at 20,000 tokens, and the whole history before it was
    dropped from the replay."""
    url = "data:image/png;base64," + "A" * 82_000
    image = {"id": "u1", "type": "message", "role": "user",
             "content": [{"type": "input_image", "image_url": url},
                         {"type": "input_image", "image_url": url, "detail": "low"},
                         {"type": "input_text", "text": "What is this?"}]}  # fmt: skip
    assert 765 + 85 < estimate_tokens(image) < 765 + 85 + 30


def test_an_out_of_band_responses_output_is_never_replayed_into_the_conversation():
    """Out-of-band output (`conversation: "none"`, a classification) was replayed into the
    conversation at the next switch: the model saw it, and the client got it as a
    `previous_item_id` it had never seen added."""
    oob = {"id": "r2", "conversation_id": None}
    shadow = shadow_of(
        added(user_text("u1", "hi")),
        ("response.created", {"response": {"id": "r1", "conversation_id": "conv_1"}}),
        ("response.output_item.done", {"response_id": "r1", "item": assistant("a1", "Hello.")}),
        ("response.done", {"response": {"id": "r1"}}),
        ("response.created", {"response": oob}),
        ("response.output_item.done", {"response_id": "r2", "item": assistant("x1", "billing")}),
        ("response.done", {"response": oob}),
    )  # fmt: skip
    assert shadow.order == ["u1", "a1"] and shadow.quiet and not shadow.out_of_band


def test_nothing_to_replay_needs_no_note():
    """The note to keep speaking, with no earlier turn after it, was the first item a client
    saw its own next item placed after (`previous_item_id`), and billed as input."""
    plan = plan_replay(ShadowConversation(), flavour="ga", max_tokens=8000, note_id="relay_note_x")
    assert plan.frames == () and plan.item_ids == () and plan.tokens == 0


# --- replay ----------------------------------------------------------------------------------


def test_replay_keeps_ids_order_and_previous_item_ids():
    call = {"id": "f1", "type": "function_call", "status": "completed", "call_id": "c1",
            "name": "lookup", "arguments": '{"q":1}'}  # fmt: skip
    output = {"id": "o1", "type": "function_call_output", "call_id": "c1", "output": "42"}
    shadow = shadow_of(
        added(user_audio("u1", "what is six times seven")),
        ("response.output_item.done", {"item": call}),
        added(output),
        ("response.output_item.done", {"item": assistant("a1", "Forty-two.")}),
        added({"id": "s1", "type": "message", "role": "system",
               "content": [{"type": "input_text", "text": "be brief"}]}),
    )  # fmt: skip
    plan = plan_replay(shadow, flavour="ga", max_tokens=8000, note_id="relay_note_x")
    events = created_items(plan.frames)
    assert [e["item"]["id"] for e in events] == ["relay_note_x", "u1", "f1", "o1", "a1", "s1"]
    assert [e.get("previous_item_id") for e in events] == [None, "relay_note_x", "u1", "f1", "o1", "a1"]  # fmt: skip
    assert {e["type"] for e in events} == {"conversation.item.create"}
    note, user, fcall, fout, answer, system = (e["item"] for e in events)
    assert note == {"id": "relay_note_x", "type": "message", "role": "system",
                    "content": [{"type": "input_text", "text": KEEP_SPEAKING_NOTE}]}  # fmt: skip
    assert user["content"] == [{"type": "input_text", "text": "what is six times seven"}]
    assert fcall == {"id": "f1", "type": "function_call", "name": "lookup", "call_id": "c1",
                     "arguments": '{"q":1}'}  # fmt: skip
    assert fout == {"id": "o1", "type": "function_call_output", "call_id": "c1", "output": "42"}
    assert answer["content"] == [{"type": "output_text", "text": "Forty-two."}]
    assert system["content"] == [{"type": "input_text", "text": "be brief"}]
    assert plan.tokens == sum(estimate_tokens(e["item"]) for e in events)


def test_preview_assistant_text_and_untranscribed_audio():
    assert replay_item(assistant("a1", "hi"), "preview") == {
        "id": "a1", "type": "message", "role": "assistant",
        "content": [{"type": "text", "text": "hi"}],
    }  # fmt: skip
    assert replay_item(user_audio("u1"), "ga") is None  # no transcript: nothing to say


def test_the_oldest_items_are_dropped_first_within_the_budget():
    shadow = shadow_of(*(added(user_text(f"u{i}", "x" * 40)) for i in range(10)))
    one = estimate_tokens(replay_item(shadow.items["u0"].wire, "ga") or {})
    plan = plan_replay(shadow, flavour="ga", max_tokens=3 * one + 1, note_id=None)
    assert plan.item_ids == ("u7", "u8", "u9") and plan.dropped == 7
    assert "previous_item_id" not in created_items(plan.frames)[0]


def test_a_new_session_keeps_only_what_it_holds_so_the_shadow_does_not_grow():
    """After a switch, items left out of the replay are gone from the conversation: the
    shadow forgets them (before, it kept every item across every renewal)."""
    shadow = shadow_of(*(added(user_text(f"u{i}", "x" * 40)) for i in range(10)))
    one = estimate_tokens(replay_item(shadow.items["u0"].wire, "ga") or {})
    plan = plan_replay(shadow, flavour="ga", max_tokens=3 * one + 1, note_id=None)
    assert shadow.keep_only(set(plan.item_ids)) == [f"u{i}" for i in range(7)]
    assert shadow.order == ["u7", "u8", "u9"] and list(shadow.items) == shadow.order
    assert shadow.keep_only(set(plan.item_ids)) == []


def test_a_tool_output_goes_with_its_dropped_call():
    call = {"id": "f1", "type": "function_call", "status": "completed", "call_id": "c1",
            "name": "lookup", "arguments": "x" * 400}  # fmt: skip
    output = {"id": "o1", "type": "function_call_output", "call_id": "c1", "output": "ok"}
    shadow = shadow_of(("response.output_item.done", {"item": call}), added(output),
                       added(user_text("u1", "thanks")))  # fmt: skip
    plan = plan_replay(shadow, flavour="ga", max_tokens=40, note_id=None)
    assert plan.item_ids == ("u1",)


def test_delta_creates_what_arrived_after_the_plan_and_deletes_what_went():
    shadow = shadow_of(added(user_text("u1", "a")), added(user_text("u2", "b")))
    plan = plan_replay(shadow, flavour="ga", max_tokens=8000, note_id="relay_note_n")
    shadow.observe(*added(user_text("u3", "c"), "u2"))
    shadow.observe("conversation.item.deleted", {"item_id": "u1"})
    frames, created = plan_delta(shadow, plan.seq, set(plan.item_ids), "ga")
    assert created == ["u3"]
    events = created_items(frames)
    assert events[0]["previous_item_id"] == "u2" and events[0]["item"]["id"] == "u3"
    assert events[1] == {"type": "conversation.item.delete", "item_id": "u1"}
    assert len(events) == 2  # the note stays


def test_delta_replays_again_what_changed_after_the_plan_in_its_place():
    """A truncate while the renewal was prepared left the whole reply in the new upstream's
    replay (the user heard 2 s of it); a transcript that came late left its turn out."""
    shadow = shadow_of(
        added(assistant("a1", "A long story about a dragon.")),
        added(user_audio("u1")),  # its transcript still to come
        added(user_text("u2", "and then?")),
        added(assistant("a2", "Then it flew.")),
    )
    plan = plan_replay(shadow, flavour="ga", max_tokens=8000, note_id="relay_note_n")
    assert "u1" not in plan.item_ids
    shadow.observe("conversation.item.truncated", {"item_id": "a1", "content_index": 0})
    shadow.observe("conversation.item.input_audio_transcription.completed",
                   {"item_id": "u1", "content_index": 0, "transcript": "tell me more"})  # fmt: skip
    shadow.observe(*added(assistant("a2", "Then it flew.")))  # the same, reported again
    frames, created = plan_delta(shadow, plan.seq, {*plan.item_ids}, "ga")
    assert created == ["a1", "u1"]
    events = created_items(frames)
    assert events[0] == {"type": "conversation.item.delete", "item_id": "a1"}
    assert events[1]["previous_item_id"] == "relay_note_n"  # where it was: after the note
    assert events[1]["item"]["content"] == [{"type": "output_text", "text": ""}]
    assert events[2]["previous_item_id"] == "a1" and events[2]["item"]["id"] == "u1"
    assert events[2]["item"]["content"] == [{"type": "input_text", "text": "tell me more"}]
    assert len(events) == 3


def test_delta_keeps_a_first_item_first_and_replaces_an_item_made_again():
    """Made after the plan, an item with none before it in the shadow (put at root) went to
    the end; one deleted and made again under its id kept its old copy upstream."""
    shadow = shadow_of(added(user_text("u1", "a")), added(user_text("v", "old")))
    plan = plan_replay(shadow, flavour="ga", max_tokens=8000, note_id="relay_note_n")
    shadow.observe(*added(user_text("u0", "first"), None))
    shadow.observe("conversation.item.deleted", {"item_id": "v"})
    shadow.observe(*added(user_text("v", "new"), "u1"))
    frames, created = plan_delta(shadow, plan.seq, {*plan.item_ids}, "ga")
    assert created == ["u0", "v"]
    events = created_items(frames)
    assert events[0]["previous_item_id"] == "relay_note_n" and events[0]["item"]["id"] == "u0"
    assert events[1] == {"type": "conversation.item.delete", "item_id": "v"}
    assert events[2]["previous_item_id"] == "u1"
    assert events[2]["item"]["content"] == [{"type": "input_text", "text": "new"}]
    assert len(events) == 3


def test_session_update_puts_the_session_in_force_without_read_only_fields():
    session = {"id": "sess_1", "object": "realtime.session", "expires_at": 9, "model": "m",
               "type": "realtime", "output_modalities": ["audio"], "instructions": "hi",
               "audio": {"output": {"voice": "marin"}}}  # fmt: skip
    event = orjson.loads(session_update(session, "ga"))
    assert event["type"] == "session.update"
    assert event["session"] == {"type": "realtime", "output_modalities": ["audio"],
                                "instructions": "hi", "audio": {"output": {"voice": "marin"}}}  # fmt: skip
    preview = orjson.loads(session_update({"id": "s", "modalities": ["text"]}, "preview"))
    assert preview["session"] == {"modalities": ["text"]}
    assert speaks(session) and not speaks({"output_modalities": ["text"]})
    assert speaks({"modalities": ["text", "audio"]})


def test_a_cut_response_is_reported_failed():
    event = orjson.loads(cut_response_done("resp_1", "relay_e"))
    assert event["type"] == "response.done" and event["response"]["id"] == "resp_1"
    assert event["response"]["status"] == "failed"
    assert event["response"]["status_details"]["error"]["code"] == "upstream_lost"


# --- a truncate of a reply replayed as text -------------------------------------------------


@pytest.mark.parametrize("flavour", ["ga", "preview"])
def test_a_replayed_reply_is_emptied_in_place_with_its_id(flavour):
    shadow = shadow_of(
        added(user_text("u1", "hi")),
        added(assistant("a1", "Hello there, how can I help?")),
        added(user_text("u2", "nothing")),
        added(assistant("a2", "Fine.")),
    )
    assert spoken_reply(shadow.items["a1"].wire) and not spoken_reply(shadow.items["u1"].wire)
    edits = emptying_frames(shadow, "a2", 0, first="relay_note_1", flavour=flavour, event_id="e")
    assert edits is not None
    delete, create = created_items(edits)
    assert delete == {"type": "conversation.item.delete", "event_id": "e", "item_id": "a2"}
    assert create["previous_item_id"] == "u2"  # where it was
    text = "output_text" if flavour == "ga" else "text"
    assert create["item"] == {
        "id": "a2", "type": "message", "role": "assistant", "content": [{"type": text, "text": ""}]
    }  # fmt: skip
    # The first the shadow holds goes after the replay's note, or at the root without one.
    shadow = shadow_of(added(assistant("a0", "First.")))
    for first, previous in (("relay_note_1", "relay_note_1"), (None, "root")):
        edits = emptying_frames(shadow, "a0", 0, first=first, flavour=flavour, event_id="e")
        assert edits is not None
        assert created_items(edits)[1]["previous_item_id"] == previous
    # Nothing to empty: an index out of range, an unknown item.
    assert emptying_frames(shadow, "a0", 1, first=None, flavour=flavour, event_id="e") is None
    assert emptying_frames(shadow, "zz", 0, first=None, flavour=flavour, event_id="e") is None
