"""Audio replay's keeper and plans with audio: pure, no sockets."""

from __future__ import annotations

import base64
import random
from typing import Any

import orjson

from relay.session.audio_keeper import IDLE_KEEP_SECONDS, AudioKeeper, Piece, join_base64
from relay.session.codec import read_client_frame
from relay.session.continuity import (
    ShadowConversation,
    audio_tokens,
    estimate_tokens,
    plan_delta,
    plan_replay,
    replay_item,
)

MANUAL = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}
VAD = {"type": "realtime", "audio": {"input": {"turn_detection": {"type": "server_vad"}}}}
ULAW = {"audio": {"input": {"format": {"type": "audio/pcmu"}, "turn_detection": None}}}
MS = 48  # bytes of 24 kHz PCM16 a millisecond


def pcm(ms: int, fill: int) -> bytes:
    return bytes([fill]) * (ms * MS)


def append(keeper: AudioKeeper, raw: bytes, frame: bytes | None = None) -> None:
    """Through the codec, as the pump does: the hook gets the frame and the size it found."""
    if frame is None:
        audio = base64.b64encode(raw).decode()
        frame = orjson.dumps({"type": "input_audio_buffer.append", "audio": audio})
    kind, _, size = read_client_frame(frame)
    keeper.client_event(kind, frame, size)


def client(keeper: AudioKeeper, kind: str) -> None:
    keeper.client_event(f"input_audio_buffer.{kind}", b"{}", 0)


def upstream(keeper: AudioKeeper, kind: str, session: Any = MANUAL, **event: Any) -> None:
    keeper.observe(kind, event, session)


def committed(keeper: AudioKeeper, item_id: str, session: Any = MANUAL) -> None:
    upstream(keeper, "input_audio_buffer.committed", session, item_id=item_id)


def kept(keeper: AudioKeeper, item_id: str) -> bytes | None:
    audio = keeper.audio_of(item_id)
    return None if audio is None else base64.b64decode(audio, validate=True)


def keeper_for(session: Any = MANUAL, seconds: float = 60.0) -> AudioKeeper:
    keeper = AudioKeeper(seconds)
    keeper.configure(session)
    return keeper


def test_a_commit_takes_what_was_appended_since_the_last_one():
    keeper = keeper_for()
    append(keeper, pcm(100, 1))
    append(keeper, pcm(60, 2))
    client(keeper, "commit")
    append(keeper, pcm(40, 3))  # after the commit: the next turn's, though sent before the answer
    committed(keeper, "u1")
    client(keeper, "commit")
    committed(keeper, "u2")
    assert kept(keeper, "u1") == pcm(100, 1) + pcm(60, 2)
    assert kept(keeper, "u2") == pcm(40, 3)
    assert keeper.pending_bytes == 0 and keeper.kept_bytes == 200 * MS


def test_a_clear_drops_the_pending_audio_and_a_commit_that_took_nothing_is_skipped():
    keeper = keeper_for()
    append(keeper, pcm(100, 1))
    client(keeper, "clear")
    append(keeper, pcm(50, 2))
    client(keeper, "commit")  # refused upstream (buffer too small): the audio stays
    append(keeper, pcm(100, 3))
    client(keeper, "commit")
    upstream(keeper, "input_audio_buffer.cleared")
    upstream(keeper, "error", error={"code": "input_audio_buffer_commit_empty"})
    committed(keeper, "u1")
    assert kept(keeper, "u1") == pcm(50, 2) + pcm(100, 3)


def test_server_vad_spans_cut_the_turn_out_of_the_buffer():
    keeper = keeper_for(VAD)
    append(keeper, pcm(200, 0))  # silence
    append(keeper, pcm(300, 1))  # speech from 200 ms
    append(keeper, pcm(300, 0))  # silence; speech stopped at 700 ms
    upstream(keeper, "input_audio_buffer.speech_started", VAD, item_id="u1", audio_start_ms=100)
    upstream(keeper, "input_audio_buffer.speech_stopped", VAD, item_id="u1", audio_end_ms=700)
    committed(keeper, "u1", VAD)
    assert kept(keeper, "u1") == pcm(100, 0) + pcm(300, 1) + pcm(200, 0)
    # The rest stays in the buffer: the next turn can start in it.
    append(keeper, pcm(100, 2))
    upstream(keeper, "input_audio_buffer.speech_started", VAD, item_id="u2", audio_start_ms=750)
    client(keeper, "commit")  # committed by hand during speech: no speech_stopped
    committed(keeper, "u2", VAD)
    assert kept(keeper, "u2") == pcm(50, 0) + pcm(100, 2)


def test_a_vad_idle_timeout_commits_the_span_it_reports():
    keeper = keeper_for(VAD)
    append(keeper, pcm(600, 0))
    upstream(
        keeper, "input_audio_buffer.timeout_triggered", VAD,
        item_id="u1", audio_start_ms=100, audio_end_ms=500,
    )  # fmt: skip
    committed(keeper, "u1", VAD)
    assert kept(keeper, "u1") == pcm(400, 0)


