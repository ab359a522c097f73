"""HTTP handlers: the realtime WebSocket endpoint and the health probes.

The realtime handler refuses everything it can before the upgrade, as an HTTP status with a
JSON body: a wrong key, an unknown or forbidden deployment, and every upstream handshake
failure. Only when the upstream socket is open does the client's upgrade complete.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
import structlog
from aiohttp import WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST

from relay.edge.admission import Lease
from relay.edge.auth import (
    REALTIME_SUBPROTOCOL,
    find_key,
    hash_key,
    offered_subprotocols,
    offers_only_credentials,
)
from relay.edge.connection import ClientSocket
from relay.edge.responses import error_response, error_type
from relay.edge.routes import RealtimeRequest, parse_realtime_request, resolve_deployment
from relay.errors import ClientRefused, HttpRefusal, RequestRejected, UpstreamRefused
from relay.live import revoke_sessions
from relay.ops.config import DeploymentConfig, TeamConfig
from relay.ops.exposition import exposition
from relay.ops.logsetup import describe_error, fresh_context, redact_url
from relay.ops.metrics import SessionMeter
from relay.ops.redaction import SECRETS
from relay.session.dialect import Translator
from relay.session.events import error_event
from relay.session.pump import Bridge, Ending
from relay.session.renewal import Dial, Renewal
from relay.session.setup import StartedSession, start_session
from relay.session.transcription import transcription_policy
from relay.state import METRICS_TOKEN, REGISTRY, RELOAD, STATE, LiveConfig, RelayState, SessionKey
from relay.upstream.backends import Backend
from relay.upstream.dial import UpstreamSocket, connect_pool, socket_options
from relay.upstream.handshake import abort as abort_upstream

_log = structlog.get_logger("relay.session")


@dataclass(slots=True)
class Admitted:
    """A request that passed every check, with its upstream session started."""

    team: TeamConfig
    deployment: DeploymentConfig
    lease: Lease
    backend: Backend
    upstream: UpstreamSocket
    started: StartedSession
    # Opens another upstream for this session (continuity); None when it cannot have one.
    dial: Dial | None
    # What meters the session (a call's sideband may leave usage to the call's observer).
    meter: type[SessionMeter] = SessionMeter
    # Which key opened the session: a reload that removes it ends the session.
    opened_by: SessionKey | None = None
    # Set when the client speaks the other dialect than the deployment.
    translator: Translator | None = None


Admit = Callable[[web.Request, RelayState, LiveConfig, str], Awaitable[Admitted]]


async def realtime(request: web.Request) -> web.StreamResponse:
    return await run_session(request, _admit)


async def run_session(request: web.Request, admit: Admit) -> web.StreamResponse:
    """Admit a WebSocket session (``admit``: every check and the upstream start), or answer
    the refusal; then serve it to its end."""
    state = request.app[STATE]
    await state.set_up_gate.turn()  # a burst of set-ups is spread over passes of the loop
    live = state.live  # this request's config, whatever a reload does meanwhile
    session_id = "rs_" + secrets.token_hex(8)
    began = time.perf_counter()
    # Every log line of this session carries these (tasks it starts inherit them).
    fresh_context()
    structlog.contextvars.bind_contextvars(session_id=session_id, peer=live.client_address(request))
    try:
        admitted = await admit(request, state, live, session_id)
    except HttpRefusal as refusal:
        team = team_label(state)
        state.metrics.session_refusals.labels(team, str(refusal.status), refusal.code).inc()
        _log.warning(
            "session_refused",
            status=refusal.status,
            code=refusal.code,
            url=redact_url(request.rel_url),
            cause=describe_error(refusal.__cause__),
        )
        if _reads_refusals_in_band(request):
            return await _refuse_in_band(request, refusal)
        return error_response(refusal)
    try:
        return await _serve(request, state, live, admitted, began)
    finally:
        await admitted.lease.release()


def team_label(state: RelayState) -> str:
    """The team this request authenticated as, for a metric label: a configured team's name
    (bounded), else "unknown"."""
    team = structlog.contextvars.get_contextvars().get("team")
    return team if isinstance(team, str) and team in state.live.config.teams else "unknown"


def _reads_refusals_in_band(request: web.Request) -> bool:
    """A browser cannot read a refused handshake's status or body: its WebSocket just closes
    (1006). Clients that offer the `realtime` subprotocol (browsers, by OpenAI's convention)
    get the upgrade instead, then the refusal as an `error` event and a close."""
    offered = offered_subprotocols(request.headers.get("Sec-WebSocket-Protocol", ""))
    # A malformed upgrade cannot be completed to carry the refusal: it is answered over HTTP.
    return REALTIME_SUBPROTOCOL in offered and _upgradable(request)


async def _refuse_in_band(request: web.Request, refusal: HttpRefusal) -> web.WebSocketResponse:
    """The refusal as the service's `error` event, then close code 4000 + the HTTP status
    (4401 for a wrong key) with the error code as the reason. Nothing is read from the client."""
    param = refusal.param if isinstance(refusal, RequestRejected) else None
    client = web.WebSocketResponse(
        protocols=(REALTIME_SUBPROTOCOL,),
        compress=False,
        timeout=request.app[STATE].live.config.server.close_timeout_seconds,
    )
    event = error_event(refusal.code, refusal.message, error_type=error_type(refusal), param=param)
    try:
        await client.prepare(request)
        await client.send_frame(event, WSMsgType.TEXT)
        await client.close(code=4000 + refusal.status, message=refusal.code.encode())
    except ConnectionResetError:
        pass  # the client left first: nothing more to tell it
    return client


async def _admit(
    request: web.Request, state: RelayState, live: LiveConfig, session_id: str
) -> Admitted:
    """Every check and the upstream start, before the client's upgrade; or an HttpRefusal."""
    team, opened_by, wanted = await admit_client(request, state, live)
    if wanted.call_id is not None:
        raise RequestRejected(
            "unsupported_parameter",
            "A call's sideband socket is served on /openai/v1/realtime?call_id=… "
            "(or /v1/realtime?call_id=…).",
            "call_id",
        )
    deployment = resolve_deployment(wanted, team, live.config.deployments)
    structlog.contextvars.bind_contextvars(deployment=deployment.name, dialect=wanted.dialect)
    translator = None
    if wanted.dialect != deployment.protocol:
        translator = Translator(wanted.dialect, deployment.protocol)
    state.check_open()
    state.budgets.check(team.name)
    check_handshake(request)
    lease = await state.admission.acquire(team.name)
    dial = _dialer(state, deployment, session_id)
    try:
        backend, upstream, started = await _start_upstream(state, live, deployment, team, dial)
        if state.draining:
            # The drain began while the upstream was set up, and ended the sessions it knew:
            # refused now, not upgraded into a shutdown that would drop it unexplained.
            await upstream.close(code=1001, message=b"relay shutting down")
            state.check_open()
    except BaseException:
        await lease.release()
        raise
    # Transcription sessions have no conversation to carry over.
    renewable = deployment.kind != "transcription"
    return Admitted(
        team,
        deployment,
        lease,
        backend,
        upstream,
        started,
        dial if renewable else None,
        opened_by=opened_by,
        translator=translator,
    )


async def admit_client(
    request: web.Request, state: RelayState, live: LiveConfig
) -> tuple[TeamConfig, SessionKey, RealtimeRequest]:
    """The checks of any WebSocket request: an upgrade, its Origin, its key; the key's team,
    which key it was, and what the request asks."""
    if request.headers.get("Upgrade", "").lower() != "websocket":
        raise ClientRefused(
            400, "websocket_required", "This endpoint takes WebSocket connections only."
        )
    origin = request.headers.get("Origin")
    if origin is not None and not live.origin_allowed(origin, request.host):
        raise ClientRefused(403, "origin_not_allowed", "This Origin may not connect.")
    address = live.client_address(request)
    subprotocols = offered_subprotocols(request.headers.get("Sec-WebSocket-Protocol", ""))
    key = find_key(request.headers, request.query, subprotocols)
    SECRETS.in_this_request(key)
    team, key_hash = await _authenticate(state, live, address, key)
    structlog.contextvars.bind_contextvars(team=team.name)
    wanted = parse_realtime_request(request.query, request.headers, subprotocols, request.path)
    return team, SessionKey(key_hash, team.name), wanted


def check_handshake(request: web.Request) -> None:
    """Refuse a malformed upgrade before the upstream is dialled. aiohttp finds it only once
    the client's upgrade is under way: after the upstream session has started, in plain text
    ("Handshake error: None"). Checked after the other refusals, so that a plain request with
    `Upgrade: websocket` still reads why it would be refused."""
    if offers_only_credentials(
        offered_subprotocols(request.headers.get("Sec-WebSocket-Protocol", ""))
    ):
        # Upgraded, such a client would abort at once, after an upstream session was started.
        raise ClientRefused(
            400,
            "realtime_subprotocol_required",
            "Offer the `realtime` subprotocol with the key's: "
            "['realtime', 'openai-insecure-api-key.<key>'].",
        )
    if not _upgradable(request):
        raise ClientRefused(
            400,
            "websocket_handshake_invalid",
            "The WebSocket upgrade is malformed: a GET with `Connection: Upgrade`, "
            "`Sec-WebSocket-Version: 13` and a `Sec-WebSocket-Key` is needed (RFC 6455 4.1).",
        )


def _upgradable(request: web.Request) -> bool:
    """Whether aiohttp would complete this request's WebSocket upgrade. Asked with the
    subprotocol the relay's sockets take: offered it, aiohttp logs no warning naming the
    offered ones (a browser's carry its key)."""
    return web.WebSocketResponse(protocols=(REALTIME_SUBPROTOCOL,)).can_prepare(request).ok


async def _authenticate(
    state: RelayState, live: LiveConfig, address: str, key: str | None
) -> tuple[TeamConfig, bytes]:
    """The key's team and the key's hash; or a refusal. The brake is asked once the key is
    judged (`AuthBrake`)."""
    if key is None:
        await state.auth_throttle.failed(address)
        raise ClientRefused(
            401,
            "missing_api_key",
            "No relay key: send it as the `api-key` header, `Authorization: Bearer`, "
            "or the `openai-insecure-api-key.<key>` subprotocol.",
        )
    key_hash = hash_key(key).encode("ascii")
    team = live.keyring.identify_hash(key_hash)
    if team is None:
        await state.auth_throttle.failed(address)
        raise ClientRefused(401, "invalid_api_key", "The relay key is not valid.")
    await state.auth_throttle.check(address)
    return team, key_hash


def _dialer(state: RelayState, deployment: DeploymentConfig, session_id: str) -> Dial:
    """Opens an upstream socket through the deployment's pool in the config in force (failing
    over), for the session start and for continuity's renewals. A backend given as ``lost``
    is counted as failed and tried last."""
    assert state.dialer is not None
    dialer, metrics = state.dialer, state.metrics

    async def dial(lost: Backend | None = None) -> tuple[Backend, UpstreamSocket]:
        live = state.live  # a renewal after a reload dials as the reload says
        config, pool = live.config, live.pools.get(deployment.name)
        if pool is None:
            raise UpstreamRefused(
                503, "no_backend_available", "The deployment is no longer configured."
            )
        if lost is not None:
            pool.failed(lost, _LOST)
        began = time.perf_counter()
        backend, upstream = await connect_pool(
            dialer,
            pool,
            request_id=session_id,
            connect_timeout=config.upstream.connect_timeout_seconds,
            options=socket_options(config),
            on_failure=lambda backend, refusal: upstream_failed(
                state, deployment, backend, refusal
            ),
            last=lost,
        )
        handshake_seconds = time.perf_counter() - began
        metrics.upstream_handshake.labels(deployment.name, backend.name).observe(handshake_seconds)
        return backend, upstream

    return dial


async def _start_upstream(
    state: RelayState,
    live: LiveConfig,
    deployment: DeploymentConfig,
    team: TeamConfig,
    dial: Dial,
) -> tuple[Backend, UpstreamSocket, StartedSession]:
    config = live.config
    backend, upstream = await dial(None)
    structlog.contextvars.bind_contextvars(backend=backend.name)
    policy = live.policies[team.name, deployment.name]
    if deployment.kind == "transcription":
        policy = transcription_policy(policy, backend.config.azure_deployment)
    try:
        started = await start_session(
            upstream, policy, setup_seconds=config.upstream.connect_timeout_seconds
        )
    except UpstreamRefused as refused:
        if refused.status == 504:
            # Silent since its 101, it would not answer a close either: the client's 504
            # would wait close_timeout_seconds more for it.
            abort_upstream(upstream)
        else:
            await upstream.close(code=1011, message=b"session start failed")
        raise
    except BaseException:
        await upstream.close(code=1011, message=b"session start failed")
        raise
    # The service's own id for the session (Azure support asks for it), apart from ours.
    structlog.contextvars.bind_contextvars(upstream_session_id=started.session.get("id"))
    return backend, upstream, started


_LOST = UpstreamRefused(502, "upstream_lost", "The upstream connection was lost.")


def upstream_failed(
    state: RelayState, deployment: DeploymentConfig, backend: Backend, refusal: UpstreamRefused
) -> None:
    state.metrics.upstream_connect_failures.labels(
        deployment.name, backend.name, refusal.code
    ).inc()
    # With its cause (DNS, a refused connection, TLS, a status): a pool fails over, so no
    # refusal says why an ejected backend failed.
    _log.warning(
        "upstream_connect_failed",
        backend=backend.name,
        code=refusal.code,
        cause=describe_error(refusal.__cause__),
    )


async def _serve(
    request: web.Request,
    state: RelayState,
    live: LiveConfig,
    admitted: Admitted,
    began: float,
) -> web.StreamResponse:
    """Complete the upgrade and run the session to its end."""
    server = live.config.server
    team, deployment, upstream = admitted.team, admitted.deployment, admitted.upstream
    client = ClientSocket(
        linger_seconds=server.close_timeout_seconds,
        protocols=(REALTIME_SUBPROTOCOL,),
        compress=False,
        max_msg_size=server.max_message_bytes,
        message_budget=state.message_budget_for(team),
        heartbeat=server.heartbeat_seconds,
        timeout=server.close_timeout_seconds,
        decode_text=False,
        # Pings reach the pump, which answers them within a rate (a ping flood is closed).
        autoping=False,
    )
    transport = request.transport
    if transport is not None and server.client_send_buffer_bytes:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, server.client_send_buffer_bytes)
    try:
        await client.prepare(request)
    except ConnectionError as exc:
        # The client left while its upstream was set up: counted and logged as a refusal of
        # its own kind (it was an unexplained 500 on the access line alone).
        await upstream.close(code=1001, message=b"client left during set-up")
        state.metrics.session_refusals.labels(team.name, "499", "client_gone").inc()
        _log.info("session_abandoned", cause=describe_error(exc))
        return web.Response(status=499)
    except BaseException:
        await upstream.close(code=1001, message=b"client handshake failed")
        raise
    metrics, labels = state.metrics, (team.name, deployment.name)
    book = state.budgets.book
    meter = admitted.meter(
        metrics,
        *labels,
        admitted.backend.name,
        prices=deployment.prices,
        on_cost=lambda usd: book.add(team.name, usd),
    )
    started = admitted.started
    bridge = Bridge(
        client,
        upstream,
        policy=started.policy or live.policies[team.name, deployment.name],
        session=started.take_session(),
        meter=meter,
        greeting=started.take_greeting(),
        close_timeout=server.close_timeout_seconds,
        stall_timeout=server.stall_timeout_seconds,
        response_timeout=live.config.upstream.response_timeout_seconds,
        max_pings_per_second=server.max_pings_per_second,
        client_transport=transport,
        translator=admitted.translator,
    )
    continuity = live.continuity.get((team.name, deployment.name))
    if continuity is not None and admitted.dial is not None:
        bridge.renewal = Renewal(
            bridge,
            continuity,
            dial=admitted.dial,
            backend=admitted.backend,
            deployment=deployment.name,
            metrics=metrics,
            setup_seconds=live.config.upstream.connect_timeout_seconds,
        )
    state.track(bridge, admitted.opened_by)
    if state.live is not live:
        # A reload came while this session was set up, and revoked the sessions it knew:
        # this one was not among them yet.
        await revoke_sessions(state, state.live)
    setup_seconds = time.perf_counter() - began
    series = metrics.series(*labels, admitted.backend.name)
    series.session_setup.observe(setup_seconds)
    series.sessions_active.inc()
    _log.info("session_started", setup_seconds=round(setup_seconds, 6))
    try:
        await bridge.run()
    finally:
        # Also when the handler is cancelled (the client's connection dropped).
        series.sessions_active.dec()
        ending = bridge.ending or Ending("relay", 1011, "handler cancelled", cause="relay_closed")
        duration = time.perf_counter() - began
        metrics.sessions.labels(*labels, ending.outcome).inc()
        series.session_duration.observe(duration)
        _log.info(
            "session_ended",
            # What the access line said, which a session no longer logs (AccessLogger).
            url=redact_url(request.rel_url),
            duration_seconds=round(duration, 3),
            outcome=ending.outcome,
            ended_by=ending.side,
            close_code=ending.code,
            close_reason=ending.reason,
            frames_in=meter.frames_total["in"],
            frames_out=meter.frames_total["out"],
            audio_seconds_in=round(meter.audio_seconds_total["in"], 3),
            audio_seconds_out=round(meter.audio_seconds_total["out"], 3),
            tokens=dict(meter.tokens),
            transcription_seconds=round(meter.transcription_seconds, 3),
            cost_usd=round(meter.cost_usd, 6) if deployment.prices is not None else None,
            responses=meter.responses,
            violations=bridge.violations,
            event_lines_left_out=bridge.event_lines_left_out,
            # upstream_session_id names the first; session_renewed lines name the others.
            upstream_sessions=1 + (bridge.renewal.moves if bridge.renewal else 0),
        )
        client.logged_as_session = True
        bridge.renewal = None  # it holds the bridge: a cycle that only the collector would free
        _forget_when_done(state, bridge)
    return client


