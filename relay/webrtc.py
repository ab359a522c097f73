"""WebRTC clients: client secrets minted through the relay, and SDP calls.

How it works:
- ``POST …/realtime/client_secrets`` takes a relay key. The team's policy shapes the
  session fragment (`effective_session`: defaults under it, locked fields and allow-lists
  checked with the WebSocket path's errors, instructions prefix kept), the lifetime is capped
  at ``webrtc.max_secret_seconds``, and the backend's own ``client_secrets`` endpoint is
  called with the relay's credential, failing over like the WebSocket path. The caller gets
  the service's answer with the relay's deployment name in ``session.model``.
- Each minted secret is remembered by its SHA-256 (`SecretBook`: team, deployment, backend,
  expiry), so ``POST …/realtime/calls`` accepts it as ``Authorization: Bearer ek_…`` and
  forwards the SDP offer, with that same secret, to the backend that minted it. With a relay
  key instead, ``?model=`` names the deployment and the backend's credential is used. The
  answer comes back as it is: status, SDP, ``Location``.
- The relay's credential never reaches the caller; secrets are never logged. The book is
  per process: a secret is known to the relay process that minted it.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web
from multidict import CIMultiDictProxy
from yarl import URL

from relay.admission import AdmissionStore
from relay.auth import find_key
from relay.backends import Backend
from relay.config import DeploymentConfig, TeamConfig
from relay.credentials import UpstreamCredential
from relay.errors import ClientRefused, CredentialUnavailable, HttpRefusal, UpstreamRefused
from relay.policy import PolicyViolation, SessionPolicy
from relay.routes import RealtimeRequest, resolve_deployment
from relay.session_schema import merge_session
from relay.state import STATE, RelayState
from relay.upstream import refusal_for_status

SECRET_PATHS = ("/openai/v1/realtime/client_secrets", "/v1/realtime/client_secrets")
CALL_PATHS = ("/openai/v1/realtime/calls", "/v1/realtime/calls")
DEFAULT_SECRET_SECONDS = 600  # the service's default
MIN_SECRET_SECONDS, MAX_SECRET_SECONDS = 10, 7200  # the service's range
MAX_BODY_BYTES = 256 * 1024
# Query parameters of a call passed on upstream (Azure's data-channel event filter).
_CALL_QUERY = ("webrtcfilter",)
_CORS_HEADERS = "Authorization, Content-Type, api-key"

_log = structlog.get_logger("relay.webrtc")


class RequestRejected(ClientRefused):
    """A refused request that can name the offending parameter (HTTP 400)."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(400, code, message)
        self.param = param


class UpstreamRejected(RequestRejected):
    """The upstream's own 400 for what the caller sent (a bad session, a bad offer)."""


# --- pure helpers ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SecretRequest:
    deployment: str
    session: dict[str, Any]
    seconds: int


def parse_secret_request(body: bytes, query_model: str | None, max_seconds: int) -> SecretRequest:
    """The deployment, session fragment and capped lifetime a request asks for."""
    try:
        data = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise RequestRejected("invalid_json", "The request body is not valid JSON.") from exc
    if not isinstance(data, dict):
        raise RequestRejected("invalid_type", "The request body must be a JSON object.")
    for key in data:
        if key not in ("expires_after", "session"):
            raise RequestRejected("unknown_parameter", f"Unknown parameter: '{key}'.", key)
    session = data.get("session", {})
    if not isinstance(session, dict):
        raise RequestRejected("invalid_type", "session must be an object.", "session")
    if session.get("type", "realtime") != "realtime":
        raise RequestRejected(
            "unsupported_session_type",
            "The relay mints client secrets for realtime sessions only.",
            "session.type",
        )
    model = session.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestRejected("invalid_type", "session.model must be a string.", "session.model")
    if model and query_model and model != query_model:
        raise RequestRejected(
            "deployment_mismatch",
            "session.model and the model query parameter name different deployments.",
            "session.model",
        )
    if not (model or query_model):
        raise RequestRejected(
            "missing_deployment", "Name the deployment in session.model.", "session.model"
        )
    seconds = min(_requested_seconds(data.get("expires_after")), max_seconds)
    fragment = {k: v for k, v in session.items() if k not in ("type", "model")}
    return SecretRequest(str(model or query_model), fragment, seconds)


