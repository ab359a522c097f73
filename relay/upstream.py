"""The upstream side: the exact Azure URL and headers, and the handshake with its failures.

The handshake runs before the client's upgrade completes, so every way it can fail becomes
an honest HTTP answer to the client (see `UpstreamRefused`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
from yarl import URL

from relay.config import GA_API_VERSION, DeploymentConfig
from relay.credentials import UpstreamCredential
from relay.errors import UpstreamRefused

UpstreamSocket = aiohttp.ClientWebSocketResponse[bool]


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where one deployment's sessions go, and how the relay authenticates there."""

    deployment: DeploymentConfig
    url: URL
    credential: UpstreamCredential


def realtime_url(endpoint: str, deployment: DeploymentConfig) -> URL:
    """The Azure realtime WebSocket URL for a deployment behind ``endpoint``.

    GA: ``wss://{resource}/openai/v1/realtime?model={deployment}`` with no api-version (Azure
    answers 401 to an api-version there). Preview:
    ``wss://{resource}/openai/realtime?api-version={v}&deployment={deployment}``.
    """
    base = URL(endpoint)
    scheme = {"https": "wss", "http": "ws"}.get(base.scheme, base.scheme)
    prefix = base.path.rstrip("/")
    if deployment.protocol == "ga":
        path, query = "/openai/v1/realtime", {"model": deployment.azure_deployment}
    else:
        path = "/openai/realtime"
        query = {"api-version": deployment.api_version, "deployment": deployment.azure_deployment}
    return base.with_scheme(scheme).with_path(prefix + path).with_query(query)


def flavour_label(deployment: DeploymentConfig) -> str:
    return GA_API_VERSION if deployment.protocol == "ga" else deployment.api_version


async def open_upstream(
    session: aiohttp.ClientSession,
    target: UpstreamTarget,
    *,
    request_id: str,
    connect_timeout: float,
    close_timeout: float,
    heartbeat: float,
    max_message_bytes: int,
) -> UpstreamSocket:
    """Open the upstream WebSocket, or raise UpstreamRefused with the status for the client."""
    headers = await target.credential.headers()
    # Lets Azure support trace a session from the relay's logs.
    headers["x-ms-client-request-id"] = request_id
    try:
        async with asyncio.timeout(connect_timeout):
            return await session.ws_connect(
                target.url,
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
        retry_after = exc.headers.get("Retry-After") if exc.headers else None
        raise refusal_for_status(exc.status, retry_after) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamRefused(
            502, "upstream_unavailable", "The upstream service could not be reached."
        ) from exc


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