def _forget_when_done(state: RelayState, bridge: Bridge) -> None:
    """Forget ``bridge`` once this handler's task is done, not before. A handler aiohttp
    cancelled (the client's connection dropped) raises CancelledError through the session's
    frames; its task keeps that error, and with it the bridge, until the task finishes
    unwinding (a C task's kept CancelledError is invisible to gc.get_referrers). Forgotten
    earlier, `idle` would be set while sessions are still held."""
    task = asyncio.current_task()
    if task is None or task.done():
        state.forget(bridge)
    else:
        task.add_done_callback(lambda _: state.forget(bridge))


async def metrics(request: web.Request) -> web.Response:
    token = request.app.get(METRICS_TOKEN)
    if token is not None:
        # Guessed like a key: the same brake, the same count per address.
        state = request.app[STATE]
        address = state.live.client_address(request)
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        try:
            if scheme.lower() == "bearer" and hmac.compare_digest(
                presented.strip().encode(), token.encode()
            ):
                await state.auth_throttle.check(address)
            else:
                await state.auth_throttle.failed(address)
                raise ClientRefused(401, "invalid_metrics_token", "The metrics token is not valid.")
        except ClientRefused as refusal:
            return error_response(refusal)
    body = await exposition(request.app[REGISTRY])  # a slice at a time: frames flow meanwhile
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def status(request: web.Request) -> web.Response:
    """Backends, credentials and sessions, for operators holding an admin key."""
    state = request.app[STATE]
    live = state.live
    if refused := await _admin_refusal(request, state, live, "GET /status"):
        return refused
    body = {
        "ready": state.ready,
        "draining": state.draining,
        "sessions_active": len(state.bridges),
        "deployments": {
            name: {"protocol": pool.deployment.protocol, "backends": pool.describe()}
            for name, pool in live.pools.items()
        },
        "teams": state.budgets.describe(),
    }
    # Errors quoted in it (a token endpoint's) pass the log filter's secrets check too.
    return web.json_response(SECRETS.clean_value(body), dumps=_dumps)


