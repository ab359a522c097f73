"""Who may call the WebRTC endpoints and where a call goes: a relay key or a client secret
this process minted, the caller's Origin (CORS), the GA deployment and its backends."""

from __future__ import annotations

from collections.abc import Mapping

import structlog
from aiohttp import web

from relay.edge.auth import find_key
from relay.edge.routes import RealtimeRequest, resolve_deployment
from relay.edge.webrtc.call_book import CallRecords, PlacedCall
from relay.edge.webrtc.secret_book import MintedSecret, SecretRecords
from relay.errors import ClientRefused, RequestRejected
from relay.ops.config import DeploymentConfig, TeamConfig
from relay.ops.redaction import SECRETS
from relay.state import LiveConfig, RelayState
from relay.upstream.backends import Backend

_INVALID_KEY = {
    False: "The relay key is not valid.",
    True: "The key is neither a relay key nor a client secret this relay minted.",
}


async def authenticate(
    request: web.Request, state: RelayState, live: LiveConfig, book: SecretRecords | None
) -> tuple[TeamConfig | None, MintedSecret | None]:
    """The team of a relay key, or (with ``book``) the record of a client secret this relay
    minted, from the request's headers; or a refusal."""
    _check_open(state, live, request)
    address = live.client_address(request)
    key = find_key(request.headers, {}, ())
    SECRETS.in_this_request(key)
    team = live.keyring.identify(key) if key is not None else None
    minted = None
    if book is not None and key is not None and team is None:
        minted = await book.find(key)
    if team is None and minted is None:
        await state.auth_throttle.failed(address)
        if key is None:
            raise ClientRefused(
                401,
                "missing_api_key",
                "No key: send a relay key (or, on /calls, a client secret this relay minted) "
                "as the `api-key` header or `Authorization: Bearer`.",
            )
        raise ClientRefused(401, "invalid_api_key", _INVALID_KEY[book is not None])
    await state.auth_throttle.check(address)  # after the key is judged: see AuthBrake
    if team is not None:
        structlog.contextvars.bind_contextvars(team=team.name)
    return team, minted


def secret_route(
    live: LiveConfig, book: SecretRecords, minted: MintedSecret, query: Mapping[str, str]
) -> tuple[TeamConfig, DeploymentConfig, list[Backend]]:
    """The team, deployment and minting backend of an unexpired secret; or a refusal."""
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
    team = live.config.teams.get(minted.team)
    pool = live.pools.get(minted.deployment)
    backend = next((b for b in pool.backends if b.name == minted.backend), None) if pool else None
    if team is None or pool is None or backend is None or minted.deployment not in team.deployments:
        # A reload removed what the secret was minted for.
        raise ClientRefused(
            401, "client_secret_revoked", "The client secret's team or deployment is gone."
        )
    return team, pool.deployment, [backend]


def _check_open(state: RelayState, live: LiveConfig, request: web.Request) -> None:
    state.check_open()
    origin = request.headers.get("Origin")
    if origin is not None and not live.origin_allowed(origin):
        raise ClientRefused(403, "origin_not_allowed", "This Origin may not call.")


def ga_deployment(
    live: LiveConfig, team: TeamConfig, name: str, transcription: bool | None = None
) -> DeploymentConfig:
    """The GA deployment ``name`` that ``team`` may use, for a transcription session or not
    (None: either); or a refusal."""
    if not name:
        raise ClientRefused(
            400, "missing_deployment", "Name the deployment with the `model` query parameter."
        )
    known = live.config.deployments.get(name)
    if transcription is None:
        transcription = known is not None and known.kind == "transcription"
    wanted = RealtimeRequest(name, transcription=transcription)
    deployment = resolve_deployment(wanted, team, live.config.deployments)
    structlog.contextvars.bind_contextvars(deployment=deployment.name)
    if deployment.protocol != "ga":
        raise ClientRefused(
            400,
            "protocol_mismatch",
            f"The deployment {deployment.name!r} speaks the preview protocol; WebRTC through "
            "the relay needs a GA deployment.",
        )
    return deployment


def usable_backends(live: LiveConfig, deployment: DeploymentConfig) -> list[Backend]:
    """The deployment's backends to try, best first; or the pool's refusal if none is up."""
    pool = live.pools[deployment.name]
    candidates = pool.candidates()
    if not candidates:
        raise pool.unavailable_refusal()
    return candidates


def cors_headers(origin: str) -> dict[str, str]:
    """For an allowed Origin's call: the browser may read the answer and its ``Location``."""
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Expose-Headers": "Location",
        "Vary": "Origin",
    }


def preflight_headers(origin: str) -> dict[str, str]:
    """For an allowed Origin's preflight: it may POST with a key and an SDP body."""
    return {
        **cors_headers(origin),
        "Access-Control-Allow-Methods": "POST",
        "Access-Control-Allow-Headers": "Authorization, Content-Type, api-key",
        "Access-Control-Max-Age": "600",
    }


async def owned_call(
    live: LiveConfig, calls: CallRecords, team: TeamConfig, call_id: str
) -> tuple[PlacedCall, DeploymentConfig, Backend]:
    """The call ``team`` placed through the relay, its deployment and backend; 404 for any
    other call (another team's call is as unknown as one that never was)."""
    placed = await calls.find(call_id)
    if placed is None or placed.team != team.name or placed.deployment not in live.pools:
        raise ClientRefused(
            404, "call_not_found", "No call with this id was placed through the relay by this key."
        )
    pool = live.pools[placed.deployment]
    backend = next((b for b in pool.backends if b.name == placed.backend), None)
    if backend is None:
        raise ClientRefused(404, "call_not_found", "The call's backend is no longer configured.")
    structlog.contextvars.bind_contextvars(deployment=placed.deployment, backend=backend.name)
    return placed, pool.deployment, backend