def test_the_oldest_items_audio_is_dropped_first_when_over_the_bound():
    keeper = keeper_for(seconds=1.0)
    for n in range(4):
        append(keeper, pcm(300, n))
        client(keeper, "commit")
        committed(keeper, f"u{n}")
    assert list(keeper.items) == ["u1", "u2", "u3"]  # 1.2 s > 1 s: u0 went
    assert kept(keeper, "u0") is None and kept(keeper, "u3") == pcm(300, 3)
    append(keeper, pcm(500, 9))  # pending audio counts too
    assert list(keeper.items) == ["u3"]
    assert keeper.kept_bytes + keeper.pending_bytes <= keeper.max_bytes


def test_padded_appends_hold_their_audio_not_their_padding():
    """A frame padded with whitespace (or a long event_id) beside a little audio: only the
    base64 is kept, so the bound in seconds is a bound in memory."""
    keeper = keeper_for()
    audio = base64.b64encode(pcm(10, 1)).decode()
    padded = b'{"type":"input_audio_buffer.append","audio":"%s"%s}' % (
        audio.encode(),
        b" " * 1_000_000,
    )
    for _ in range(50):
        append(keeper, b"", padded)
    held = sum(len(frame) for frame, *_ in keeper.pending)
    assert held == 50 * len(audio)  # not 50 MB of padding
    client(keeper, "commit")
    committed(keeper, "u1")
    assert kept(keeper, "u1") == pcm(10, 1) * 50


def test_tiny_appends_are_bounded_by_what_they_hold_not_only_by_their_seconds():
    """Appends of 3 bytes each: 60 s of them would be 960,000 chunks. What they hold in
    memory, overhead included, stays within twice the bound's decoded size."""
    keeper = keeper_for(seconds=1.0)
    for _ in range(40_000):
        append(keeper, b"\x01\x02\x03")
    assert keeper.pending_bytes < keeper.max_bytes  # seconds alone would keep them all
    assert keeper.pending_held <= keeper.max_held == 2 * keeper.max_bytes
    assert keeper.shed_to > 0
    client(keeper, "commit")
    committed(keeper, "u1")
    assert kept(keeper, "u1") is None  # partly shed before its commit: its transcript


def test_a_turn_longer_than_the_bound_keeps_no_audio():
    keeper = keeper_for(seconds=0.5)
    for _ in range(8):
        append(keeper, pcm(100, 1))
    client(keeper, "commit")
    committed(keeper, "u1")
    assert kept(keeper, "u1") is None and keeper.pending_bytes == 0


def test_between_utterances_vad_keeps_only_a_few_seconds():
    keeper = keeper_for(VAD)
    for _ in range(100):
        append(keeper, pcm(100, 0))  # 10 s of silence
    assert keeper.pending_bytes <= IDLE_KEEP_SECONDS * 1000 * MS
    upstream(keeper, "input_audio_buffer.speech_started", VAD, item_id="u1", audio_start_ms=9800)
    for _ in range(70):
        append(keeper, pcm(100, 1))  # 7 s of speech: not shed while it lasts
    upstream(keeper, "input_audio_buffer.speech_stopped", VAD, item_id="u1", audio_end_ms=17000)
    committed(keeper, "u1", VAD)
    assert kept(keeper, "u1") == pcm(200, 0) + pcm(7000, 1)


def test_a_deleted_item_drops_its_audio_and_a_new_session_starts_at_zero():
    keeper = keeper_for()
    append(keeper, pcm(100, 1))
    client(keeper, "commit")
    committed(keeper, "u1")
    append(keeper, pcm(100, 2))  # appended, never committed: lost on the new session
    upstream(keeper, "conversation.item.deleted", item_id="u1")
    assert keeper.items == {} and keeper.kept_bytes == 0
    keeper.new_session()
    assert keeper.position == keeper.pending_bytes == 0
    append(keeper, pcm(100, 3))
    client(keeper, "commit")
    committed(keeper, "u2")
    assert kept(keeper, "u2") == pcm(100, 3)


def test_padded_chunks_and_unusual_layouts_join_into_valid_base64():
    keeper = keeper_for(ULAW)  # 8 bytes a millisecond: 20 ms chunks of 160 bytes need padding
    chunks = [bytes([n]) * 160 for n in range(3)]
    for raw in chunks[:2]:
        append(keeper, raw)
    spaced = b'{"event_id": "e\\u0031", "audio": "%s", "type": "input_audio_buffer.append"}'
    append(keeper, b"", spaced % base64.b64encode(chunks[2]))  # escaped: parsed
    client(keeper, "commit")
    committed(keeper, "u1", ULAW)
    assert kept(keeper, "u1") == b"".join(chunks)
    assert keeper.seconds_of("u1") == 0.06


