"""Continuity's I/O: renew the upstream session before it expires, resume it after a loss.

How it works:
- `Renewal.run` (a task of the Bridge) sleeps until `expires_at - renew_before_seconds`
  (and at least a quarter of the upstream session's life), waits for a quiet point, dials a
  second upstream through the pool, puts the session in force and replays the shadow
  conversation, reading the new upstream itself until every replayed item is confirmed: the
  replay's own events never reach the client. The client goes on talking to the old
  upstream meanwhile. A resume that comes first replaces the renewal.
- The switch: client frames are held (the Bridge's gate) and a marker goes to the old
  upstream, a `conversation.item.retrieve` of an id that does not exist (random: a client
  cannot name it). Its `error` answer (that `event_id`) comes after whatever the old
  upstream did for the client's earlier events. At it the upstream pump calls
  `switch_at_marker`: if still quiet, the session in force is set again where the client
  changed it since the new upstream was prepared, items added since the replay are sent,
  the sockets are swapped and the gate opens; the old upstream is closed with 1000.
- A lost upstream (`on_upstream_loss = "resume"`): the upstream pump holds client frames,
  reports the cut response to the client as failed, and dials, sets up and replays a new
  upstream (the pool tries the other backends), then carries on reading it.
- A failure keeps things as they were: a failed renewal leaves the old upstream serving (its
  own expiry reaches the client as before); a failed resume ends the session as a loss.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from aiohttp import WSMsgType

from relay.errors import HttpRefusal
from relay.ops.metrics import Metrics
from relay.session import frames
from relay.session.audio_keeper import AudioKeeper
from relay.session.codec import FrameError, sniff_type
from relay.session.continuity import (
    NOTE_PREFIX,
    ContinuitySettings,
    ReplayPlan,
    ShadowConversation,
    answers_turns,
    cut_response_done,
    emptying_frames,
    manual_turns,
    plan_delta,
    plan_replay,
    session_update,
    speaks,
    spoken_reply,
    transcribes,
    truncated_event,
    untranscribed,
)
from relay.session.setup import put_in_force
from relay.upstream.backends import Backend
from relay.upstream.dial import UpstreamSocket

if TYPE_CHECKING:
    from relay.session.pump import Bridge

# Opens an upstream socket through the pool; a backend given (one just lost) is counted as
# failed and tried last.
Dial = Callable[[Backend | None], Awaitable[tuple[Backend, UpstreamSocket]]]
MARKER_PREFIX = b"relay_switch_"
# Markers sent and not yet answered, at most (a switch given up on leaves its own).
_MAX_MARKERS = 16
# Client frames are held at most this long at a switch before it is given up.
HOLD_SECONDS = 1.0
# The switch must happen this long before the service's own expiry, or not at all.
_EXPIRY_MARGIN_SECONDS = 1.0
# How long after its turn detection ends a turn the service may take to start the answer
# before the session counts as quiet again (it starts it within a second or so).
_ANSWER_DUE_SECONDS = 5.0
# How long a user turn's transcript may take before the session counts as quiet without it
# (a replay needs it: the turn would be left out).
_TRANSCRIPT_DUE_SECONDS = 10.0
_ITEM_REPORTS = ("conversation.item.added", "conversation.item.created", "conversation.item.done")
_TRANSCRIPT_ENDS = (
    "conversation.item.input_audio_transcription.completed",
    "conversation.item.input_audio_transcription.failed",
    "conversation.item.deleted",
)
# No renewal before this share of an upstream session's life: a renew_before_seconds as long
# as the session itself would otherwise renew each new session at once, over and over.
_EARLIEST_RENEWAL = 0.25
_RETRY_SECONDS = 30.0
# The event ids of the relay's own edits doing a client's truncate of a replayed reply.
EMPTYING_PREFIX = "relay_empty_"
# Upstream events that may answer such an edit.
_CREATED = "conversation.item.created"
_EMPTYING_ANSWERS = frozenset(
    {
        "conversation.item.deleted", "conversation.item.added", "conversation.item.created",
        "conversation.item.done", "error",
    }
)  # fmt: skip
_log = structlog.get_logger("relay.session")


class RenewalFailed(Exception):
    """A renewal or resume that did not happen; ``outcome`` is its metric label."""

    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail


@dataclass(slots=True)
class Prepared:
    """A new upstream with the session in force and the conversation replayed."""

    upstream: UpstreamSocket
    backend: Backend
    session: dict[str, Any]
    # The session in force it was given: the client may change it before the switch.
    source: dict[str, Any]
    plan: ReplayPlan
    # Item ids the new upstream holds (replayed, and created by a switch's delta).
    present: set[str]


@dataclass(slots=True)
class _Emptying:
    """A client's truncate of a replayed reply, being done by the relay's own edits."""

    client_event_id: Any
    content_index: int
    audio_end_ms: Any
    event_id: str
    # Truncates of the same reply sent meanwhile: each is told it is done, with this one.
    more: list[tuple[int, Any]] = field(default_factory=list)


@dataclass(slots=True)
class _Switch:
    marker: str
    prepared: Prepared
    done: asyncio.Future[bool]


def is_loss(kind: WSMsgType, data: object, close_code: int | None) -> bool:
    """A lost upstream, as opposed to one that ended the session on purpose: no close frame,
    an internal error (1011) or an abnormal closure (1006)."""
    if kind is WSMsgType.CLOSE:
        return data in (1006, 1011)
    return close_code != 1009


class Renewal:
    """Keeps one Bridge's conversation going across upstream sessions."""

    def __init__(
        self,
        bridge: Bridge,
        settings: ContinuitySettings,
        *,
        dial: Dial,
        backend: Backend,
        deployment: str,
        metrics: Metrics,
        setup_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bridge = bridge
        self.settings = settings
        self.shadow = ShadowConversation()
        # The user's own audio per item, kept only for replay = "audio" (the pump feeds it).
        self.keeper: AudioKeeper | None = None
        if settings.replay == "audio":
            self.keeper = AudioKeeper(settings.max_replay_audio_seconds)
            self.keeper.configure(bridge.session)
            bridge.lane_in = None  # every append goes by the keeper (the pump's `_keep_audio`)
        self.quiet = asyncio.Event()
        self.quiet.set()
        self._dial = dial
        self._backend = backend
        self._deployment = deployment
        self._metrics = metrics
        self._setup_seconds = setup_seconds
        self._clock = clock
        self._switch: _Switch | None = None
        self._markers: list[str] = []  # sent, not yet answered
        self._began = clock()  # when the current upstream session was adopted
        self._resuming = False
        # A client's `response.create` sent, its `response.created` not yet seen.
        self._requested = False
        # Until when the client is likely still playing the last response's audio (the
        # service sends it faster than real time), and the meter's output audio at the
        # start of the response in progress (see `_playback`).
        self._playing_until = 0.0
        self._response_began = 0.0
        self._audio_out_at_start = 0.0
        self._recheck: asyncio.TimerHandle | None = None
        # The service's turn detection ended a turn and will answer it: not quiet until its
        # `response.created` (or `_ANSWER_DUE_SECONDS`, if none comes).
        self._answer_due: asyncio.TimerHandle | None = None
        # User turns whose transcript is still to come, each until its own deadline.
        self._transcripts: dict[str, asyncio.TimerHandle] = {}
        # Whether a quiet point waits for playback (the first half of a renewal's window: a
        # client that never leaves a gap after playing must still be renewed in the second).
        self._mind_playback = True
        self._settled = asyncio.Event()
        # Upstream sessions this client session moved to (renewed or resumed).
        self.moves = 0
        # Spoken replies the upstream holds as text (replayed): the service cannot truncate
        # text, so the relay does a client's truncate of one (`emptied`). The item before the
        # first the shadow holds (the replay's note), and the truncates under way.
        self.textified: set[str] = set()
        self._first: str | None = None
        self._note_token = b""  # the note's id as a JSON string, to hide (`hide_note`)
        self._emptying: dict[str, _Emptying] = {}

    # --- called by the upstream pump ---------------------------------------------------------

    def own_answer(self, kind: str, frame: bytes) -> tuple[bytes, ...] | None:
        """For an upstream event answering the relay's own edits (`emptied`), the frames the
        client gets instead (none, an error, or a `conversation.item.truncated` for each
        truncate done); None for any other event."""
        if self._emptying and kind in _EMPTYING_ANSWERS:
            return self._emptying_answer(kind, frame)
        return None

    def hide_note(self, frame: bytes) -> bytes:
        """An upstream event naming the replay's note as an item's previous one (the first
        the client knows of, or one it put first), as the service would name it: null, the
        conversation's start. The note is the relay's own; a client inserting after its id
        failed after the next renewal."""
        token = self._note_token
        return frame.replace(token, b"null") if token and token in frame else frame

    def track(self, kind: str, frame: bytes) -> None:
        """Feed one upstream event of `continuity.TRACKED` to the shadow conversation."""
        try:
            event = orjson.loads(frame)
        except orjson.JSONDecodeError:
            return
        if isinstance(event, dict):
            self.shadow.observe(kind, event)
            if self.keeper is not None:
                self.keeper.observe(kind, event, self.bridge.session)
            self._follow_transcripts(kind, event)
        if kind in ("response.created", "error"):
            self._requested = False  # the requested response started, or was refused
            if kind == "response.created":
                self._answered()
        elif kind in ("input_audio_buffer.committed", "input_audio_buffer.cleared"):
            self.bridge.appended = False
        elif kind == "input_audio_buffer.speech_stopped" and answers_turns(
            self.bridge.session, self.settings.flavour
        ):
            # The service starts the turn's response on its own, a moment later: a switch
            # in between (the marker answered first) left it on the old upstream, lost.
            self._answered()
            self._answer_due = asyncio.get_running_loop().call_later(
                _ANSWER_DUE_SECONDS, self._answered
            )
        if kind in ("response.created", "response.done"):
            self._playback(kind)
        if self._quiet_now():
            self.quiet.set()
        else:
            self.quiet.clear()

    async def emptied(self, upstream: UpstreamSocket, frame: bytes) -> bool:
        """A client's `conversation.item.truncate`: True when it names a spoken reply the
        upstream holds as text, which the service would refuse to cut (`invalid_value`:
        no audio), keeping all of its text in the model's context. The relay drops the
        part's text in place instead, as the service does to audio, and tells the client
        `conversation.item.truncated` once the upstream has confirmed (`own_answer`)."""
        try:
            event = orjson.loads(frame)
        except orjson.JSONDecodeError:
            return False
        item_id = event.get("item_id") if isinstance(event, dict) else None
        index = event.get("content_index") if isinstance(event, dict) else None
        if item_id not in self.textified:
            return False
        if not isinstance(index, int) or isinstance(index, bool):
            return False
        under_way = self._emptying.get(item_id)
        if under_way is not None:  # a second barge-in on it: done with the first's edit
            under_way.more.append((index, event.get("audio_end_ms")))
            return True
        event_id = EMPTYING_PREFIX + secrets.token_hex(8)
        edits = emptying_frames(
            self.shadow,
            item_id,
            index,
            first=self._first,
            flavour=self.settings.flavour,
            event_id=event_id,
        )
        if edits is None:
            return False
        self._emptying[item_id] = _Emptying(
            event.get("event_id"), index, event.get("audio_end_ms"), event_id
        )
        self.quiet.clear()  # the item is briefly gone upstream: no replay plan meanwhile
        for edit in edits:
            await frames.send_text(upstream, edit)
        return True

    def _emptying_answer(self, kind: str, frame: bytes) -> tuple[bytes, ...] | None:
        """What the client gets for an upstream event answering the relay's edits: nothing,
        the `conversation.item.truncated` once done, or the error, under the client's
        truncate's `event_id`; None for an event that answers something else."""
        try:
            event = orjson.loads(frame)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(event, dict):
            return None
        if kind == "error":
            return self._emptying_error(event)
        named = event.get("item_id") if kind == "conversation.item.deleted" else None
        item = event.get("item")
        if isinstance(item, dict):
            named = item.get("id")
        if not isinstance(named, str) or named not in self._emptying:
            return None
        emptying = self._emptying[named]
        confirm = "conversation.item.done" if self.settings.flavour == "ga" else _CREATED
        if kind != confirm:
            return ()
        self._finish_emptying(named)
        index = emptying.content_index
        # As the service's own truncate: the part keeps no text in the shadow either.
        self.shadow.observe(
            "conversation.item.truncated", {"item_id": named, "content_index": index}
        )
        told = [(index, emptying.audio_end_ms), *emptying.more]
        return tuple(
            truncated_event(named, i, end, "relay_" + secrets.token_hex(8)) for i, end in told
        )

    def _emptying_error(self, event: dict[str, Any]) -> tuple[bytes, ...] | None:
        """An edit refused: the error under the client's truncate's `event_id`, once."""
        error = event.get("error")
        if not isinstance(error, dict):
            return None
        event_id = error.get("event_id")
        if not isinstance(event_id, str) or not event_id.startswith(EMPTYING_PREFIX):
            return None
        for item_id, emptying in list(self._emptying.items()):
            if emptying.event_id == event_id:
                self._finish_emptying(item_id)
                told = {k: v for k, v in error.items() if k != "event_id"}
                if emptying.client_event_id is not None:
                    told["event_id"] = emptying.client_event_id
                return (orjson.dumps({**event, "error": told}),)
        return ()  # its second edit refused too: told once

    def _finish_emptying(self, item_id: str) -> None:
        del self._emptying[item_id]
        if self._quiet_now():
            self.quiet.set()

    def _follow_transcripts(self, kind: str, event: dict[str, Any]) -> None:
        """A user turn whose transcript is to come is not quiet: switched away, its
        transcript went to the old upstream and the replay left the turn out."""
        if kind in _ITEM_REPORTS:
            item = event.get("item")
            item_id = item.get("id") if isinstance(item, dict) else None
            shadowed = self.shadow.items.get(item_id) if isinstance(item_id, str) else None
            if (
                isinstance(item_id, str)
                and item_id not in self._transcripts
                and shadowed is not None  # its transcript may have come first: the shadow's
                and untranscribed(shadowed.wire)
                and transcribes(self.bridge.session, self.settings.flavour)
            ):
                loop = asyncio.get_running_loop()
                self._transcripts[item_id] = loop.call_later(
                    _TRANSCRIPT_DUE_SECONDS, self._transcript_waited, item_id
                )
        elif kind in _TRANSCRIPT_ENDS:
            handle = self._transcripts.pop(str(event.get("item_id")), None)
            if handle is not None:
                handle.cancel()

    def _transcript_waited(self, item_id: str) -> None:
        self._transcripts.pop(item_id, None)
        if self._quiet_now():
            self.quiet.set()

    def _answered(self) -> None:
        """The turn's response started, or none came in time: quiet again if all else is."""
        if self._answer_due is not None:
            self._answer_due.cancel()
            self._answer_due = None
            if self._quiet_now():
                self.quiet.set()

    def _quiet_now(self) -> bool:
        return (
            self.shadow.quiet
            and not self.bridge.responding  # every response, out-of-band ones side by side too
            and not self._requested
            and self._answer_due is None
            and not self._emptying
            and not self._transcripts
            and not self._audio_unheard()
            and (not self._mind_playback or time.perf_counter() >= self._playing_until)
        )

    def _playback(self, kind: str) -> None:
        """A response's audio is played after it is sent: a barge-in then truncates it.
        After a switch it is text (the replay's), which the service cannot truncate, so the
        quiet point waits for the client to have played it, estimated from its start and
        its audio's length; a timer looks again then."""
        meter = self.bridge.meter
        meter.flush()  # the audio counted so far (the lane's tallies are flushed once a second)
        audio = meter.audio_seconds_total["out"]
        now = time.perf_counter()
        if kind == "response.created":
            self._audio_out_at_start = audio
            # Its audio plays after what is still playing (a reply, then an out-of-band one).
            self._response_began = max(now, self._playing_until)
            return
        heard = audio - self._audio_out_at_start
        self._playing_until = max(self._playing_until, self._response_began + heard)
        if self._playing_until > now:
            if self._recheck is not None:
                self._recheck.cancel()
            self._recheck = asyncio.get_running_loop().call_later(
                self._playing_until - now, self._played
            )

    def _played(self) -> None:
        self._recheck = None
        if self._quiet_now():
            self.quiet.set()

    def _audio_unheard(self) -> bool:
        """Audio appended and not committed, without turn detection (push to talk): the
        upstream will not hear it until the client commits, and a switch would lose it
        (with server VAD, buffered audio outside speech is silence, and speech is in flight)."""
        return self.bridge.appended and manual_turns(self.bridge.session, self.settings.flavour)

    def audio_pending(self) -> None:
        """The client appended audio since the buffer was last committed or cleared."""
        if self._audio_unheard():
            self.quiet.clear()

    def response_requested(self) -> None:
        """A client's `response.create` is on its way to the upstream: not quiet until the
        upstream starts it. The service may answer the switch marker first (the simulator
        does), and a switch then would leave the response on the old upstream, lost."""
        self._requested = True
        self.quiet.clear()

    def is_marker(self, frame: bytes) -> bool:
        """An `error` answering a switch marker: the relay's own, never the client's (its
        `event_id` is one the relay sent; a client's may look alike, not be the same)."""
        if MARKER_PREFIX not in frame or not self._markers:
            return False
        return _error_event_id(frame) in self._markers

    async def switch_at_marker(self, frame: bytes) -> None:
        """The old upstream answered a marker: swap now if nothing started meanwhile."""
        marker = _error_event_id(frame)
        if marker in self._markers:
            self._markers.remove(marker)
        switch = self._switch
        if switch is None or switch.marker != marker:
            return  # a marker given up on: swallowed all the same
        self._switch = None
        prepared = switch.prepared
        if prepared.upstream.closed:
            _settle_failed(switch.done, RenewalFailed("switch_failed", "the new upstream closed"))
            return
        if not self._quiet_now():
            _settle(switch.done, False)  # something started: wait for the next quiet point
            return
        frames, created = plan_delta(
            self.shadow, prepared.plan.seq, prepared.present, self.settings.flavour, self.keeper
        )
        try:
            async with asyncio.timeout(HOLD_SECONDS / 2):
                if self.bridge.session is not prepared.source:
                    # The client changed the session while the new upstream was prepared.
                    await self._set_session(prepared)
                await self._replay(prepared.upstream, frames, created)
        except (RenewalFailed, TimeoutError, ConnectionError) as exc:
            _settle_failed(switch.done, RenewalFailed("switch_failed", str(exc)))
            return
        prepared.present.update(created)
        self._adopt(prepared)
        _settle(switch.done, True)

    async def resume(self, detail: str) -> bool:
        """Replace a lost upstream; False when the session must end as a loss."""
        if self.settings.on_upstream_loss != "resume" or self.bridge.ending is not None:
            return False
        bridge = self.bridge
        old_id = bridge.session.get("id")
        pending, self._switch = self._switch, None
        if pending is not None:
            _settle_failed(pending.done, RenewalFailed("upstream_lost", detail))
        bridge.gate.clear()
        began = time.perf_counter()
        self._resuming = True
        try:
            await self._report_cut_response()
            prepared = await self._prepare(lost=self._backend)
        except RenewalFailed as failure:
            self._record("upstream_lost", failure.outcome)
            _log.warning("session_resume_failed", outcome=failure.outcome, detail=failure.detail)
            return False
        finally:
            self._resuming = False
            bridge.gate.set()
        if bridge.ending is not None:
            # The client left (or the session ended) while the new upstream was prepared:
            # nothing would read it, or close it, once adopted.
            await _close(prepared.upstream, "session ended during resume")
            self._record("upstream_lost", "abandoned")
            return False
        self._adopt(prepared)
        self._done("upstream_lost", "resumed", prepared, old_id, time.perf_counter() - began)
        return True

    def notify(self) -> None:
        """The upstream changed or the session ended: wake whoever waits in `settled`."""
        self._settled.set()
        self._settled = asyncio.Event()

    async def settled(self, failed: UpstreamSocket) -> UpstreamSocket | None:
        """After a send to ``failed`` broke: the upstream that replaced it, or None once the
        session is ending."""
        while self.bridge.upstream is failed and self.bridge.ending is None:
            await self._settled.wait()
        return None if self.bridge.ending is not None else self.bridge.upstream

    # --- the renewal task --------------------------------------------------------------------

    async def run(self) -> None:
        """Renew before each expiry, for as long as the session lasts."""
        try:
            await self._renew_each_expiry()
        finally:
            for timer in (self._recheck, self._answer_due, *self._transcripts.values()):
                if timer is not None:  # no timer outlives its session
                    timer.cancel()
            self._recheck = self._answer_due = None
            self._transcripts.clear()

    async def _renew_each_expiry(self) -> None:
        while True:
            expires_at = _expires_at(self.bridge.session)
            if expires_at is None:
                return
            lifetime = expires_at - self._began
            renew_at = max(
                expires_at - self.settings.renew_before_seconds,
                self._began + _EARLIEST_RENEWAL * lifetime,
            )
            await asyncio.sleep(max(0.0, renew_at - self._clock()))
            if _expires_at(self.bridge.session) != expires_at:
                continue  # resumed meanwhile: a new expiry
            if await self.renew(expires_at):
                continue
            remaining = expires_at - _EXPIRY_MARGIN_SECONDS - self._clock()
            if remaining <= self._setup_seconds:
                return  # no time left: the service's own expiry reaches the client
            await asyncio.sleep(min(_RETRY_SECONDS, remaining / 2))

    async def renew(self, expires_at: float) -> bool:
        """One renewal attempt before ``expires_at``; True when the session moved to a new
        upstream, by this renewal or by a resume that came first."""
        old = self.bridge.upstream
        old_id = self.bridge.session.get("id")
        deadline = expires_at - _EXPIRY_MARGIN_SECONDS
        # Quiet points wait for playback in the first half of the window only.
        relax_at = (self._clock() + deadline) / 2
        prepared: Prepared | None = None
        try:
            if not await self._until_quiet(old, deadline, relax_at):
                return True  # a resume replaced the upstream meanwhile: its expiry is new
            prepared = await self._prepare()
            while True:
                if not await self._until_quiet(old, deadline, relax_at):
                    await _close(prepared.upstream, "renewal superseded by a resume")
                    return True
                if self.bridge.ending is not None:
                    raise RenewalFailed("abandoned", "the session ended")
                began = time.perf_counter()
                if await self._switch_over(old, prepared):
                    pause = time.perf_counter() - began
                    break
        except RenewalFailed as failure:
            self._record("expiry", failure.outcome)
            _log.warning("session_renewal_failed", outcome=failure.outcome, detail=failure.detail)
            if prepared is not None and self.bridge.upstream is not prepared.upstream:
                await _close(prepared.upstream, "renewal abandoned")
            return False
        except BaseException:
            if prepared is not None and self.bridge.upstream is not prepared.upstream:
                await _close(prepared.upstream, "renewal abandoned")
            raise
        self._done("expiry", "renewed", prepared, old_id, pause)
        await _close(old, "session renewed")
        return True

    async def _until_quiet(self, old: UpstreamSocket, deadline: float, relax_at: float) -> bool:
        """Wait for a quiet point on ``old``; False when a resume replaced it meanwhile. A
        resume reports the cut response, which makes the session quiet while the new upstream
        is still being dialled: a switch then would go to the lost one."""
        now = self._clock()
        self._mind_playback = now < relax_at
        if not self._quiet_now():
            self.quiet.clear()
        relax = asyncio.get_running_loop().call_later(
            max(0.0, relax_at - now), self._stop_minding_playback
        )
        try:
            async with asyncio.timeout(max(0.0, deadline - now)):
                await self.quiet.wait()
                while self._resuming:
                    await self._settled.wait()
        except TimeoutError as exc:
            raise RenewalFailed("no_quiet_point", "no quiet point before the expiry") from exc
        finally:
            relax.cancel()
        return self.bridge.upstream is old

    def _stop_minding_playback(self) -> None:
        self._mind_playback = False
        if self._quiet_now():
            self.quiet.set()

    async def _switch_over(self, old: UpstreamSocket, prepared: Prepared) -> bool:
        """Hold client frames, send the marker, let the upstream pump swap at its answer."""
        marker = MARKER_PREFIX.decode() + secrets.token_hex(8)
        self._markers.append(marker)
        del self._markers[:-_MAX_MARKERS]
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._switch = _Switch(marker, prepared, done)
        self.bridge.gate.clear()
        retrieve = {"type": "conversation.item.retrieve", "event_id": marker, "item_id": marker}
        try:
            # After any fragmented message the client pump is writing (`frames.send_text`).
            await frames.send_text(old, orjson.dumps(retrieve))
            async with asyncio.timeout(HOLD_SECONDS):
                return await asyncio.shield(done)
        except (TimeoutError, ConnectionError) as exc:
            if self.bridge.upstream is prepared.upstream:
                return True  # swapped just as the wait ran out
            raise RenewalFailed("switch_timeout", "the old upstream did not answer") from exc
        finally:
            if self._switch is not None and self._switch.done is done:
                self._switch = None
            if not done.done():
                done.cancel()
            self.bridge.gate.set()

    # --- shared ------------------------------------------------------------------------------

    async def _prepare(self, lost: Backend | None = None) -> Prepared:
        """Dial, put the session in force and replay the conversation; or RenewalFailed."""
        bridge, flavour = self.bridge, self.settings.flavour
        note = NOTE_PREFIX + secrets.token_hex(6) if speaks(bridge.session) else None
        plan = plan_replay(
            self.shadow,
            flavour=flavour,
            max_tokens=self.settings.max_replay_tokens,
            note_id=note,
            audio=self.keeper,
        )
        try:
            backend, upstream = await self._dial(lost)
        except HttpRefusal as refusal:
            raise RenewalFailed("dial_failed", refusal.code) from refusal
        source = bridge.session
        try:
            started = await put_in_force(
                upstream,
                bridge.policy,
                session_update(source, flavour),
                setup_seconds=self._setup_seconds,
            )
            async with asyncio.timeout(self._setup_seconds):
                await self._replay(upstream, plan.frames, plan.item_ids)
        except (HttpRefusal, TimeoutError, ConnectionError, RenewalFailed) as exc:
            await _close(upstream, "renewal failed")
            if isinstance(exc, RenewalFailed):
                raise
            raise RenewalFailed("setup_failed", str(exc) or type(exc).__name__) from exc
        except BaseException:
            await _close(upstream, "renewal cancelled")
            raise
        return Prepared(upstream, backend, started.session, source, plan, set(plan.item_ids))

    async def _set_session(self, prepared: Prepared) -> None:
        """Put the session in force now on the prepared upstream, and take what it says."""
        source = self.bridge.session
        updated = self.bridge.policy.session_event("updated")
        await prepared.upstream.send_frame(
            session_update(source, self.settings.flavour), WSMsgType.TEXT
        )
        while True:
            msg = await prepared.upstream.receive()
            if msg.type is not WSMsgType.TEXT:
                raise RenewalFailed("switch_failed", f"the new upstream closed ({msg.type.name})")
            event = orjson.loads(msg.data)
            if event.get("type") == updated:
                prepared.session = event.get("session") or prepared.session
                prepared.source = source
                return
            if event.get("type") == "error":
                error = event.get("error") or {}
                raise RenewalFailed("switch_failed", str(error.get("message", "")))

    async def _replay(
        self, upstream: UpstreamSocket, frames: tuple[bytes, ...] | list[bytes], ids: Any
    ) -> None:
        """Send ``frames``; read until each item of ``ids`` is confirmed (its own events are
        swallowed: none reaches the client)."""
        confirm = "conversation.item.done" if self.settings.flavour == "ga" else None
        waiting = set(ids)
        for frame in frames:
            await upstream.send_frame(frame, WSMsgType.TEXT)
        deletes = sum(1 for f in frames if b'"conversation.item.delete"' in f)
        while waiting or deletes:
            msg = await upstream.receive()
            if msg.type is not WSMsgType.TEXT:
                raise RenewalFailed("replay_failed", f"the new upstream closed ({msg.type.name})")
            try:
                kind = sniff_type(msg.data)
            except FrameError as exc:
                raise RenewalFailed("replay_failed", exc.code) from exc
            if kind == (confirm or "conversation.item.created"):
                item = orjson.loads(msg.data).get("item") or {}
                waiting.discard(item.get("id"))
            elif kind == "conversation.item.deleted":
                deletes -= 1
            elif kind == "error":
                error = orjson.loads(msg.data).get("error") or {}
                raise RenewalFailed("replay_rejected", str(error.get("message", "")))

    def _adopt(self, prepared: Prepared) -> None:
        bridge = self.bridge
        bridge.upstream = prepared.upstream
        bridge.session = prepared.session
        bridge.meter.session_changed(prepared.session)
        self._began = self._clock()
        # What the new upstream does not hold is gone from the conversation: the shadow
        # forgets it too, so it does not grow across renewals.
        for item_id in self.shadow.keep_only(prepared.present):
            if self.keeper is not None:
                self.keeper.forget(item_id)
        if self.keeper is not None:
            self.keeper.new_session()
        shadow = self.shadow
        self.textified = {
            i for i in prepared.present if i in shadow.items and spoken_reply(shadow.items[i].wire)
        }
        first = prepared.plan.item_ids[0] if prepared.plan.item_ids else None
        self._first = first if first is not None and first.startswith(NOTE_PREFIX) else None
        self._note_token = orjson.dumps(self._first) if self._first else b""
        self._emptying.clear()  # edits sent to the old upstream: moot on this one
        self._backend = prepared.backend
        self.notify()

    async def _report_cut_response(self) -> None:
        shadow = self.shadow
        if shadow.response_id is not None:
            frame = cut_response_done(shadow.response_id, "relay_" + secrets.token_hex(8))
            await self.bridge._send_to_client(frame)
        shadow.response_id = None
        shadow.speaking = False
        self._requested = False  # a request the lost upstream had not started is lost with it
        self.bridge.responses_lost()
        self.quiet.set()

    def _record(self, reason: str, outcome: str) -> None:
        self._metrics.session_renewals.labels(self._deployment, reason, outcome).inc()

    def _done(
        self, reason: str, outcome: str, prepared: Prepared, old_id: Any, pause: float
    ) -> None:
        self._record(reason, outcome)
        self.moves += 1
        self._metrics.switch_pause.labels(self._deployment).observe(pause)
        plan = prepared.plan
        self._metrics.replayed_items.labels(self._deployment).inc(len(plan.item_ids))
        self._metrics.replayed_tokens.labels(self._deployment).inc(plan.tokens)
        _log.info(
            "session_renewed",
            reason=reason,
            old_upstream_session_id=old_id,
            new_upstream_session_id=prepared.session.get("id"),
            backend=prepared.backend.name,
            switch_pause_seconds=round(pause, 6),
            replayed_items=len(plan.item_ids),
            replayed_tokens=plan.tokens,
            replayed_audio_seconds=round(plan.audio_seconds, 3),
            dropped_items=plan.dropped,
        )


def _error_event_id(frame: bytes) -> Any:
    try:
        event = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    error = event.get("error") if isinstance(event, dict) else None
    return error.get("event_id") if isinstance(error, dict) else None


def _expires_at(session: dict[str, Any]) -> float | None:
    value = session.get("expires_at")
    return float(value) if isinstance(value, int | float) and value > 0 else None


def _settle(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


def _settle_failed(future: asyncio.Future[bool], failure: RenewalFailed) -> None:
    if not future.done():
        future.set_exception(failure)


async def _close(upstream: UpstreamSocket, reason: str) -> None:
    try:
        async with asyncio.timeout(HOLD_SECONDS * 5):
            await upstream.close(code=1000, message=reason.encode())
    except (TimeoutError, ConnectionError):
        pass  # aiohttp has dropped the connection
    frames.forget_error(upstream)
