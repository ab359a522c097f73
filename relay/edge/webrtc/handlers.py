"""The WebRTC endpoints over HTTP: minting a client secret and placing a call, with the
relay's refusals, metrics and logs. Thin: who may call is in `access`, the rules in
`requests`, the upstream in `forward`."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from aiohttp import web

from relay.edge.admission import AdmissionStore, Lease
from relay.edge.admission_redis import RedisAdmission
from relay.edge.auth import find_key
from relay.edge.handlers import team_label
from relay.edge.responses import error_response
from relay.edge.webrtc.access import (
    authenticate,
    cors_headers,
    ga_deployment,
    owned_call,
    preflight_headers,
    secret_route,
    usable_backends,
)
from relay.edge.webrtc.call_book import (
    CallRecords,
    PlacedCall,
    ProcessCalls,
    RedisCalls,
    call_id_from_location,
)
from relay.edge.webrtc.forward import Outbound, forward
from relay.edge.webrtc.observer import CallWatch, watch_call
from relay.edge.webrtc.requests import (
    CONTROL_ACTIONS,
    SessionRequest,
    UpstreamRejected,
    effective_session,
    multipart_call,
    parse_minted,
    parse_secret_request,
    parse_session,
    upstream_rejection,
    upstream_session,
)
from relay.edge.webrtc.secret_book import MintedSecret, ProcessSecrets, RedisSecrets, SecretRecords
from relay.errors import ClientRefused, HttpRefusal, RequestRejected
from relay.ops.config import DeploymentConfig, TeamConfig
from relay.ops.logsetup import describe_error, fresh_context
from relay.ops.metrics import SessionMeter
from relay.ops.redaction import SECRETS
from relay.session.policy import PolicyViolation
from relay.session.transcription import transcription_policy
from relay.state import STATE, LiveConfig, RelayState
from relay.upstream.backends import Backend

SECRET_PATHS = ("/openai/v1/realtime/client_secrets", "/v1/realtime/client_secrets")
CALL_PATHS = ("/openai/v1/realtime/calls", "/v1/realtime/calls")
MAX_BODY_BYTES = 256 * 1024
# Query parameters of a call passed on upstream (Azure's data-channel event filter).
_CALL_QUERY = ("webrtcfilter",)
# Upstream answers to call control that are the caller's as they are.
_CONTROL_PASSED = frozenset({400, 404, 409})

_log = structlog.get_logger("relay.edge.webrtc")


@dataclass(slots=True)
class WebRtc:
    """The WebRTC endpoints' own state on the relay app."""

    book: SecretRecords
    rates: AdmissionStore
    calls: CallRecords = field(default_factory=ProcessCalls)
    # Calls the relay observes, by call id, while they live.
    watches: dict[str, CallWatch] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


WEBRTC = web.AppKey("webrtc", WebRtc)


def add_routes(app: web.Application) -> None:
    """Serve the WebRTC endpoints on a relay app whose STATE is set."""
    state = app[STATE]
    admission = state.admission
    webrtc = WebRtc(ProcessSecrets(), admission)
    if isinstance(admission, RedisAdmission):
        config = state.live.config.admission
        args = (admission.client, config.key_prefix, config.redis_timeout_seconds)
        webrtc = WebRtc(RedisSecrets.connect(*args), admission, RedisCalls.connect(*args))
    app[WEBRTC] = webrtc
    for path in SECRET_PATHS:
        app.router.add_post(path, client_secrets)
    for path in CALL_PATHS:
        app.router.add_post(path, calls)
        app.router.add_route("OPTIONS", path, preflight)
        app.router.add_post(path + "/{call_id}/{action}", call_control)
    app.on_shutdown.append(_stop_watching)


