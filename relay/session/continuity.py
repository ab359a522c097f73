"""Continuity's pure core: the shadow conversation and the replay that rebuilds it. No I/O.

Theory of operation. The relay cannot resume an upstream session (the API has none), so it
keeps a shadow of the conversation from the upstream's own events and, on a new upstream
session, re-creates it with `conversation.item.create`: each item with its original id and
`previous_item_id`, user audio as its transcript (or, with `replay = "audio"`, as the audio
the relay kept: audio_keeper.py), assistant audio as `output_text`, tool items verbatim.
Only the events in `TRACKED` are parsed (never an audio delta), so the shadow costs nothing
on the audio path.

Rules:
1. The shadow holds what the upstream reported, not what the client asked for: an item
   exists once the upstream said it was added, is gone once it said it was deleted, and a
   truncated assistant part loses its transcript (the service drops unheard text too).
2. A replay fits in `max_replay_tokens` (estimated): the newest items are kept, the oldest
   dropped first, and a tool output whose call was dropped goes with it. A user turn whose
   kept audio does not fit is replayed as its transcript when that fits.
3. A quiet point is when nothing is in flight: no response, no speech, no tool call waiting
   for its output. Only there may the upstream be switched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from relay.ops.config import ContinuityConfig, DeploymentConfig, TeamConfig
from relay.session.audio_keeper import AudioKeeper

Flavour = Literal["ga", "preview"]
DEFAULT_RENEW_BEFORE_SECONDS = 300.0
DEFAULT_MAX_REPLAY_TOKENS = 8000
# About 3.8 MB of base64 a session at 24 kHz PCM16 (64 KB a second, as the client sent it).
DEFAULT_MAX_REPLAY_AUDIO_SECONDS = 60.0
# Upstream events the shadow reads (GA and preview names); every other event is only sniffed.
TRACKED = frozenset(
    {
        "conversation.item.added", "conversation.item.created", "conversation.item.done",
        "conversation.item.deleted", "conversation.item.truncated",
        "conversation.item.input_audio_transcription.completed",
        "conversation.item.input_audio_transcription.failed", "response.output_item.done",
        "response.created", "response.done", "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
        "input_audio_buffer.cleared", "input_audio_buffer.timeout_triggered", "error",
    }
)  # fmt: skip
# Upstream events that name an item's previous one (the replay's note may be it).
PREVIOUS_ITEM_EVENTS = frozenset(
    {
        "conversation.item.added", "conversation.item.created", "conversation.item.done",
        "input_audio_buffer.committed",
    }
)  # fmt: skip
# Session fields the service sets itself; a session.update carrying them is refused or moot.
_READ_ONLY = frozenset({"id", "object", "expires_at", "client_secret", "model"})
KEEP_SPEAKING_NOTE = (
    "This conversation continues from an earlier connection; its earlier turns are shown "
    "as text. Keep answering as before: speak your answers aloud."
)
# A rough estimate (about four characters a token) plus each item's framing.
_CHARS_PER_TOKEN = 4
_TOKENS_PER_ITEM = 4
# An image as the model's input, by OpenAI's vision rule: a 1024 x 1024 image in detail
# (85 + 170 per 512-pixel tile), or any image at low detail.
_IMAGE_TOKENS = 765
_IMAGE_TOKENS_LOW = 85
# User audio: 1 token per 100 ms (the service's published rate; audio tokens cost ~8x text).
_AUDIO_TOKENS_PER_SECOND = 10
_SPEECH_ENDS = frozenset(
    {
        "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
        "input_audio_buffer.cleared",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ContinuitySettings:
    """The effective continuity settings of one team on one deployment."""

    renew_before_seconds: float = DEFAULT_RENEW_BEFORE_SECONDS
    max_replay_tokens: int = DEFAULT_MAX_REPLAY_TOKENS
    on_upstream_loss: Literal["resume", "close"] = "resume"
    flavour: Flavour = "ga"
    replay: Literal["text", "audio"] = "text"
    max_replay_audio_seconds: float = DEFAULT_MAX_REPLAY_AUDIO_SECONDS


def build_continuity(deployment: DeploymentConfig, team: TeamConfig) -> ContinuitySettings | None:
    """Team over deployment over defaults; None when continuity is off."""
    merged = _overlay(deployment.continuity, team.continuity)
    if not merged.enabled:
        return None
    return ContinuitySettings(
        renew_before_seconds=merged.renew_before_seconds or DEFAULT_RENEW_BEFORE_SECONDS,
        max_replay_tokens=merged.max_replay_tokens or DEFAULT_MAX_REPLAY_TOKENS,
        on_upstream_loss=merged.on_upstream_loss or "resume",
        flavour=deployment.protocol,
        replay=merged.replay or "text",
        max_replay_audio_seconds=(
            merged.max_replay_audio_seconds or DEFAULT_MAX_REPLAY_AUDIO_SECONDS
        ),
    )


def _overlay(base: ContinuityConfig, override: ContinuityConfig) -> ContinuityConfig:
    names = ContinuityConfig.__dataclass_fields__
    return ContinuityConfig(
        **{
            n: getattr(override, n) if getattr(override, n) is not None else getattr(base, n)
            for n in names
        }  # fmt: skip
    )


def _out_of_band(response: Mapping[str, Any]) -> bool:
    """A response outside the default conversation: its `conversation_id` is null (GA), or
    its `conversation` is "none" where a service still reports it so."""
    if "conversation_id" in response:
        return response["conversation_id"] is None
    return response.get("conversation") == "none"


# Where an added item goes when its event names no previous item, or names none.
_UNSAID = object()
_ROOT = object()


@dataclass(slots=True)
class ShadowItem:
    wire: dict[str, Any]
    # Order of arrival: what a switch replays is what arrived after its snapshot.
    seq: int
    # When it last changed after it arrived (a transcript came, a truncate emptied it), on
    # the same count: a switch replays again what changed after its snapshot.
    changed: int = 0


@dataclass(slots=True)
class ShadowConversation:
    """The conversation as the upstream reported it, and whether anything is in flight."""

    items: dict[str, ShadowItem] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    seq: int = 0
    response_id: str | None = None
    speaking: bool = False
    # call_id of function calls the model made whose output has not been added yet.
    pending_calls: set[str] = field(default_factory=set)
    # Ids of out-of-band responses (`conversation: "none"`) in progress.
    out_of_band: set[str] = field(default_factory=set)

    @property
    def quiet(self) -> bool:
        return self.response_id is None and not self.speaking and not self.pending_calls

    def observe(self, kind: str, event: Mapping[str, Any]) -> None:
        """Take one upstream event (one of `TRACKED`)."""
        if kind in ("conversation.item.added", "conversation.item.created"):
            # A null `previous_item_id` is the conversation's start (an item the client put
            # at "root", or the first); one left out says nothing, as in the other events.
            previous = event.get("previous_item_id", _UNSAID)
            self._put(event.get("item"), _ROOT if previous is None else previous)
        elif kind == "conversation.item.done":
            self._put(event.get("item"), _UNSAID)
        elif kind == "response.output_item.done":
            # An out-of-band response's output is in no conversation: never replayed into one.
            if event.get("response_id") not in self.out_of_band:
                self._put(event.get("item"), _UNSAID)
        elif kind == "conversation.item.deleted":
            self._delete(event.get("item_id"))
        elif kind == "conversation.item.truncated":
            self._set_transcript(event.get("item_id"), event.get("content_index"), "")
        elif kind == "conversation.item.input_audio_transcription.completed":
            transcript = event.get("transcript")
            if isinstance(transcript, str):
                self._set_transcript(event.get("item_id"), event.get("content_index"), transcript)
        elif kind == "response.created":
            response = event.get("response")
            rid = response.get("id") if isinstance(response, Mapping) else None
            self.response_id = rid if isinstance(rid, str) else "unknown"
            if isinstance(response, Mapping) and _out_of_band(response):
                self.out_of_band.add(self.response_id)
        elif kind == "response.done":
            self.response_id = None
            response = event.get("response")
            if isinstance(response, Mapping):
                self.out_of_band.discard(response.get("id"))
        elif kind == "input_audio_buffer.speech_started":
            self.speaking = True
        elif kind in _SPEECH_ENDS:
            self.speaking = False

    def _put(self, raw: Any, previous_id: Any) -> None:
        if not isinstance(raw, Mapping) or not isinstance(raw.get("id"), str):
            return
        item_id: str = raw["id"]
        wire = dict(raw)
        known = self.items.get(item_id)
        if known is not None:
            wire = _keep_transcripts(known.wire, wire)
            if wire != known.wire:
                known.wire = wire
                self._changed(known)
        else:
            self.seq += 1
            self.items[item_id] = ShadowItem(wire, self.seq)
            if previous_id is _ROOT:
                self.order.insert(0, item_id)
            elif isinstance(previous_id, str) and previous_id in self.items:
                self.order.insert(self.order.index(previous_id) + 1, item_id)
            else:
                self.order.append(item_id)
        if wire.get("type") == "function_call" and wire.get("status") == "completed":
            if isinstance(wire.get("call_id"), str) and not self._has_output(wire["call_id"]):
                self.pending_calls.add(wire["call_id"])
        elif wire.get("type") == "function_call_output":
            self.pending_calls.discard(str(wire.get("call_id")))

    def _has_output(self, call_id: str) -> bool:
        return any(
            i.wire.get("type") == "function_call_output" and i.wire.get("call_id") == call_id
            for i in self.items.values()
        )

    def _delete(self, item_id: Any) -> None:
        item = self.items.pop(item_id, None) if isinstance(item_id, str) else None
        if item is not None:
            self.order.remove(item_id)
            if item.wire.get("type") == "function_call":
                # Deleted, it waits for no output: it must not hold off every switch.
                self.pending_calls.discard(str(item.wire.get("call_id")))

    def _set_transcript(self, item_id: Any, index: Any, transcript: str) -> None:
        item = self.items.get(item_id) if isinstance(item_id, str) else None
        content = item.wire.get("content") if item is not None else None
        if item is None or not isinstance(content, list) or not isinstance(index, int):
            return
        if 0 <= index < len(content) and isinstance(content[index], Mapping):
            if content[index].get("transcript") == transcript:
                return
            content = list(content)
            content[index] = {**content[index], "transcript": transcript}
            item.wire["content"] = content
            self._changed(item)

    def _changed(self, item: ShadowItem) -> None:
        self.seq += 1
        item.changed = self.seq

    def in_order(self) -> list[ShadowItem]:
        return [self.items[i] for i in self.order]

    def keep_only(self, present: set[str]) -> list[str]:
        """Forget the items a new upstream session does not hold; their ids."""
        gone = [i for i in self.order if i not in present]
        if gone:
            self.order = [i for i in self.order if i in present]
            for item_id in gone:
                del self.items[item_id]
        return gone


def _keep_transcripts(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A later report of an item (`.done`) may lack a transcript an earlier event filled in
    (input transcription often completes first): keep it."""
    old_parts, new_parts = old.get("content"), new.get("content")
    if not isinstance(old_parts, list) or not isinstance(new_parts, list):
        return new
    merged = []
    for index, part in enumerate(new_parts):
        before = old_parts[index] if index < len(old_parts) else None
        if (
            isinstance(part, Mapping)
            and isinstance(before, Mapping)
            and not part.get("transcript")
            and before.get("transcript")
        ):
            part = {**part, "transcript": before["transcript"]}
        merged.append(part)
    return {**new, "content": merged}