def test_joined_base64_is_the_audio_of_any_cut_of_any_chunks():
    rng = random.Random(16)
    for _ in range(200):
        raws = [rng.randbytes(rng.randint(1, 40)) for _ in range(rng.randint(1, 6))]
        pieces: list[Piece] = []
        expected, at = b"", 0
        for raw in raws:
            frame = b'{"audio":"' + base64.b64encode(raw) + b'"}'
            lo = rng.randint(0, len(raw) - 1)
            hi = rng.randint(lo + 1, len(raw))
            pieces.append(((frame, 10, len(frame) - 2, at, len(raw)), lo, hi))
            expected += raw[lo:hi]
            at += len(raw)
        assert base64.b64decode(join_base64(pieces), validate=True) == expected


def test_a_chunk_the_upstream_refused_leaves_the_turn_to_its_transcript():
    keeper = keeper_for()
    append(keeper, pcm(100, 1))
    append(keeper, b"", b'{"type":"input_audio_buffer.append","audio":"not base64!!"}')
    client(keeper, "commit")
    committed(keeper, "u1")
    assert keeper.audio_of("u1") is None and keeper.items == {}


# --- replay plans with audio -----------------------------------------------------------------


def user_audio(item_id: str, transcript: str | None = None) -> dict[str, Any]:
    part = {"type": "input_audio", "transcript": transcript}
    return {"id": item_id, "type": "message", "role": "user", "content": [part]}


def shadow_with(*items: dict[str, Any]) -> ShadowConversation:
    shadow = ShadowConversation()
    for item in items:
        shadow.observe("conversation.item.added", {"item": item})
    return shadow


def spoken(keeper: AudioKeeper, item_id: str, ms: int, fill: int) -> None:
    append(keeper, pcm(ms, fill))
    client(keeper, "commit")
    committed(keeper, item_id)


def test_a_kept_turn_is_replayed_as_its_audio_with_its_transcript():
    keeper = keeper_for()
    spoken(keeper, "u1", 1000, 1)
    spoken(keeper, "u2", 500, 2)
    shadow = shadow_with(user_audio("u1", "hello there"), user_audio("u2"))
    plan = plan_replay(shadow, flavour="ga", max_tokens=8000, note_id=None, audio=keeper)
    first, second = (orjson.loads(f) for f in plan.frames)
    assert first["item"] == {
        "id": "u1", "type": "message", "role": "user",
        "content": [{"type": "input_audio", "audio": base64.b64encode(pcm(1000, 1)).decode(),
                     "transcript": "hello there"}],
    }  # fmt: skip
    assert second["previous_item_id"] == "u1"
    assert second["item"]["content"] == [
        {"type": "input_audio", "audio": base64.b64encode(pcm(500, 2)).decode()}
    ]  # never transcribed, replayed all the same
    assert plan.tokens == audio_tokens(1.0) + audio_tokens(0.5) == 23
    assert plan.audio_seconds == 1.5


def test_audio_that_does_not_fit_falls_back_to_the_transcript_then_the_oldest_go():
    keeper = keeper_for()
    for n in range(3):
        spoken(keeper, f"u{n}", 2000, n)
    shadow = shadow_with(*(user_audio(f"u{n}", "a short line") for n in range(3)))
    text_cost = estimate_tokens(replay_item(shadow.items["u0"].wire, "ga") or {})
    budget = audio_tokens(2.0) + text_cost
    plan = plan_replay(shadow, flavour="ga", max_tokens=budget, note_id=None, audio=keeper)
    older, newest = (orjson.loads(f)["item"] for f in plan.frames)
    assert plan.item_ids == ("u1", "u2") and plan.dropped == 1
    assert newest["content"][0]["type"] == "input_audio"
    assert older["content"] == [{"type": "input_text", "text": "a short line"}]
    assert plan.audio_seconds == 2.0


def test_a_turn_whose_audio_was_refused_and_has_no_text_is_skipped_not_a_stop():
    keeper = keeper_for()
    spoken(keeper, "u1", 200, 1)
    append(keeper, b"", b'{"type":"input_audio_buffer.append","audio":"not base64!!"}')
    client(keeper, "commit")
    committed(keeper, "u2")
    spoken(keeper, "u3", 200, 3)
    shadow = shadow_with(user_audio("u1"), user_audio("u2"), user_audio("u3"))
    plan = plan_replay(shadow, flavour="ga", max_tokens=8000, note_id=None, audio=keeper)
    assert plan.item_ids == ("u1", "u3") and plan.dropped == 1


def test_text_replay_and_the_switch_delta_use_kept_audio_only_when_given():
    keeper = keeper_for()
    spoken(keeper, "u1", 200, 1)
    shadow = shadow_with(user_audio("u1", "hi"))
    plan = plan_replay(shadow, flavour="ga", max_tokens=8000, note_id=None)
    assert orjson.loads(plan.frames[0])["item"]["content"][0]["type"] == "input_text"
    spoken(keeper, "u2", 200, 2)
    shadow.observe("conversation.item.added", {"item": user_audio("u2", "again")})
    frames, created = plan_delta(shadow, plan.seq, set(plan.item_ids), "ga", keeper)
    assert created == ["u2"]
    [part] = orjson.loads(frames[0])["item"]["content"]
    assert base64.b64decode(part["audio"]) == pcm(200, 2) and part["transcript"] == "again"
