"""The relay's own sideband socket on each call it places (``webrtc.observe = true``).

How it works:
- Placing the call took a session slot (`max_sessions`); the watch holds it until the call
  ends. Its socket is ``wss://…/openai/v1/realtime?call_id=…`` on the backend that placed
  the call, with the relay's credential.
- It sends the team's defaults (`session.update`), so relay-key calls get them too, then
  reads every event of the call: the session meter counts them (tokens, responses, errors);
  on a call the audio is media, so time to first audio runs from the end of the user's turn
  to ``output_audio_buffer.started``, output audio seconds from ``started`` to ``stopped``,
  and input audio seconds are the input position the service reports (``audio_end_ms``).
- Each `session.updated` is judged (`restore.judge_reported`): a change the policy refuses
  is undone and counted as a violation, like a refused event on the WebSocket path.
- At the policy's ``max_session_seconds`` it hangs the call up (call control); otherwise the
  call ends when the service closes the sideband socket (the device hung up, a client's
  ``hangup``). Outcome, duration and usage are logged and counted like a session's.
- A relay shutdown closes the socket (the call itself goes on, unobserved).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import structlog

from relay.edge.admission import Lease
from relay.edge.webrtc.forward import Outbound, forward
from relay.errors import HttpRefusal
from relay.ops.config import DeploymentConfig, TeamConfig
from relay.ops.logsetup import fresh_context
from relay.ops.metrics import SessionMeter
from relay.session import shared_strings
from relay.session.codec import FrameError, sniff_type
from relay.session.policy import SessionPolicy
from relay.session.reported import judge_reported
from relay.state import RelayState
from relay.upstream.backends import Backend
from relay.upstream.dial import UpstreamSocket, open_upstream, socket_options
from relay.upstream.handshake import UpstreamTarget

_log = structlog.get_logger("relay.edge.webrtc")
_TURN_END = frozenset({"input_audio_buffer.speech_stopped", "input_audio_buffer.committed"})


@dataclass(slots=True)
class CallWatch:
    """One observed call: what the relay knows of it while it lives."""

    call_id: str
    team: TeamConfig
    deployment: DeploymentConfig
    backend: Backend
    policy: SessionPolicy
    lease: Lease
    meter: SessionMeter
    # Set once the session in force is known (the defaults confirmed).
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when the call has ended and everything is counted.
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    session: dict[str, Any] | None = None
    violations: int = 0
    outcome: str = ""
    input_audio_ms: int = 0
    _turn_ended_at: float | None = None
    _speaking_since: float | None = None

    # --- events (pure but for the meter) ----------------------------------------------------

    def on_event(self, kind: str, frame: bytes, now: float) -> bytes | None:
        """Count one event of the call; the `session.update` to send back, if any."""
        self.meter.upstream_event(kind, frame)
        if kind == self.policy.session_event("updated"):
            return self._session_updated(frame)
        if kind in _TURN_END:
            end_ms = orjson.loads(frame).get("audio_end_ms")
            if isinstance(end_ms, int) and end_ms > self.input_audio_ms:
                self._count_input_audio(end_ms)
            if self._turn_ended_at is None:
                self._turn_ended_at = now
        elif kind == "output_audio_buffer.started":
            if self._turn_ended_at is not None:
                metrics = self.meter.metrics
                labels = (self.team.name, self.deployment.name, self.backend.name)
                metrics.time_to_first_audio.labels(*labels).observe(now - self._turn_ended_at)
                self._turn_ended_at = None
            self._speaking_since = now
        elif kind in ("output_audio_buffer.stopped", "output_audio_buffer.cleared"):
            if self._speaking_since is not None:
                self._count_audio("out", now - self._speaking_since)
                self._speaking_since = None
        return None

    def _session_updated(self, frame: bytes) -> bytes | None:
        reported = orjson.loads(frame).get("session")
        if not isinstance(reported, dict):
            return None
        shared_strings.share(reported)  # kept for the call's life: see shared_strings
        if self.session is None:
            # The first report (the answer to the relay's defaults, if it sent any) is the
            # session in force from then on.
            self.session = reported
            self.meter.session_changed(reported)
            self.ready.set()
            return None
        verdict = judge_reported(self.policy, self.session, reported)
        self.session = verdict.in_force
        self.meter.session_changed(verdict.in_force)
        if verdict.violation is not None:
            self.violations += 1
            self.meter.violation(verdict.violation.code)
            _log.info(
                "call_session_restored",
                code=verdict.violation.code,
                param=verdict.violation.param,
                violations=self.violations,
            )
        return verdict.update

    def _count_input_audio(self, end_ms: int) -> None:
        self._count_audio("in", (end_ms - self.input_audio_ms) / 1000)
        self.input_audio_ms = end_ms

    def _count_audio(self, direction: str, seconds: float) -> None:
        self.meter.audio_seconds_total[direction] += seconds
        labels = (direction, self.team.name, self.deployment.name)
        self.meter.metrics.audio_seconds.labels(*labels).inc(seconds)


async def watch_call(state: RelayState, watch: CallWatch) -> None:
    """Observe the call until it ends; count it; give its slot back. Never raises."""
    fresh_context()  # not the placing request's
    structlog.contextvars.bind_contextvars(
        call_id=watch.call_id,
        team=watch.team.name,
        deployment=watch.deployment.name,
        backend=watch.backend.name,
    )
    metrics, labels = state.metrics, (watch.team.name, watch.deployment.name)
    began = time.perf_counter()
    metrics.sessions_active.labels(*labels).inc()
    try:
        upstream = await _open(state, watch)
        try:
            await _follow(state, watch, upstream)
        finally:
            await upstream.close(code=1000, message=b"observer done")
    except HttpRefusal as refusal:
        watch.outcome = watch.outcome or "observer_failed"
        _log.warning("call_observer_failed", status=refusal.status, code=refusal.code)
    except asyncio.CancelledError:
        watch.outcome = watch.outcome or "relay_closed"
        raise
    except Exception:
        watch.outcome = watch.outcome or "relay_internal_error"
        _log.exception("call_observer_failed")
    finally:
        await watch.lease.release()
        metrics.sessions_active.labels(*labels).dec()
        duration = time.perf_counter() - began
        watch.meter.flush()
        metrics.sessions.labels(*labels, watch.outcome).inc()
        metrics.session_duration.labels(*labels).observe(duration)
        _log.info(
            "call_ended",
            duration_seconds=round(duration, 3),
            outcome=watch.outcome,
            audio_seconds_in=round(watch.meter.audio_seconds_total["in"], 3),
            audio_seconds_out=round(watch.meter.audio_seconds_total["out"], 3),
            tokens=dict(watch.meter.tokens),
            responses=watch.meter.responses,
            violations=watch.violations,
        )
        watch.ended.set()


async def _open(state: RelayState, watch: CallWatch) -> UpstreamSocket:
    assert state.dialer is not None
    config = state.live.config
    return await open_upstream(
        state.dialer,
        UpstreamTarget.of(watch.backend.url.with_query({"call_id": watch.call_id})),
        watch.backend.credential,
        request_id=watch.call_id,
        connect_timeout=config.upstream.connect_timeout_seconds,
        options=socket_options(config),
    )


async def _follow(state: RelayState, watch: CallWatch, upstream: UpstreamSocket) -> None:
    defaults = watch.policy.defaults_event()
    if defaults is not None:
        await upstream.send_frame(defaults, aiohttp.WSMsgType.TEXT)
    else:
        watch.ready.set()  # nothing to put in force
    async with asyncio.TaskGroup() as tasks:
        reader = tasks.create_task(_read(watch, upstream), name=f"observe {watch.call_id}")
        ticker = tasks.create_task(_tick(state, watch), name=f"call ticker {watch.call_id}")
        await asyncio.wait([reader])
        ticker.cancel()


async def _read(watch: CallWatch, upstream: UpstreamSocket) -> None:
    while True:
        msg = await upstream.receive()
        if msg.type is not aiohttp.WSMsgType.TEXT:
            clean = msg.type is aiohttp.WSMsgType.CLOSE
            watch.outcome = watch.outcome or ("upstream_closed" if clean else "upstream_lost")
            return
        try:
            kind = sniff_type(msg.data)
        except FrameError:
            continue  # the call goes on; its events are the device's business
        update = watch.on_event(kind, msg.data, time.perf_counter())
        if update is not None:
            await upstream.send_frame(update, aiohttp.WSMsgType.TEXT)


async def _tick(state: RelayState, watch: CallWatch) -> None:
    """Flush the meter every second; hang the call up at its duration limit, or once its
    team is over budget (with `live_sessions_over_budget = "end"`): a call is costed like a
    session, and would otherwise spend on past the budget to its duration limit."""
    loop = asyncio.get_running_loop()
    limit = watch.policy.max_session_seconds
    deadline = None if limit is None else loop.time() + limit
    budgets, team = state.budgets, watch.team.name
    while deadline is None or loop.time() < deadline:
        wake = 1.0 if deadline is None else min(1.0, deadline - loop.time())
        await asyncio.sleep(max(wake, 0))  # a second's tick: the meter's flush
        watch.meter.flush()
        over = budgets.over(team) if budgets.ends_live_sessions(team) else None
        if over is not None:
            watch.outcome = "budget_exceeded"
            _log.info("call_over_budget", window=over.window)
            await hang_up(state, watch.deployment, watch.backend, watch.call_id)
            return
    watch.outcome = "session_expired"
    _log.info("call_duration_limit", max_session_seconds=limit)
    await hang_up(state, watch.deployment, watch.backend, watch.call_id)


async def hang_up(
    state: RelayState, deployment: DeploymentConfig, backend: Backend, call_id: str
) -> None:
    """Hang the call up with the relay's credential; log a failure (the caller goes on)."""
    outbound = Outbound(
        f"calls/{call_id}/hangup",
        "application/json",
        lambda b: b"",
        lambda b: {},
        passed=frozenset({404}),  # the call had already ended
    )
    try:
        await forward(state, state.live, deployment, [backend], outbound)
    except HttpRefusal as refusal:
        _log.warning("call_hangup_failed", status=refusal.status, code=refusal.code)