# --- replay ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """What a new upstream session gets, in order, and what it costs."""

    # `conversation.item.create` frames, in order.
    frames: tuple[bytes, ...]
    # Ids of the items those frames create (the note included): each must be confirmed.
    item_ids: tuple[str, ...]
    tokens: int
    dropped: int
    # The shadow's seq when planned: later items are the switch's delta.
    seq: int
    # Seconds of the user's own audio replayed (replay = "audio").
    audio_seconds: float = 0.0


def replay_item(
    wire: Mapping[str, Any], flavour: Flavour, audio: str | None = None
) -> dict[str, Any] | None:
    """The `conversation.item.create` item that re-creates ``wire``; None when nothing of it
    can be replayed (user audio never transcribed).
    ``audio`` (base64), when kept, replays a user turn's audio part as itself."""
    kind = wire.get("type")
    base = {"id": wire["id"], "type": kind}
    if kind == "function_call":
        return {**base, **_fields(wire, ("name", "call_id", "arguments"))}
    if kind == "function_call_output":
        return {**base, **_fields(wire, ("call_id", "output"))}
    if kind != "message":
        return None
    role = wire.get("role")
    parts = [p for p in wire.get("content") or () if isinstance(p, Mapping)]
    content: list[dict[str, Any]]
    if role == "assistant":
        # A reply cut before any of it was heard (a barge-in) keeps its place, empty: the
        # client still refers to it (`previous_item_id`, a history edit next to it).
        text = "".join(str(p.get("text") or p.get("transcript") or "") for p in parts)
        kind_of_text = "output_text" if flavour == "ga" else "text"
        content = [{"type": kind_of_text, "text": text}]
    elif audio is not None and role == "user":
        parted = (_audio_part(p, audio) or _input_part(p) for p in parts)
        content = [c for c in parted if c is not None]
    else:
        content = [c for c in (_input_part(p) for p in parts) if c is not None]
    if not content or role not in ("user", "assistant", "system"):
        return None
    return {**base, "role": role, "content": content}