async def _stop_watching(app: web.Application) -> None:
    """Shutdown: close the observers' sockets (the calls go on) and count the calls."""
    tasks = list(app[WEBRTC].tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def client_secrets(request: web.Request) -> web.Response:
    return await _handle(request, "client_secrets", _mint)


async def calls(request: web.Request) -> web.Response:
    return await _handle(request, "calls", _call)


async def call_control(request: web.Request) -> web.Response:
    return await _handle(request, "call_control", _control)


async def preflight(request: web.Request) -> web.Response:
    """CORS preflight for browsers posting their offer from a web page."""
    state = request.app[STATE]
    origin = request.headers.get("Origin")
    if origin is None or not state.live.origin_allowed(origin):
        return error_response(ClientRefused(403, "origin_not_allowed", "This Origin may not call."))
    return web.Response(status=204, headers=preflight_headers(origin))


async def _handle(
    request: web.Request,
    endpoint: str,
    handler: Callable[[web.Request, RelayState, LiveConfig, WebRtc], Awaitable[web.Response]],
) -> web.Response:
    state = request.app[STATE]
    live = state.live  # this request's config, whatever a reload does meanwhile
    fresh_context()
    structlog.contextvars.bind_contextvars(
        request_id="rq_" + secrets.token_hex(8), endpoint=endpoint, peer=request.remote
    )
    origin = request.headers.get("Origin")
    try:
        response = await handler(request, state, live, request.app[WEBRTC])
    except HttpRefusal as refusal:
        code = "upstream_rejected" if isinstance(refusal, UpstreamRejected) else refusal.code
        team = team_label(state)
        state.metrics.webrtc_refusals.labels(team, endpoint, str(refusal.status), code).inc()
        _log.warning(
            "webrtc_refused",
            status=refusal.status,
            code=refusal.code,
            cause=describe_error(refusal.__cause__),
        )
        response = error_response(refusal)
    if endpoint == "calls" and origin is not None and live.origin_allowed(origin):
        response.headers.update(cors_headers(origin))
    return response


async def _mint(
    request: web.Request, state: RelayState, live: LiveConfig, webrtc: WebRtc
) -> web.Response:
    team, _ = await authenticate(request, state, live, None)
    assert team is not None
    wanted = parse_secret_request(
        await _read_body(request),
        request.query.get("model"),
        live.config.webrtc.max_secret_seconds,
    )
    deployment = ga_deployment(live, team, wanted.deployment, wanted.transcription)
    state.budgets.check(team.name)
    session = _session(live, team, deployment, wanted.session)
    await webrtc.rates.take_client_secret(team.name)

    def body(backend: Backend) -> bytes:
        expires_after = {"anchor": "created_at", "seconds": wanted.seconds}
        named = upstream_session(session, backend.config.azure_deployment)
        return orjson.dumps({"expires_after": expires_after, "session": named})

    outbound = Outbound("client_secrets", "application/json", body, lambda backend: {})
    backends = usable_backends(live, deployment)
    backend, answer = await forward(state, live, deployment, backends, outbound)
    minted = parse_minted(answer.body)
    expires_at = min(float(minted["expires_at"]), webrtc.book.clock() + wanted.seconds)
    SECRETS.register_recent(minted["value"], minted=True)
    await webrtc.book.remember(
        minted["value"], MintedSecret(team.name, deployment.name, backend.name, expires_at)
    )
    minted["expires_at"] = int(expires_at)
    if not wanted.transcription:
        minted["session"] = {**minted.get("session", {}), "model": deployment.name}
    state.metrics.client_secrets.labels(team.name, deployment.name).inc()
    _log.info("client_secret_minted", backend=backend.name, seconds=wanted.seconds)
    return web.Response(body=orjson.dumps(minted), content_type="application/json")


def _session(
    live: LiveConfig, team: TeamConfig, deployment: DeploymentConfig, fragment: dict[str, Any]
) -> dict[str, Any]:
    """The session a secret or call carries, through the team's policy; or a refusal."""
    policy = live.policies[team.name, deployment.name]
    if deployment.kind == "transcription":
        policy = transcription_policy(policy, deployment.azure_deployment)
    try:
        return effective_session(policy, fragment)
    except PolicyViolation as violation:
        raise RequestRejected(violation.code, violation.message, violation.param) from violation


async def _call(
    request: web.Request, state: RelayState, live: LiveConfig, webrtc: WebRtc
) -> web.Response:
    team, minted = await authenticate(request, state, live, webrtc.book)
    offer, asked = await _read_call(request)
    query_model = request.query.get("model") or None
    if minted is not None:
        team, deployment, backends = secret_route(live, webrtc.book, minted, request.query)
        if asked is not None and asked.deployment not in (None, deployment.name):
            raise RequestRejected(
                "deployment_mismatch",
                f"The client secret is for the deployment {deployment.name!r}.",
                "session.model",
            )
    else:
        assert team is not None
        if asked is not None and asked.deployment and query_model not in (None, asked.deployment):
            raise RequestRejected(
                "deployment_mismatch",
                "session.model and the model query parameter name different deployments.",
                "session.model",
            )
        name = query_model or (asked.deployment if asked is not None else None) or ""
        deployment = ga_deployment(
            live, team, name, asked.transcription if asked is not None else None
        )
        backends = usable_backends(live, deployment)
    state.budgets.check(team.name)
    # A relay-key call carries the team's session; a secret's was shaped when minted.
    session = None
    if asked is not None or minted is None:
        session = _session(live, team, deployment, asked.fragment if asked is not None else {})
    passed = {k: request.query[k] for k in _CALL_QUERY if k in request.query}
    # A secret names its deployment upstream.
    secret = find_key(request.headers, {}, ()) if minted is not None else None
    boundary = "relay" + secrets.token_hex(12)

    def body(backend: Backend) -> bytes:
        if session is None:
            return offer
        return multipart_call(
            offer, upstream_session(session, backend.config.azure_deployment), boundary
        )

    content_type = (
        "application/sdp" if session is None else f"multipart/form-data; boundary={boundary}"
    )

    def query(backend: Backend) -> Mapping[str, str]:
        return passed if secret else {"model": backend.config.azure_deployment, **passed}

    outbound = Outbound("calls", content_type, body, query, secret)
    observed = deployment.webrtc.observe
    lease = await state.admission.acquire(team.name) if observed else None
    if lease is None:
        await webrtc.rates.take_call(team.name)
    try:
        backend, answer = await forward(state, live, deployment, backends, outbound)
        call_id = call_id_from_location(answer.headers.get("Location"))
        if call_id is not None:
            placed = PlacedCall(team.name, deployment.name, backend.name, lease is not None)
            await webrtc.calls.remember(call_id, placed)
    except BaseException:
        if lease is not None:
            await lease.release()
        raise
    auth = "client_secret" if secret else "relay_key"
    state.metrics.webrtc_calls.labels(team.name, deployment.name, auth).inc()
    location = answer.headers.get("Location")
    _log.info("call_placed", backend=backend.name, auth=auth, call_id=call_id)
    if lease is not None:
        if call_id is None:
            await lease.release()
        else:
            _watch(state, live, webrtc, team, deployment, backend, call_id, lease)
    headers = {"Content-Type": answer.headers.get("Content-Type", "application/sdp")}
    if location is not None:
        headers["Location"] = SECRETS.clean(location)
    sdp = answer.body
    if SECRETS.known_in(sdp):  # the service's answer, never the relay's credential
        sdp = SECRETS.clean_known(sdp.decode("utf-8", "replace")).encode()
    return web.Response(status=answer.status, body=sdp, headers=headers)


def _watch(
    state: RelayState,
    live: LiveConfig,
    webrtc: WebRtc,
    team: TeamConfig,
    deployment: DeploymentConfig,
    backend: Backend,
    call_id: str,
    lease: Lease,
) -> None:
    """Start observing a call the relay placed (`observer`)."""
    policy = live.policies[team.name, deployment.name]
    if deployment.kind == "transcription":
        policy = transcription_policy(policy, backend.config.azure_deployment)
    book = state.budgets.book
    meter = SessionMeter(
        state.metrics,
        team.name,
        deployment.name,
        backend.name,
        prices=deployment.prices,
        on_cost=lambda usd: book.add(team.name, usd),
    )
    watch = CallWatch(call_id, team, deployment, backend, policy, lease, meter)
    webrtc.watches[call_id] = watch
    task = asyncio.get_running_loop().create_task(
        watch_call(state, watch), name=f"call observer {call_id}"
    )
    webrtc.tasks.add(task)

    def done(task: asyncio.Task[None]) -> None:
        webrtc.tasks.discard(task)
        webrtc.watches.pop(call_id, None)

    task.add_done_callback(done)


async def _control(
    request: web.Request, state: RelayState, live: LiveConfig, webrtc: WebRtc
) -> web.Response:
    """Call control (hangup, accept, reject, refer) on a call this team placed through the
    relay, sent to the backend that placed it with the relay's credential."""
    action = request.match_info["action"]
    if action not in CONTROL_ACTIONS:
        raise ClientRefused(404, "not_found", f"Unknown call action {action!r}.")
    team, _ = await authenticate(request, state, live, None)
    assert team is not None
    call_id = request.match_info["call_id"]
    _, deployment, backend = await owned_call(live, webrtc.calls, team, call_id)
    body = await _read_body(request)
    content_type = request.headers.get("Content-Type", "application/json")
    outbound = Outbound(
        f"calls/{call_id}/{action}",
        content_type,
        lambda b: body,
        lambda b: {},
        passed=_CONTROL_PASSED,
    )
    _, answer = await forward(state, live, deployment, [backend], outbound)
    _log.info("call_control", action=action, call_id=call_id, status=answer.status)
    if answer.status >= 300:
        # The upstream's refusal with its status, its words cleaned as every upstream
        # message is: never a credential it may have quoted.
        rejection = upstream_rejection(answer.body)
        rejection.status = answer.status
        return error_response(rejection)
    headers = {}
    if "Content-Type" in answer.headers:
        headers["Content-Type"] = answer.headers["Content-Type"]
    return web.Response(status=answer.status, body=answer.body, headers=headers)


async def _read_call(request: web.Request) -> tuple[bytes, SessionRequest | None]:
    """The SDP offer, and the session of a multipart call (openai-python's form)."""
    if request.content_type != "multipart/form-data":
        return await _read_offer(request), None
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ClientRefused(413, "request_too_large", f"The body exceeds {MAX_BODY_BYTES} bytes.")
    too_large = ClientRefused(413, "request_too_large", f"The body exceeds {MAX_BODY_BYTES} bytes.")
    try:
        async with _body_deadline(request):
            form = await request.post()
    except web.HTTPRequestEntityTooLarge as exc:  # aiohttp's own cap, for chunked bodies
        raise too_large from exc
    except (ValueError, web.HTTPException) as exc:
        raise RequestRejected("invalid_body", "The multipart body could not be read.") from exc
    # A chunked body announces no length: its parts are measured once read.
    if sum(len(_form_bytes(value) or b"") for value in form.values()) > MAX_BODY_BYTES:
        raise too_large
    offer = _form_bytes(form.get("sdp"))
    if not offer or not offer.strip():
        raise RequestRejected("missing_offer", "The multipart body has no sdp part.", "sdp")
    raw = form.get("session")
    if raw is None:
        return offer, None
    try:
        session = orjson.loads(_form_bytes(raw) or b"")
    except orjson.JSONDecodeError as exc:
        raise RequestRejected("invalid_json", "The session part is not JSON.", "session") from exc
    return offer, parse_session(session, None)


def _form_bytes(value: str | bytes | bytearray | web.FileField | None) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, web.FileField):
        return bytes(value.file.read())
    return value.encode() if isinstance(value, str) else bytes(value)


@asynccontextmanager
async def _body_deadline(request: web.Request) -> AsyncIterator[None]:
    """A body trickled in byte by byte must not hold the connection: the head's deadline
    applies to the body as well (408 past it)."""
    seconds = request.app[STATE].live.config.server.header_timeout_seconds
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError as exc:
        raise ClientRefused(
            408, "request_body_timeout", f"The request body did not arrive within {seconds:g} s."
        ) from exc


async def _read_body(request: web.Request) -> bytes:
    too_large = ClientRefused(413, "request_too_large", f"The body exceeds {MAX_BODY_BYTES} bytes.")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise too_large
    try:
        async with _body_deadline(request):
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
            "Send the SDP offer as the request body with `Content-Type: application/sdp`, "
            "or multipart/form-data with `sdp` and `session` parts.",
        )
    offer = await _read_body(request)
    if not offer.strip():
        raise RequestRejected("missing_offer", "The request body holds no SDP offer.", "sdp")
    return offer
