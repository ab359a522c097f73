"""The WebRTC endpoints over HTTP: minting a client secret and placing a call, with the
relay's refusals, metrics and logs. Thin: who may call is in `access`, the rules in
`requests`, the upstream in `forward`."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import orjson
import structlog
from aiohttp import web

from relay.edge.admission import AdmissionStore
from relay.edge.admission_redis import RedisAdmission
from relay.edge.auth import find_key
from relay.edge.handlers import error_response, team_label
from relay.edge.webrtc.access import (
    authenticate,
    cors_headers,
    ga_deployment,
    preflight_headers,
    secret_route,
    usable_backends,
)
from relay.edge.webrtc.forward import Outbound, forward
from relay.edge.webrtc.requests import (
    UpstreamRejected,
    effective_session,
    parse_minted,
    parse_secret_request,
)
from relay.edge.webrtc.secret_book import MintedSecret, ProcessSecrets, RedisSecrets, SecretRecords
from relay.errors import ClientRefused, HttpRefusal, RequestRejected
from relay.session.policy import PolicyViolation
from relay.state import STATE, RelayState
from relay.upstream.backends import Backend

SECRET_PATHS = ("/openai/v1/realtime/client_secrets", "/v1/realtime/client_secrets")
CALL_PATHS = ("/openai/v1/realtime/calls", "/v1/realtime/calls")
MAX_BODY_BYTES = 256 * 1024
# Query parameters of a call passed on upstream (Azure's data-channel event filter).
_CALL_QUERY = ("webrtcfilter",)

_log = structlog.get_logger("relay.edge.webrtc")


@dataclass(slots=True)
class WebRtc:
    """The WebRTC endpoints' own state on the relay app."""

    book: SecretRecords
    rates: AdmissionStore


WEBRTC = web.AppKey("webrtc", WebRtc)


def add_routes(app: web.Application) -> None:
    """Serve the WebRTC endpoints on a relay app whose STATE is set."""
    state = app[STATE]
    admission = state.admission
    book: SecretRecords = ProcessSecrets()
    if isinstance(admission, RedisAdmission):
        config = state.config.admission
        book = RedisSecrets(admission.client, config.key_prefix, config.redis_timeout_seconds)
    app[WEBRTC] = WebRtc(book, admission)
    for path in SECRET_PATHS:
        app.router.add_post(path, client_secrets)
    for path in CALL_PATHS:
        app.router.add_post(path, calls)
        app.router.add_route("OPTIONS", path, preflight)


async def client_secrets(request: web.Request) -> web.Response:
    return await _handle(request, "client_secrets", _mint)


async def calls(request: web.Request) -> web.Response:
    return await _handle(request, "calls", _call)


async def preflight(request: web.Request) -> web.Response:
    """CORS preflight for browsers posting their offer from a web page."""
    state = request.app[STATE]
    origin = request.headers.get("Origin")
    if origin is None or not state.origin_allowed(origin):
        return error_response(ClientRefused(403, "origin_not_allowed", "This Origin may not call."))
    return web.Response(status=204, headers=preflight_headers(origin))


async def _handle(
    request: web.Request,
    endpoint: str,
    handler: Callable[[web.Request, RelayState, WebRtc], Awaitable[web.Response]],
) -> web.Response:
    state = request.app[STATE]
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        request_id="rq_" + secrets.token_hex(8), endpoint=endpoint, peer=request.remote
    )
    origin = request.headers.get("Origin")
    try:
        response = await handler(request, state, request.app[WEBRTC])
    except HttpRefusal as refusal:
        code = "upstream_rejected" if isinstance(refusal, UpstreamRejected) else refusal.code
        team = team_label(state)
        state.metrics.webrtc_refusals.labels(team, endpoint, str(refusal.status), code).inc()
        _log.warning(
            "webrtc_refused",
            status=refusal.status,
            code=refusal.code,
            cause=repr(refusal.__cause__) if refusal.__cause__ else None,
        )
        response = error_response(refusal)
    if endpoint == "calls" and origin is not None and state.origin_allowed(origin):
        response.headers.update(cors_headers(origin))
    return response