def _requested_seconds(raw: Any) -> int:
    if raw is None:
        return DEFAULT_SECRET_SECONDS
    if not isinstance(raw, dict):
        raise RequestRejected("invalid_type", "expires_after must be an object.", "expires_after")
    if raw.get("anchor", "created_at") != "created_at":
        raise RequestRejected(
            "invalid_value", "expires_after.anchor must be 'created_at'.", "expires_after.anchor"
        )
    seconds = raw.get("seconds", DEFAULT_SECRET_SECONDS)
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        raise RequestRejected(
            "invalid_type", "expires_after.seconds must be an integer.", "expires_after.seconds"
        )
    if not MIN_SECRET_SECONDS <= seconds <= MAX_SECRET_SECONDS:
        raise RequestRejected(
            "invalid_value",
            f"expires_after.seconds must be between {MIN_SECRET_SECONDS} and {MAX_SECRET_SECONDS}.",
            "expires_after.seconds",
        )
    return seconds


def effective_session(policy: SessionPolicy, fragment: Mapping[str, Any]) -> dict[str, Any]:
    """The session a secret carries: the policy's defaults with the client's fragment over
    them, judged as a `session.update` against the defaults; or PolicyViolation."""
    checked: Mapping[str, Any] = fragment
    if fragment:
        if "session.update" not in policy.allowed_events:
            raise PolicyViolation(
                "This team may not change the session; send no session settings.",
                param="session",
            )
        frame = orjson.dumps({"type": "session.update", "session": fragment})
        # The per-event size limit is for the WebSocket; the body has its own.
        judge = replace(policy, max_frame_bytes=None)
        judged = judge.check("session.update", frame, policy.defaults)
        checked = orjson.loads(judged)["session"]
    return {**merge_session(policy.defaults, checked), "type": "realtime"}


def webrtc_url(backend_url: URL, leaf: str, query: Mapping[str, str]) -> URL:
    """``…/openai/v1/realtime/{leaf}`` over HTTP(S) on the backend's host."""
    scheme = {"wss": "https", "ws": "http"}.get(backend_url.scheme, backend_url.scheme)
    path = backend_url.path.rstrip("/") + "/" + leaf
    return backend_url.with_scheme(scheme).with_path(path).with_query(dict(query))


def parse_minted(body: bytes) -> dict[str, Any]:
    """The upstream's client secret answer, checked; or UpstreamRefused (502)."""
    try:
        minted = orjson.loads(body)
    except orjson.JSONDecodeError:
        minted = None
    if (
        not isinstance(minted, dict)
        or not isinstance(minted.get("value"), str)
        or not minted["value"]
        or not isinstance(minted.get("expires_at"), int | float)
        or not isinstance(minted.get("session", {}), dict)
    ):
        raise UpstreamRefused(
            502, "upstream_invalid_response", "The upstream service's answer was not a secret."
        )
    return minted


def error_body(refusal: HttpRefusal) -> bytes:
    error_type = "invalid_request_error" if isinstance(refusal, ClientRefused) else "server_error"
    error: dict[str, Any] = {"type": error_type, "code": refusal.code, "message": refusal.message}
    if isinstance(refusal, RequestRejected):
        error["param"] = refusal.param
    return orjson.dumps({"error": error})


def upstream_rejection(body: bytes) -> UpstreamRejected:
    """The upstream's 400, told to the caller with its own message and parameter."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    error = error if isinstance(error, dict) else {}
    code, message, param = error.get("code"), error.get("message"), error.get("param")
    return UpstreamRejected(
        code if isinstance(code, str) and len(code) <= 64 else "invalid_request",
        message if isinstance(message, str) else "The upstream service refused the request.",
        param if isinstance(param, str) else None,
    )


def retry_after_seconds(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return str(max(1, math.ceil(float(value))))
    except ValueError:
        return "5"


# --- minted secrets --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MintedSecret:
    team: str
    deployment: str
    backend: str
    expires_at: float


@dataclass(slots=True)
class SecretBook:
    """Secrets this process minted, by SHA-256, until they expire; at most `max_entries`
    (the oldest forgotten first). `clock` is wall time, like the service's ``expires_at``."""

    max_entries: int = 100_000
    clock: Callable[[], float] = time.time
    _entries: OrderedDict[bytes, MintedSecret] = field(default_factory=OrderedDict)

    def remember(self, secret: str, minted: MintedSecret) -> None:
        now = self.clock()
        # Lifetimes are capped, so expired entries gather at the front.
        while self._entries and next(iter(self._entries.values())).expires_at <= now:
            self._entries.popitem(last=False)
        self._entries[_digest(secret)] = minted
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def find(self, secret: str) -> MintedSecret | None:
        """The record of a secret this process minted, expired or not; None if unknown."""
        return self._entries.get(_digest(secret))

    def __len__(self) -> int:
        return len(self._entries)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