def _input_part(part: Mapping[str, Any]) -> dict[str, Any] | None:
    kind = part.get("type")
    if kind == "input_text" and part.get("text"):
        return {"type": "input_text", "text": part["text"]}
    if kind == "input_audio" and part.get("transcript"):
        return {"type": "input_text", "text": part["transcript"]}
    if kind == "input_image" and part.get("image_url"):
        return {k: part[k] for k in ("type", "image_url", "detail") if k in part}
    return None


def _audio_part(part: Mapping[str, Any], audio: str) -> dict[str, Any] | None:
    """A user audio part with its audio; the transcript rides along (the service does not
    send it to the model: it is for whoever retrieves the item)."""
    if part.get("type") != "input_audio":
        return None
    replayed: dict[str, Any] = {"type": "input_audio", "audio": audio}
    if isinstance(part.get("transcript"), str) and part["transcript"]:
        replayed["transcript"] = part["transcript"]
    return replayed


def _fields(wire: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    return {name: wire[name] for name in names if name in wire}


def estimate_tokens(item: Mapping[str, Any]) -> int:
    """Tokens ``item`` costs as the model's input, roughly; a user turn with its audio costs
    `audio_tokens` instead, an image `_IMAGE_TOKENS` (not its data URL's length: a photo
    counted as 20,000 tokens pushed the whole history out of the replay)."""
    content = item.get("content") or ""
    images = 0
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "input_image":
                images += _IMAGE_TOKENS_LOW if part.get("detail") == "low" else _IMAGE_TOKENS
            else:
                parts.append(part)
        content = parts
    text = orjson.dumps(content) + orjson.dumps(
        [item.get(k) for k in ("name", "arguments", "output")]
    )
    return _TOKENS_PER_ITEM + images + len(text) // _CHARS_PER_TOKEN


def audio_tokens(seconds: float) -> int:
    return _TOKENS_PER_ITEM + math.ceil(seconds * _AUDIO_TOKENS_PER_SECOND)


def plan_replay(
    shadow: ShadowConversation,
    *,
    flavour: Flavour,
    max_tokens: int,
    note_id: str | None,
    audio: AudioKeeper | None = None,
) -> ReplayPlan:
    """The items to replay, newest first into the budget, oldest dropped; ``note_id`` adds
    the keep-speaking system note in front. With ``audio``, user turns whose audio was kept
    are replayed as audio when it fits (decoded only for the turns that do)."""
    candidates = [
        (s.wire, replay_item(s.wire, flavour), audio.seconds_of(s.wire["id"]) if audio else 0.0)
        for s in shadow.in_order()
    ]
    replayable = sum(1 for _, item, seconds in candidates if item is not None or seconds)
    kept: list[dict[str, Any]] = []
    tokens, audio_seconds = 0, 0.0
    note = _note(note_id) if note_id else None
    budget = max_tokens - (estimate_tokens(note) if note else 0)
    for wire, text, seconds in reversed(candidates):
        choice: dict[str, Any] | None = None
        fits = bool(seconds) and tokens + audio_tokens(seconds) <= budget
        if fits and audio is not None:
            choice = _with_audio(wire, flavour, audio)  # None: its audio was not valid
            cost = audio_tokens(seconds)
            audio_seconds += seconds if choice is not None else 0.0
        if choice is None and text is not None:
            choice, cost = text, estimate_tokens(text)
        if choice is None:
            if seconds and not fits:
                break  # its audio does not fit, and it has no text
            continue  # nothing of it can be replayed
        if tokens + cost > budget:
            break
        kept.append(choice)
        tokens += cost
    kept.reverse()
    calls = {i.get("call_id") for i in kept if i["type"] == "function_call"}
    kept = [i for i in kept if i["type"] != "function_call_output" or i.get("call_id") in calls]
    if note is not None and kept:  # with nothing to replay, no earlier turns to speak after
        kept.insert(0, note)
        tokens += estimate_tokens(note)
    else:
        note = None
    frames = create_frames(kept, previous=None)
    return ReplayPlan(
        frames=frames,
        item_ids=tuple(i["id"] for i in kept),
        tokens=tokens,
        dropped=replayable - len(kept) + (1 if note else 0),
        seq=shadow.seq,
        audio_seconds=audio_seconds,
    )


def _with_audio(
    wire: Mapping[str, Any], flavour: Flavour, audio: AudioKeeper
) -> dict[str, Any] | None:
    b64 = audio.audio_of(wire["id"])
    return None if b64 is None else replay_item(wire, flavour, b64)


def _note(note_id: str) -> dict[str, Any]:
    return {
        "id": note_id,
        "type": "message",
        "role": "system",
        "content": [{"type": "input_text", "text": KEEP_SPEAKING_NOTE}],
    }


def create_frames(items: list[dict[str, Any]], previous: str | None) -> tuple[bytes, ...]:
    """`conversation.item.create` frames chaining ``items`` after ``previous``."""
    frames = []
    for item in items:
        event: dict[str, Any] = {
            "type": "conversation.item.create",
            "event_id": f"relay_replay_{item['id']}",
            "item": item,
        }
        if previous is not None:
            event["previous_item_id"] = previous
        frames.append(orjson.dumps(event))
        previous = item["id"]
    return tuple(frames)


def plan_delta(
    shadow: ShadowConversation,
    since_seq: int,
    present: set[str],
    flavour: Flavour,
    audio: AudioKeeper | None = None,
) -> tuple[list[bytes], list[str]]:
    """What a prepared upstream still lacks at the switch: frames (creates for items that
    arrived after the plan, creates in place of items that changed since, after a delete
    of the copy it holds; deletes for items gone since) and the ids to confirm."""
    frames: list[bytes] = []
    created: list[str] = []
    previous: str | None = None
    # Where an item goes when none the shadow holds is before it: after the replay's note.
    first = next((i for i in sorted(present) if i.startswith(NOTE_PREFIX)), None) or "root"
    for shadowed in shadow.in_order():
        item_id = shadowed.wire["id"]
        # Changed since the plan, or deleted and made again under its id: the copy the
        # prepared upstream holds is not the item's.
        stale = item_id in present and max(shadowed.seq, shadowed.changed) > since_seq
        if item_id in present and not stale:
            previous = item_id
            continue
        item = None
        if shadowed.seq > since_seq or shadowed.changed > since_seq:
            if audio is not None:
                item = _with_audio(shadowed.wire, flavour, audio)
            item = item or replay_item(shadowed.wire, flavour)
        if stale and item is not None:
            frames.append(orjson.dumps({"type": "conversation.item.delete", "item_id": item_id}))
            frames.extend(create_frames([item], previous or first))
            created.append(item_id)
        elif stale:
            previous = item_id  # nothing of it to replay now: the copy stays
            continue
        elif item is not None:  # first the shadow holds: after the note, not at the end
            frames.extend(create_frames([item], previous or first))
            created.append(item_id)
        if item is not None:
            previous = item_id
    for gone in sorted(present - set(shadow.items)):
        if not gone.startswith(NOTE_PREFIX):
            frames.append(orjson.dumps({"type": "conversation.item.delete", "item_id": gone}))
    return frames, created


NOTE_PREFIX = "relay_note_"


def spoken_reply(wire: Mapping[str, Any]) -> bool:
    """An assistant reply with audio: a replay turns it into text."""
    return (
        wire.get("type") == "message"
        and wire.get("role") == "assistant"
        and any(
            isinstance(p, Mapping) and p.get("type") in ("output_audio", "audio")
            for p in wire.get("content") or ()
        )
    )


def emptying_frames(
    shadow: ShadowConversation,
    item_id: str,
    content_index: int,
    *,
    first: str | None,
    flavour: Flavour,
    event_id: str,
) -> tuple[bytes, ...] | None:
    """A truncate of a reply the upstream holds as text (a replay's), done as the service
    does it to audio: the part's text dropped (no unheard text stays in the context), in
    place, with its id: a `conversation.item.delete` and a `conversation.item.create` after
    the item before it (``first``, the replay's note, or the root, when it is the first the
    shadow holds). None when the shadow does not hold such a part."""
    shadowed = shadow.items.get(item_id)
    content = shadowed.wire.get("content") if shadowed is not None else None
    if not isinstance(content, list) or not 0 <= content_index < len(content):
        return None
    part = content[content_index]
    if not isinstance(part, Mapping):
        return None
    parts = list(content)
    parts[content_index] = {**part, "transcript": "", "text": ""}
    assert shadowed is not None
    item = replay_item({**shadowed.wire, "content": parts}, flavour)
    if item is None:
        return None
    position = shadow.order.index(item_id)
    previous = shadow.order[position - 1] if position else first or "root"
    delete = {"type": "conversation.item.delete", "event_id": event_id, "item_id": item_id}
    create = {
        "type": "conversation.item.create",
        "event_id": event_id,
        "previous_item_id": previous,
        "item": item,
    }
    return orjson.dumps(delete), orjson.dumps(create)


def truncated_event(item_id: str, content_index: int, audio_end_ms: Any, event_id: str) -> bytes:
    """The `conversation.item.truncated` the client gets for a truncate the relay did."""
    return orjson.dumps(
        {
            "type": "conversation.item.truncated",
            "event_id": event_id,
            "item_id": item_id,
            "content_index": content_index,
            "audio_end_ms": audio_end_ms,
        }
    )


def session_update(session: Mapping[str, Any], flavour: Flavour) -> bytes:
    """The `session.update` that puts ``session`` (as an upstream reported it) in force on
    another upstream session: output modalities, voice, instructions, tools and all."""
    fields = {k: v for k, v in session.items() if k not in _READ_ONLY}
    if flavour == "ga":
        fields["type"] = fields.get("type") or "realtime"
    return orjson.dumps(
        {"type": "session.update", "event_id": "relay_continuity_session", "session": fields}
    )


def transcribes(session: Mapping[str, Any], flavour: Flavour) -> bool:
    """Whether the service transcribes the user's audio turns."""
    if flavour == "preview":
        return isinstance(session.get("input_audio_transcription"), Mapping)
    audio = session.get("audio")
    source = audio.get("input") if isinstance(audio, Mapping) else None
    return isinstance(source, Mapping) and isinstance(source.get("transcription"), Mapping)


def untranscribed(item: Any) -> bool:
    """A user turn with audio whose transcript has not come (a replay would leave it out)."""
    if not isinstance(item, Mapping) or item.get("role") != "user":
        return False
    return any(
        isinstance(p, Mapping) and p.get("type") == "input_audio" and not p.get("transcript")
        for p in item.get("content") or ()
    )


def manual_turns(session: Mapping[str, Any], flavour: Flavour) -> bool:
    """Whether the session has no turn detection: the client commits its own turns."""
    said, detection = _turn_detection(session, flavour)
    return said and detection is None


def answers_turns(session: Mapping[str, Any], flavour: Flavour) -> bool:
    """Whether the service starts a response itself when its turn detection ends a turn
    (`create_response`, true unless set false)."""
    _, detection = _turn_detection(session, flavour)
    return isinstance(detection, Mapping) and detection.get("create_response") is not False


def _turn_detection(session: Mapping[str, Any], flavour: Flavour) -> tuple[bool, Any]:
    """(whether the session says, its turn detection table or None)."""
    if flavour == "preview":
        return "turn_detection" in session, session.get("turn_detection")
    audio = session.get("audio")
    source = audio.get("input") if isinstance(audio, Mapping) else None
    if not isinstance(source, Mapping):
        return False, None
    return "turn_detection" in source, source.get("turn_detection")


def speaks(session: Mapping[str, Any]) -> bool:
    """Whether the session answers in audio (the note to keep speaking is then needed)."""
    modalities = session.get("output_modalities", session.get("modalities"))
    return not isinstance(modalities, list) or "audio" in modalities


def cut_response_done(response_id: str, event_id: str) -> bytes:
    """The `response.done` the client gets for a response its lost upstream never finished,
    as the service reports a failed response."""
    return orjson.dumps(
        {
            "type": "response.done",
            "event_id": event_id,
            "response": {
                "id": response_id,
                "object": "realtime.response",
                "status": "failed",
                "status_details": {
                    "type": "failed",
                    "error": {
                        "type": "server_error",
                        "code": "upstream_lost",
                        "message": "The connection to the upstream service was lost during "
                        "this response; the conversation continues on a new one.",
                    },
                },
                "output": [],
                "usage": None,
            },
        }
    )