async def _mint(request: web.Request, state: RelayState, webrtc: WebRtc) -> web.Response:
    team, _ = await authenticate(request, state, None)
    assert team is not None
    wanted = parse_secret_request(
        await _read_body(request),
        request.query.get("model"),
        state.config.webrtc.max_secret_seconds,
    )
    deployment = ga_deployment(state, team, wanted.deployment)
    state.budgets.check(team.name)
    try:
        session = effective_session(state.policies[team.name, deployment.name], wanted.session)
    except PolicyViolation as violation:
        raise RequestRejected(violation.code, violation.message, violation.param) from violation
    await webrtc.rates.take_client_secret(team.name)

    def body(backend: Backend) -> bytes:
        upstream_session = {**session, "model": backend.config.azure_deployment}
        expires_after = {"anchor": "created_at", "seconds": wanted.seconds}
        return orjson.dumps({"expires_after": expires_after, "session": upstream_session})

    outbound = Outbound("client_secrets", "application/json", body, lambda backend: {})
    backends = usable_backends(state, deployment)
    backend, answer = await forward(state, deployment, backends, outbound)
    minted = parse_minted(answer.body)
    expires_at = min(float(minted["expires_at"]), webrtc.book.clock() + wanted.seconds)
    await webrtc.book.remember(
        minted["value"], MintedSecret(team.name, deployment.name, backend.name, expires_at)
    )
    minted["expires_at"] = int(expires_at)
    minted["session"] = {**minted.get("session", {}), "model": deployment.name}
    state.metrics.client_secrets.labels(team.name, deployment.name).inc()
    _log.info("client_secret_minted", backend=backend.name, seconds=wanted.seconds)
    return web.Response(body=orjson.dumps(minted), content_type="application/json")


async def _call(request: web.Request, state: RelayState, webrtc: WebRtc) -> web.Response:
    team, minted = await authenticate(request, state, webrtc.book)
    if minted is not None:
        team, deployment, backends = secret_route(state, webrtc.book, minted, request.query)
    else:
        assert team is not None
        deployment = ga_deployment(state, team, request.query.get("model", ""))
        backends = usable_backends(state, deployment)
    offer = await _read_offer(request)
    state.budgets.check(team.name)
    await webrtc.rates.take_call(team.name)
    passed = {k: request.query[k] for k in _CALL_QUERY if k in request.query}
    # A secret names its deployment upstream; a key needs `model`.
    secret = find_key(request.headers, {}, ()) if minted is not None else None

    def query(backend: Backend) -> Mapping[str, str]:
        return passed if secret else {"model": backend.config.azure_deployment, **passed}

    outbound = Outbound("calls", "application/sdp", lambda backend: offer, query, secret)
    backend, answer = await forward(state, deployment, backends, outbound)
    auth = "client_secret" if secret else "relay_key"
    state.metrics.webrtc_calls.labels(team.name, deployment.name, auth).inc()
    location = answer.headers.get("Location")
    _log.info("call_placed", backend=backend.name, auth=auth, location=location)
    headers = {"Content-Type": answer.headers.get("Content-Type", "application/sdp")}
    if location is not None:
        headers["Location"] = location
    return web.Response(status=answer.status, body=answer.body, headers=headers)


async def _read_body(request: web.Request) -> bytes:
    too_large = ClientRefused(413, "request_too_large", f"The body exceeds {MAX_BODY_BYTES} bytes.")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise too_large
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:  # aiohttp's own cap, for chunked bodies
        raise too_large from exc
    if len(body) > MAX_BODY_BYTES:
        raise too_large
    return body


async def _read_offer(request: web.Request) -> bytes:
    if request.content_type != "application/sdp":
        raise RequestRejected(
            "unsupported_content_type",
            "Send the SDP offer as the request body with `Content-Type: application/sdp`.",
        )
    offer = await _read_body(request)
    if not offer.strip():
        raise RequestRejected("missing_offer", "The request body holds no SDP offer.", "sdp")
    return offer