@dataclass(slots=True)
class WebRtc:
    book: SecretBook
    rates: AdmissionStore


WEBRTC = web.AppKey("webrtc", WebRtc)


# --- upstream requests -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outbound:
    """One request to send to a backend, built per backend (names and credentials differ)."""

    leaf: str  # "client_secrets" | "calls"
    content_type: str
    body: Callable[[Backend], bytes]
    query: Callable[[Backend], Mapping[str, str]]
    # A client secret to send instead of the backend's credential.
    bearer: str | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    headers: CIMultiDictProxy[str]


async def forward(
    state: RelayState,
    deployment: DeploymentConfig,
    backends: list[Backend],
    outbound: Outbound,
) -> tuple[Backend, Answer]:
    """Send ``outbound`` to the first backend that answers it, within one deadline; or raise
    the refusal the caller gets."""
    assert state.http is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + state.config.upstream.connect_timeout_seconds
    pool = state.pools[deployment.name]
    refusals: list[UpstreamRefused] = []
    # Lets Azure support trace a request from the relay's logs.
    request_id = str(structlog.contextvars.get_contextvars().get("request_id", ""))
    for backend in backends:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            answer = await _send(state, deployment, backend, outbound, request_id, remaining)
            _judge(answer, via_secret=outbound.bearer is not None)
        except UpstreamRefused as refusal:
            pool.failed(backend, refusal)
            state.metrics.upstream_connect_failures.labels(
                deployment.name, backend.name, refusal.code
            ).inc()
            _log.warning("webrtc_upstream_failed", backend=backend.name, code=refusal.code)
            refusals.append(refusal)
            continue
        except ClientRefused:
            pool.succeeded(backend)  # it answered; the request was the problem
            raise
        pool.succeeded(backend)
        return backend, answer
    raise _overall_refusal(refusals)


async def _send(
    state: RelayState,
    deployment: DeploymentConfig,
    backend: Backend,
    outbound: Outbound,
    request_id: str,
    seconds: float,
) -> Answer:
    assert state.http is not None
    if outbound.bearer is not None:
        headers = {"Authorization": f"Bearer {outbound.bearer}"}
    else:
        headers = await _credential_headers(backend.credential)
    headers |= {"Content-Type": outbound.content_type, "x-ms-client-request-id": request_id}
    url = webrtc_url(backend.url, outbound.leaf, outbound.query(backend))
    began = time.monotonic()
    try:
        async with asyncio.timeout(seconds):
            async with state.http.post(
                url, data=outbound.body(backend), headers=headers, allow_redirects=False
            ) as response:
                answer = Answer(response.status, await response.read(), response.headers)
    except TimeoutError as exc:
        raise UpstreamRefused(
            504, "upstream_timeout", "The upstream service did not answer in time."
        ) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamRefused(
            502, "upstream_unavailable", "The upstream service could not be reached."
        ) from exc
    state.metrics.webrtc_upstream.labels(deployment.name, outbound.leaf).observe(
        time.monotonic() - began
    )
    return answer


async def _credential_headers(credential: UpstreamCredential) -> dict[str, str]:
    try:
        return await credential.headers()
    except CredentialUnavailable as exc:
        raise UpstreamRefused(
            503, "upstream_credential_unavailable", "The relay has no valid upstream credential."
        ) from exc


