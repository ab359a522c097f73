"""HTTP handlers: the realtime WebSocket endpoint and the health probes.

The realtime handler refuses everything it can before the upgrade, as an HTTP status with a
JSON body: a wrong key, an unknown or forbidden deployment, and every upstream handshake
failure. Only when the upstream socket is open does the client's upgrade complete.
"""

from __future__ import annotations

import secrets
import time

import orjson
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay.auth import REALTIME_SUBPROTOCOL, find_key, offered_subprotocols
from relay.config import DeploymentConfig
from relay.errors import ClientRefused, HttpRefusal, UpstreamRefused
from relay.logsetup import redact_url
from relay.metrics import SessionMeter
from relay.pump import Bridge, Ending
from relay.routes import parse_realtime_request, resolve_deployment
from relay.session_setup import start_session
from relay.state import REGISTRY, STATE
from relay.upstream import open_upstream

_log = structlog.get_logger("relay.session")


def error_response(refusal: HttpRefusal) -> web.Response:
    error_type = "invalid_request_error" if isinstance(refusal, ClientRefused) else "server_error"
    body = {"error": {"type": error_type, "code": refusal.code, "message": refusal.message}}
    headers = {"Retry-After": refusal.retry_after} if refusal.retry_after else None
    return web.Response(
        status=refusal.status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers=headers,
    )


async def realtime(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    session_id = "rs_" + secrets.token_hex(8)
    began = time.monotonic()
    log = _log.bind(session_id=session_id, peer=request.remote)
    subprotocols = offered_subprotocols(request.headers.get("Sec-WebSocket-Protocol", ""))
    deployment: DeploymentConfig | None = None
    try:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            raise ClientRefused(
                400, "websocket_required", "This endpoint takes WebSocket connections only."
            )
        key = find_key(request.headers, request.query, subprotocols)
        if key is None:
            raise ClientRefused(
                401,
                "missing_api_key",
                "No relay key: send it as the `api-key` header, `Authorization: Bearer`, "
                "or the `openai-insecure-api-key.<key>` subprotocol.",
            )
        team = state.keyring.identify(key)
        if team is None:
            raise ClientRefused(401, "invalid_api_key", "The relay key is not valid.")
        log = log.bind(team=team.name)
        wanted = parse_realtime_request(request.query, request.headers, subprotocols)
        deployment = resolve_deployment(wanted, team, state.config.deployments)
        log = log.bind(deployment=deployment.name)
        if state.draining:
            raise ClientRefused(503, "relay_draining", "The relay is restarting; retry shortly.")
        assert state.http is not None
        handshake_began = time.monotonic()
        upstream = await open_upstream(
            state.http,
            state.targets[deployment.name],
            request_id=session_id,
            connect_timeout=state.config.upstream.connect_timeout_seconds,
            close_timeout=state.config.server.close_timeout_seconds,
            heartbeat=state.config.upstream.heartbeat_seconds,
            max_message_bytes=state.config.server.max_message_bytes,
        )
        state.metrics.upstream_handshake.labels(deployment.name).observe(
            time.monotonic() - handshake_began
        )
        policy = state.policies[team.name, deployment.name]
        try:
            started = await start_session(
                upstream, policy, setup_seconds=state.config.upstream.connect_timeout_seconds
            )
        except BaseException:
            await upstream.close(code=1011, message=b"session start failed")
            raise
    except HttpRefusal as refusal:
        state.metrics.session_refusals.labels(str(refusal.status), refusal.code).inc()
        if isinstance(refusal, UpstreamRefused) and deployment is not None:
            state.metrics.upstream_connect_failures.labels(deployment.name, refusal.code).inc()
        log.warning(
            "session_refused",
            status=refusal.status,
            code=refusal.code,
            url=redact_url(request.rel_url),
            cause=repr(refusal.__cause__) if refusal.__cause__ else None,
        )
        return error_response(refusal)

    server = state.config.server
    client = web.WebSocketResponse(
        protocols=(REALTIME_SUBPROTOCOL,),
        compress=False,
        max_msg_size=server.max_message_bytes,
        heartbeat=server.heartbeat_seconds,
        timeout=server.close_timeout_seconds,
        decode_text=False,
    )
    try:
        await client.prepare(request)
    except BaseException:
        await upstream.close(code=1001, message=b"client handshake failed")
        raise
    metrics, labels = state.metrics, (team.name, deployment.name)
    meter = SessionMeter(metrics, *labels)
    bridge = Bridge(
        client,
        upstream,
        policy=policy,
        session=started.session,
        meter=meter,
        greeting=(started.created_frame, *started.pending),
        close_timeout=server.close_timeout_seconds,
    )
    state.track(bridge)
    setup_seconds = time.monotonic() - began
    metrics.session_setup.labels(*labels).observe(setup_seconds)
    metrics.sessions_active.labels(*labels).inc()
    log.info("session_started", setup_seconds=round(setup_seconds, 6))
    try:
        await bridge.run()
    finally:
        # Also when the handler is cancelled (the client's connection dropped).
        metrics.sessions_active.labels(*labels).dec()
        ending = bridge.ending or Ending("relay", 1011, "handler cancelled", cause="relay_closed")
        duration = time.monotonic() - began
        metrics.sessions.labels(*labels, ending.outcome).inc()
        metrics.session_duration.labels(*labels).observe(duration)
        log.info(
            "session_ended",
            duration_seconds=round(duration, 3),
            outcome=ending.outcome,
            ended_by=ending.side,
            close_code=ending.code,
            close_reason=ending.reason,
            audio_seconds_in=round(meter.audio_seconds_total["in"], 3),
            audio_seconds_out=round(meter.audio_seconds_total["out"], 3),
            tokens=dict(meter.tokens),
            responses=meter.responses,
            violations=bridge.violations,
        )
        state.forget(bridge)
    return client


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, dumps=_dumps)


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.ready:
        return web.json_response({"status": "ready"}, dumps=_dumps)
    reason = "draining" if state.draining else "no usable upstream credential"
    return web.json_response({"status": "not ready", "reason": reason}, status=503, dumps=_dumps)


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()
