"""A client's sideband socket on a WebRTC call the relay placed:
``GET /openai/v1/realtime?call_id=…`` (or ``/v1/realtime``) with the relay key of the team that
placed the call. It is dialled to the backend that placed the call with the relay's
credential and bridged like any session (the team's policy on the client's events, the
duration limit of the socket); another team's key, or an unknown call, gets 404.

The service sends no ``session.created`` on a sideband socket; the session in force starts
as the team's defaults (what the relay put in force) and follows ``session.updated``. The
socket takes no session slot: the call holds one when the relay observes it. When the relay
observes the call, usage is counted there, not twice.
"""

from __future__ import annotations

import time
from dataclasses import replace

from aiohttp import web

from relay.edge.handlers import (
    Admitted,
    admit_client,
    check_handshake,
    run_session,
    upstream_failed,
)
from relay.edge.handlers import realtime as conversation
from relay.edge.webrtc.access import owned_call
from relay.edge.webrtc.handlers import WEBRTC
from relay.errors import UpstreamRefused
from relay.ops.metrics import SessionMeter
from relay.session.dialect import Translator
from relay.session.setup import StartedSession
from relay.session.transcription import transcription_policy
from relay.state import LiveConfig, RelayState
from relay.upstream.dial import open_upstream, socket_options
from relay.upstream.handshake import UpstreamTarget

# The paths that serve sideband sockets (the service's GA path, and OpenAI's).
SIDEBAND_PATHS = ("/openai/v1/realtime", "/v1/realtime")


async def realtime(request: web.Request) -> web.StreamResponse:
    """A realtime WebSocket: a call's sideband with ``call_id``, else a session."""
    if "call_id" in request.query:
        return await run_session(request, _admit)
    return await conversation(request)


class _EventsOnlyMeter(SessionMeter):
    """Counts a sideband's events but not its usage, which the call's observer counts."""

    __slots__ = ()

    def _response_done(self, frame: bytes) -> None:
        pass

    def _transcription_usage(self, frame: bytes) -> None:
        pass


async def _admit(
    request: web.Request, state: RelayState, live: LiveConfig, session_id: str
) -> Admitted:
    team, opened_by, wanted = await admit_client(request, state, live)
    assert wanted.call_id is not None
    state.check_open()
    state.budgets.check(team.name)  # a sideband can start responses
    check_handshake(request)
    placed, deployment, backend = await owned_call(
        live, request.app[WEBRTC].calls, team, wanted.call_id
    )
    assert state.dialer is not None
    config = live.config
    # A client's sideband socket is bridged like a session, with an upstream socket of its
    # own: it takes a session slot of its team (within max_sessions and the rates), as the
    # relay's own observer of a call does. Else a team could hold any number of them.
    lease = await state.admission.acquire(team.name)
    began = time.perf_counter()
    try:
        upstream = await open_upstream(
            state.dialer,
            UpstreamTarget.of(backend.url.with_query({"call_id": wanted.call_id})),
            backend.credential,
            request_id=session_id,
            connect_timeout=config.upstream.connect_timeout_seconds,
            options=socket_options(config),
        )
    except BaseException as failure:
        await lease.release()
        if isinstance(failure, UpstreamRefused):
            upstream_failed(state, deployment, backend, failure)
        raise
    handshake_seconds = time.perf_counter() - began
    state.metrics.upstream_handshake.labels(deployment.name, backend.name).observe(
        handshake_seconds
    )
    policy = live.policies[team.name, deployment.name]
    if deployment.kind == "transcription":
        policy = transcription_policy(policy, backend.config.azure_deployment)
    if placed.observed:  # the call's limit is the observer's to enforce, on the call
        policy = replace(policy, max_session_seconds=None)
    started = StartedSession(None, dict(policy.defaults), policy=policy)
    meter = _EventsOnlyMeter if placed.observed else SessionMeter
    # A call's sideband observes the call: it cannot move to another upstream session.
    # A call speaks GA; a preview-dialect client of its sideband is translated.
    translator = Translator(wanted.dialect, "ga") if wanted.dialect != "ga" else None
    return Admitted(
        team,
        deployment,
        lease,
        backend,
        upstream,
        started,
        None,
        meter=meter,
        opened_by=opened_by,
        translator=translator,
    )
