"""The upstream side: the exact Azure URL, failover across a pool, and every way a handshake
(`handshake.py`) can fail mapped to what the client is told.

The handshake runs before the client's upgrade completes, so every way it can fail becomes
an honest HTTP answer to the client (see `UpstreamRefused`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from relay.errors import ClientRefused, CredentialUnavailable, UpstreamRefused
from relay.ops.config import DeploymentConfig, RelayConfig
from relay.upstream.backends import Backend, BackendPool
from relay.upstream.credentials import UpstreamCredential
from relay.upstream.handshake import Dialer, HandshakeRefused, SocketOptions, UpstreamTarget
from relay.upstream.handshake import UpstreamSocket as UpstreamSocket  # re-exported

T = TypeVar("T")


def realtime_url(endpoint: str, deployment: DeploymentConfig, azure_deployment: str = "") -> URL:
    """The Azure realtime WebSocket URL for a deployment behind ``endpoint``.

    GA: ``wss://{resource}/openai/v1/realtime?model={deployment}`` with no api-version (Azure
    answers 401 to an api-version there). Preview:
    ``wss://{resource}/openai/realtime?api-version={v}&deployment={deployment}``. A
    transcription deployment: ``intent=transcription`` instead of the deployment (which the
    session names as its transcription model; Azure's preview path refuses a deployment).
    """
    azure_deployment = azure_deployment or deployment.azure_deployment
    base = URL(endpoint)
    scheme = {"https": "wss", "http": "ws"}.get(base.scheme, base.scheme)
    prefix = base.path.rstrip("/")
    named = (
        {"intent": "transcription"}
        if deployment.kind == "transcription"
        else {"model" if deployment.protocol == "ga" else "deployment": azure_deployment}
    )
    if deployment.protocol == "ga":
        path, query = "/openai/v1/realtime", named
    else:
        path, query = "/openai/realtime", {"api-version": deployment.api_version, **named}
    return base.with_scheme(scheme).with_path(prefix + path).with_query(query)


def socket_options(config: RelayConfig) -> SocketOptions:
    """The options of every upstream socket, from the config in force."""
    return SocketOptions(
        close_timeout=config.server.close_timeout_seconds,
        heartbeat=config.upstream.heartbeat_seconds,
        max_message_bytes=config.server.max_message_bytes,
    )


async def connect_pool(
    dialer: Dialer,
    pool: BackendPool,
    *,
    request_id: str,
    connect_timeout: float,
    options: SocketOptions,
    on_failure: Callable[[Backend, UpstreamRefused], None] = lambda backend, refusal: None,
    last: Backend | None = None,
) -> tuple[Backend, UpstreamSocket]:
    """Open a socket to the pool's best backend, failing over to the next within one overall
    deadline; or raise the refusal the client gets. ``last`` (a backend just lost) is tried
    after every other one."""
    candidates = pool.candidates()
    if last in candidates:
        candidates = [b for b in candidates if b is not last] + [last]
    if not candidates:
        raise pool.unavailable_refusal()

    async def attempt(backend: Backend, remaining: float) -> UpstreamSocket:
        return await open_upstream(
            dialer,
            backend.target,
            backend.credential,
            request_id=request_id,
            connect_timeout=remaining,
            options=options,
        )

    return await fail_over(
        pool, candidates, attempt, seconds=connect_timeout, on_failure=on_failure
    )


async def fail_over(
    pool: BackendPool,
    backends: Sequence[Backend],
    attempt: Callable[[Backend, float], Awaitable[T]],
    *,
    seconds: float,
    on_failure: Callable[[Backend, UpstreamRefused], None],
) -> tuple[Backend, T]:
    """Run ``attempt(backend, seconds_left)`` on each backend in turn until one succeeds, all
    within one deadline ``seconds`` away; or raise the refusal the client gets.

    An UpstreamRefused marks the backend failed in ``pool`` and moves on; a ClientRefused
    means the backend answered and the request was the problem, so it is raised at once.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    refusals: list[UpstreamRefused] = []
    for backend in backends:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            result = await attempt(backend, remaining)
        except UpstreamRefused as refusal:
            pool.failed(backend, refusal)
            on_failure(backend, refusal)
            refusals.append(refusal)
            continue
        except ClientRefused:
            pool.succeeded(backend)
            raise
        pool.succeeded(backend)
        return backend, result
    raise _overall_refusal(refusals)


def _overall_refusal(refusals: list[UpstreamRefused]) -> UpstreamRefused:
    if not refusals:
        return UpstreamRefused(
            504, "upstream_timeout", "The upstream service did not answer in time."
        )
    if all(r.status == 429 for r in refusals):
        wait = min(int(r.retry_after or "1") for r in refusals)
        return UpstreamRefused(
            429,
            "upstream_rate_limited",
            "The upstream service is rate limiting; retry later.",
            retry_after=str(wait),
        )
    return refusals[-1]


async def open_upstream(
    dialer: Dialer,
    target: UpstreamTarget,
    credential: UpstreamCredential,
    *,
    request_id: str,
    connect_timeout: float,
    options: SocketOptions,
) -> UpstreamSocket:
    """Open the upstream WebSocket, or raise UpstreamRefused with the status for the client."""
    headers = await credential_headers(credential)
    # Lets Azure support trace a session from the relay's logs.
    headers["x-ms-client-request-id"] = request_id
    with transport_refusals():
        try:
            async with asyncio.timeout(connect_timeout):
                return await dialer.open(target, headers, options)
        except HandshakeRefused as exc:
            raise refusal_for_status(exc.status, retry_after_seconds(exc.retry_after)) from exc


@contextmanager
def transport_refusals() -> Iterator[None]:
    """Raise a timeout as UpstreamRefused (504) and a connection failure as one (502)."""
    try:
        yield
    except TimeoutError as exc:
        raise UpstreamRefused(
            504, "upstream_timeout", "The upstream service did not answer in time."
        ) from exc
    except (aiohttp.ClientError, HttpProcessingError, OSError) as exc:
        raise UpstreamRefused(
            502, "upstream_unavailable", "The upstream service could not be reached."
        ) from exc


async def credential_headers(credential: UpstreamCredential) -> dict[str, str]:
    """The credential's headers for one upstream request; or UpstreamRefused (503)."""
    try:
        return await credential.headers()
    except CredentialUnavailable as exc:
        raise UpstreamRefused(
            503, "upstream_credential_unavailable", "The relay has no valid upstream credential."
        ) from exc


# The longest Retry-After believed: the service's own ask for a pause is seconds to a
# minute; a larger one (or `inf`) would take a backend out for as long, with no probe back.
MAX_RETRY_AFTER_SECONDS = 300


def retry_after_seconds(retry_after: str | None) -> str | None:
    """Retry-After as whole seconds, 1 to MAX_RETRY_AFTER_SECONDS (it may also be an HTTP
    date, or nonsense: then a safe default)."""
    if retry_after is None:
        return None
    try:
        seconds = float(retry_after)
    except ValueError:
        return "5"
    if math.isnan(seconds):
        return "5"
    return str(math.ceil(min(max(seconds, 1.0), MAX_RETRY_AFTER_SECONDS)))


def refusal_for_status(status: int, retry_after: str | None) -> UpstreamRefused:
    """Map an upstream handshake status to what the client is told."""
    if status in (401, 403):
        # The client's key was fine; the relay's credential is not. Say so without details.
        return UpstreamRefused(
            502, "upstream_auth_failed", "The upstream service refused the relay's credential."
        )
    if status == 429:
        return UpstreamRefused(
            429,
            "upstream_rate_limited",
            "The upstream service is rate limiting; retry later.",
            retry_after=retry_after or "1",
        )
    if status == 200:
        return UpstreamRefused(
            502, "upstream_not_websocket", "The upstream service did not upgrade to WebSocket."
        )
    return UpstreamRefused(
        502, "upstream_error", f"The upstream service answered the handshake with HTTP {status}."
    )
