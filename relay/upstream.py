"""The upstream side: the exact Azure URL and headers, and the handshake with its failures.

The handshake runs before the client's upgrade completes, so every way it can fail becomes
an honest HTTP answer to the client (see `UpstreamRefused`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from yarl import URL

from relay.backends import Backend, BackendPool
from relay.config import DeploymentConfig
from relay.credentials import UpstreamCredential
from relay.errors import CredentialUnavailable, UpstreamRefused

UpstreamSocket = aiohttp.ClientWebSocketResponse[bool]


def realtime_url(endpoint: str, deployment: DeploymentConfig, azure_deployment: str = "") -> URL:
    """The Azure realtime WebSocket URL for a deployment behind ``endpoint``.

    GA: ``wss://{resource}/openai/v1/realtime?model={deployment}`` with no api-version (Azure
    answers 401 to an api-version there). Preview:
    ``wss://{resource}/openai/realtime?api-version={v}&deployment={deployment}``.
    """
    azure_deployment = azure_deployment or deployment.azure_deployment
    base = URL(endpoint)
    scheme = {"https": "wss", "http": "ws"}.get(base.scheme, base.scheme)
    prefix = base.path.rstrip("/")
    if deployment.protocol == "ga":
        path, query = "/openai/v1/realtime", {"model": azure_deployment}
    else:
        path = "/openai/realtime"
        query = {"api-version": deployment.api_version, "deployment": azure_deployment}
    return base.with_scheme(scheme).with_path(prefix + path).with_query(query)


@dataclass(frozen=True, slots=True)
class SocketOptions:
    close_timeout: float
    heartbeat: float
    max_message_bytes: int


async def connect_pool(
    session: aiohttp.ClientSession,
    pool: BackendPool,
    *,
    request_id: str,
    connect_timeout: float,
    options: SocketOptions,
    on_failure: Callable[[Backend, UpstreamRefused], None] = lambda backend, refusal: None,
) -> tuple[Backend, UpstreamSocket]:
    """Open a socket to the pool's best backend, failing over to the next within one overall
    deadline; or raise the refusal the client gets."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + connect_timeout
    candidates = pool.candidates()
    if not candidates:
        raise pool.unavailable_refusal()
    refusals: list[UpstreamRefused] = []
    for backend in candidates:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            upstream = await open_upstream(
                session,
                backend.url,
                backend.credential,
                request_id=request_id,
                connect_timeout=remaining,
                close_timeout=options.close_timeout,
                heartbeat=options.heartbeat,
                max_message_bytes=options.max_message_bytes,
            )
        except UpstreamRefused as refusal:
            pool.failed(backend, refusal)
            on_failure(backend, refusal)
            refusals.append(refusal)
            continue
        pool.succeeded(backend)
        return backend, upstream
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
    session: aiohttp.ClientSession,
    url: URL,
    credential: UpstreamCredential,
    *,
    request_id: str,
    connect_timeout: float,
    close_timeout: float,
    heartbeat: float,
    max_message_bytes: int,
) -> UpstreamSocket:
    """Open the upstream WebSocket, or raise UpstreamRefused with the status for the client."""
    try:
        headers = await credential.headers()
    except CredentialUnavailable as exc:
        raise UpstreamRefused(
            503, "upstream_credential_unavailable", "The relay has no valid upstream credential."
        ) from exc
    # Lets Azure support trace a session from the relay's logs.
    headers["x-ms-client-request-id"] = request_id
    try:
        async with asyncio.timeout(connect_timeout):
            return await session.ws_connect(
                url,
                headers=headers,
                compress=0,  # base64 audio barely compresses; deflate costs 2.5x the CPU
                max_msg_size=max_message_bytes,
                heartbeat=heartbeat,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=close_timeout),
                decode_text=False,
            )
    except TimeoutError as exc:
        raise UpstreamRefused(
            504, "upstream_timeout", "The upstream service did not answer in time."
        ) from exc
    except aiohttp.WSServerHandshakeError as exc:
        retry_after = _seconds(exc.headers.get("Retry-After") if exc.headers else None)
        raise refusal_for_status(exc.status, retry_after) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamRefused(
            502, "upstream_unavailable", "The upstream service could not be reached."
        ) from exc


def _seconds(retry_after: str | None) -> str | None:
    """Retry-After as whole seconds (it may also be an HTTP date: then a safe default)."""
    if retry_after is None:
        return None
    try:
        return str(max(1, math.ceil(float(retry_after))))
    except ValueError:
        return "5"


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