def _judge(answer: Answer, *, via_secret: bool) -> None:
    if answer.status < 300:
        return
    if answer.status == 400:
        raise upstream_rejection(answer.body)
    if via_secret and answer.status in (401, 403):
        raise ClientRefused(
            401,
            "client_secret_rejected",
            "The upstream service refused the client secret (expired or revoked); mint a new one.",
        )
    raise refusal_for_status(answer.status, retry_after_seconds(answer.headers.get("Retry-After")))


def _overall_refusal(refusals: list[UpstreamRefused]) -> UpstreamRefused:
    if not refusals:
        return UpstreamRefused(
            504, "upstream_timeout", "The upstream service did not answer in time."
        )
    if all(r.status == 429 for r in refusals):
        return UpstreamRefused(
            429,
            "upstream_rate_limited",
            "The upstream service is rate limiting; retry later.",
            retry_after=str(min(int(r.retry_after or "1") for r in refusals)),
        )
    return refusals[-1]


# --- handlers --------------------------------------------------------------------------------


async def client_secrets(request: web.Request) -> web.Response:
    return await _handle(request, "client_secrets", _mint)


async def calls(request: web.Request) -> web.Response:
    return await _handle(request, "calls", _call)


async def preflight(request: web.Request) -> web.Response:
    """CORS preflight for browsers posting their offer from a web page."""
    state = request.app[STATE]
    origin = request.headers.get("Origin")
    if origin is None or not _origin_allowed(state, origin):
        return _refused(ClientRefused(403, "origin_not_allowed", "This Origin may not call."))
    return web.Response(
        status=204,
        headers={
            **_cors(origin),
            "Access-Control-Allow-Methods": "POST",
            "Access-Control-Allow-Headers": _CORS_HEADERS,
            "Access-Control-Max-Age": "600",
        },
    )


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
        state.metrics.webrtc_refusals.labels(endpoint, str(refusal.status), code).inc()
        _log.warning(
            "webrtc_refused",
            status=refusal.status,
            code=refusal.code,
            cause=repr(refusal.__cause__) if refusal.__cause__ else None,
        )
        response = _refused(refusal)
    if endpoint == "calls" and origin is not None and _origin_allowed(state, origin):
        response.headers.update(_cors(origin))
    return response


def _refused(refusal: HttpRefusal) -> web.Response:
    headers = {"Retry-After": refusal.retry_after} if refusal.retry_after else None
    return web.Response(
        status=refusal.status,
        body=error_body(refusal),
        content_type="application/json",
        headers=headers,
    )


async def _mint(request: web.Request, state: RelayState, webrtc: WebRtc) -> web.Response:
    team, _ = _authenticate(request, state, None)
    assert team is not None
    wanted = parse_secret_request(
        await _body(request), request.query.get("model"), state.config.webrtc.max_secret_seconds
    )
    deployment = _deployment(state, team, wanted.deployment)
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
    backend, answer = await forward(state, deployment, _candidates(state, deployment), outbound)
    minted = parse_minted(answer.body)
    expires_at = min(float(minted["expires_at"]), webrtc.book.clock() + wanted.seconds)
    webrtc.book.remember(
        minted["value"], MintedSecret(team.name, deployment.name, backend.name, expires_at)
    )
    minted["expires_at"] = int(expires_at)
    minted["session"] = {**minted.get("session", {}), "model": deployment.name}
    state.metrics.client_secrets.labels(team.name, deployment.name).inc()
    _log.info("client_secret_minted", backend=backend.name, seconds=wanted.seconds)
    return web.Response(body=orjson.dumps(minted), content_type="application/json")


async def _call(request: web.Request, state: RelayState, webrtc: WebRtc) -> web.Response:
    team, minted = _authenticate(request, state, webrtc.book)
    if minted is not None:
        team, deployment, backends = _secret_route(state, webrtc.book, minted, request.query)
    else:
        assert team is not None
        deployment = _deployment(state, team, request.query.get("model", ""))
        backends = _candidates(state, deployment)
    offer = await _sdp_body(request)
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


