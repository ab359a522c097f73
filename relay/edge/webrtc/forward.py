"""Sending one request to a deployment's backends, failing over like the WebSocket path,
and judging the answer. The only module here that talks to the upstream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
import structlog
from multidict import CIMultiDictProxy

from relay.edge.webrtc.requests import upstream_rejection, webrtc_url
from relay.errors import ClientRefused, UpstreamRefused
from relay.ops.config import DeploymentConfig
from relay.state import LiveConfig, RelayState
from relay.upstream.backends import Backend
from relay.upstream.dial import (
    credential_headers,
    fail_over,
    refusal_for_status,
    retry_after_seconds,
    transport_refusals,
)

_log = structlog.get_logger("relay.edge.webrtc")


# The most of an upstream answer read (an SDP answer, a secret, an error: a few KiB); a
# larger one is refused rather than held (315 MB of SDP took the process to 668 MiB).
MAX_ANSWER_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Outbound:
    """One request to send to a backend, built per backend (names and credentials differ)."""

    leaf: str  # "client_secrets" | "calls" | "calls/{call_id}/{action}"
    content_type: str
    body: Callable[[Backend], bytes]
    query: Callable[[Backend], Mapping[str, str]]
    # A client secret to send instead of the backend's credential.
    bearer: str | None = None
    # Upstream statuses that are the caller's answer as they are (call control's 404).
    passed: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    headers: CIMultiDictProxy[str]


async def forward(
    state: RelayState,
    live: LiveConfig,
    deployment: DeploymentConfig,
    backends: list[Backend],
    outbound: Outbound,
) -> tuple[Backend, Answer]:
    """Send ``outbound`` to the first backend that answers it, within one deadline; or raise
    the refusal the caller gets."""
    assert state.http is not None
    # Lets Azure support trace a request from the relay's logs.
    request_id = str(structlog.contextvars.get_contextvars().get("request_id", ""))

    async def attempt(backend: Backend, seconds: float) -> Answer:
        answer = await _send(state, deployment, backend, outbound, request_id, seconds)
        if answer.status not in outbound.passed:
            _judge(answer, via_secret=outbound.bearer is not None)
        return answer

    def failed(backend: Backend, refusal: UpstreamRefused) -> None:
        state.metrics.upstream_connect_failures.labels(
            deployment.name, backend.name, refusal.code
        ).inc()
        _log.warning("webrtc_upstream_failed", backend=backend.name, code=refusal.code)

    return await fail_over(
        live.pools[deployment.name],
        backends,
        attempt,
        seconds=live.config.upstream.connect_timeout_seconds,
        on_failure=failed,
    )


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
        headers = await credential_headers(backend.credential)
    headers |= {"Content-Type": outbound.content_type, "x-ms-client-request-id": request_id}
    url = webrtc_url(backend.url, outbound.leaf, outbound.query(backend))
    began = time.perf_counter()
    with transport_refusals():
        async with asyncio.timeout(seconds):
            async with state.http.post(
                url, data=outbound.body(backend), headers=headers, allow_redirects=False
            ) as response:
                answer = Answer(response.status, await _read(response), response.headers)
    endpoint = outbound.leaf.rsplit("/", 1)[-1]  # a bounded label: no call ids
    state.metrics.webrtc_upstream.labels(deployment.name, endpoint).observe(
        time.perf_counter() - began
    )
    return answer


async def _read(response: aiohttp.ClientResponse) -> bytes:
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(65536):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise UpstreamRefused(
                502,
                "upstream_invalid_response",
                "The upstream service's answer was larger than the relay takes.",
            )
        chunks.append(chunk)
    return b"".join(chunks)


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