async def admin_reload(request: web.Request) -> web.Response:
    """POST /admin/reload: re-read the config now and say what happened (admin key)."""
    state = request.app[STATE]
    if refused := await _admin_refusal(request, state, state.live, "POST /admin/reload"):
        return refused
    reload = request.app.get(RELOAD)
    if reload is None:
        return error_response(
            ClientRefused(503, "reload_unavailable", "This relay was not started from a file.")
        )
    result = await reload()
    status = 422 if result.get("outcome") == "rejected" else 200
    # A rejected file's errors quote its values: a secret pasted in the wrong place, which
    # the relay may already hold, is cleaned here as in the reload's log line.
    return web.json_response(SECRETS.clean_value(result), status=status, dumps=_dumps)


async def _admin_refusal(
    request: web.Request, state: RelayState, live: LiveConfig, what: str
) -> web.Response | None:
    """The refusal for a request without a valid admin key, or None. Admin keys are guessed
    like team keys: the same brake, the same count per address."""
    address = live.client_address(request)
    presented = find_key(request.headers, {}, ())
    SECRETS.in_this_request(presented)
    try:
        if presented is not None and live.admin_keys.identify(presented):
            await state.auth_throttle.check(address)
            return None
        await state.auth_throttle.failed(address)
    except ClientRefused as refusal:
        return error_response(refusal)
    _log.warning("admin_refused", endpoint=what, peer=address)
    return error_response(ClientRefused(401, "invalid_admin_key", f"{what} needs an admin key."))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, dumps=_dumps)


async def readyz(request: web.Request) -> web.Response:
    reason = request.app[STATE].unready_reason
    if reason is None:
        return web.json_response({"status": "ready"}, dumps=_dumps)
    return web.json_response({"status": "not ready", "reason": reason}, status=503, dumps=_dumps)


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()