def _authenticate(
    request: web.Request, state: RelayState, book: SecretBook | None
) -> tuple[TeamConfig | None, MintedSecret | None]:
    """The team of a relay key, or (with ``book``) the record of a client secret this relay
    minted, from the request's headers; or a refusal."""
    _check_open(state, request)
    address = state.client_address(request)
    state.auth_throttle.check(address)
    key = find_key(request.headers, {}, ())
    team = state.keyring.identify(key) if key is not None else None
    minted = book.find(key) if book is not None and key is not None and team is None else None
    if team is None and minted is None:
        state.auth_throttle.failed(address)
        if key is None:
            raise ClientRefused(
                401,
                "missing_api_key",
                "No key: send a relay key (or, on /calls, a client secret this relay minted) "
                "as the `api-key` header or `Authorization: Bearer`.",
            )
        raise ClientRefused(401, "invalid_api_key", _INVALID_KEY[book is not None])
    state.auth_throttle.succeeded(address)
    if team is not None:
        structlog.contextvars.bind_contextvars(team=team.name)
    return team, minted


_INVALID_KEY = {
    False: "The relay key is not valid.",
    True: "The key is neither a relay key nor a client secret this relay minted.",
}


def _secret_route(
    state: RelayState, book: SecretBook, minted: MintedSecret, query: Mapping[str, str]
) -> tuple[TeamConfig, DeploymentConfig, list[Backend]]:
    structlog.contextvars.bind_contextvars(team=minted.team, deployment=minted.deployment)
    if minted.expires_at <= book.clock():
        raise ClientRefused(
            401, "client_secret_expired", "The client secret has expired; mint a new one."
        )
    if query.get("model") not in (None, minted.deployment):
        raise RequestRejected(
            "deployment_mismatch",
            f"The client secret is for the deployment {minted.deployment!r}.",
            "model",
        )
    pool = state.pools[minted.deployment]
    backend = next(b for b in pool.backends if b.name == minted.backend)
    return state.config.teams[minted.team], pool.deployment, [backend]


def _check_open(state: RelayState, request: web.Request) -> None:
    if state.draining:
        raise ClientRefused(503, "relay_draining", "The relay is restarting; retry shortly.")
    origin = request.headers.get("Origin")
    if origin is not None and not _origin_allowed(state, origin):
        raise ClientRefused(403, "origin_not_allowed", "This Origin may not call.")


def _deployment(state: RelayState, team: TeamConfig, name: str) -> DeploymentConfig:
    if not name:
        raise ClientRefused(
            400, "missing_deployment", "Name the deployment with the `model` query parameter."
        )
    deployment = resolve_deployment(RealtimeRequest(name, False), team, state.config.deployments)
    structlog.contextvars.bind_contextvars(deployment=deployment.name)
    if deployment.protocol != "ga":
        raise ClientRefused(
            400,
            "protocol_mismatch",
            f"The deployment {deployment.name!r} speaks the preview protocol; WebRTC through "
            "the relay needs a GA deployment.",
        )
    return deployment


def _candidates(state: RelayState, deployment: DeploymentConfig) -> list[Backend]:
    pool = state.pools[deployment.name]
    candidates = pool.candidates()
    if not candidates:
        raise pool.unavailable_refusal()
    return candidates


async def _body(request: web.Request) -> bytes:
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


async def _sdp_body(request: web.Request) -> bytes:
    if request.content_type != "application/sdp":
        raise RequestRejected(
            "unsupported_content_type",
            "Send the SDP offer as the request body with `Content-Type: application/sdp`.",
        )
    offer = await _body(request)
    if not offer.strip():
        raise RequestRejected("missing_offer", "The request body holds no SDP offer.", "sdp")
    return offer


def _origin_allowed(state: RelayState, origin: str) -> bool:
    allowed = state.config.server.allowed_origins
    return "*" in allowed or origin in allowed


def _cors(origin: str) -> dict[str, str]:
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Expose-Headers": "Location",
        "Vary": "Origin",
    }


def add_routes(app: web.Application) -> None:
    """Serve the WebRTC endpoints on a relay app whose STATE is set."""
    state = app[STATE]
    app[WEBRTC] = WebRtc(SecretBook(), state.admission)
    for path in SECRET_PATHS:
        app.router.add_post(path, client_secrets)
    for path in CALL_PATHS:
        app.router.add_post(path, calls)
        app.router.add_route("OPTIONS", path, preflight)
