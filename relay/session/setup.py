"""Session start: put the team's defaults in force before the client sees anything.

Runs before the client's upgrade completes, so a failure is still an HTTP answer. The
upstream's `session.created` is held back; the defaults go up as a `session.update`; once
the upstream confirms with `session.updated`, the client gets a `session.created` showing
the session actually in force. No client event reaches the upstream before that.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from relay.errors import UpstreamRefused
from relay.ops.redaction import SECRETS
from relay.session import shared_strings
from relay.session.codec import FrameError, parse_event
from relay.session.policy import SessionPolicy
from relay.upstream.dial import UpstreamSocket

# What an upstream may send between session.created and its session.updated (the service
# sends a few events of a few hundred bytes): the relay holds them for the client.
MAX_HELD_AT_START_BYTES = 1024 * 1024


@dataclass(slots=True)
class StartedSession:
    # The `session.created` the client gets first (None: a call's sideband gets none).
    created_frame: bytes | None
    # The session in force, in the deployment's dialect.
    session: dict[str, Any]
    # Other upstream events that arrived during set-up, in order, for the client.
    pending: list[bytes] = field(default_factory=list)
    # The policy the session runs under, when not the team's on the deployment.
    policy: SessionPolicy | None = None

    @property
    def created(self) -> tuple[bytes, ...]:
        return () if self.created_frame is None else (self.created_frame,)

    def take_greeting(self) -> tuple[bytes, ...]:
        """The frames the client gets first, handed over once: not kept for the session."""
        greeting = (*self.created, *self.pending)
        self.created_frame, self.pending = None, []
        return greeting

    def take_session(self) -> dict[str, Any]:
        """The session in force, handed over once: kept here, it would outlive the session's
        first `session.updated` (2 KiB and more, for the session's life)."""
        session, self.session = self.session, {}
        return session


async def start_session(
    upstream: UpstreamSocket, policy: SessionPolicy, *, setup_seconds: float
) -> StartedSession:
    return await put_in_force(
        upstream, policy, policy.defaults_event(), setup_seconds=setup_seconds
    )


async def put_in_force(
    upstream: UpstreamSocket,
    policy: SessionPolicy,
    update: bytes | None,
    *,
    setup_seconds: float,
) -> StartedSession:
    """Wait for `session.created`, send ``update`` (a `session.update`) and wait for its
    `session.updated`: the session a new upstream starts with, and what else it sent."""
    try:
        async with asyncio.timeout(setup_seconds):
            created_frame, created = await _next_event(upstream)
            # A preview transcription session starts with transcription_session.created.
            expected = {"session.created", policy.session_event("created")}
            if created.get("type") not in expected:
                raise _refusal(f"expected session.created first, got {created.get('type')!r}")
            if update is None:
                return StartedSession(created_frame, _session_of(created), policy=policy)
            await upstream.send_frame(update, aiohttp.WSMsgType.TEXT)
            pending: list[bytes] = []
            held = 0
            updated = policy.session_event("updated")
            while True:
                frame, event = await _next_event(upstream)
                kind = event.get("type")
                if kind == updated:
                    break
                held += len(frame)
                if held > MAX_HELD_AT_START_BYTES:
                    # Events the client gets once the session is in force are held till
                    # then: an upstream sending on and on would fill the process's memory.
                    raise _refusal(
                        f"more than {MAX_HELD_AT_START_BYTES} bytes of events before "
                        "session.updated"
                    )
                if kind == "error":
                    error = event.get("error")
                    detail = error if isinstance(error, dict) else {}
                    raise UpstreamRefused(
                        502,
                        "session_defaults_rejected",
                        "The upstream service rejected the relay's session defaults: "
                        f"{SECRETS.clean_known(str(detail.get('message', 'no message')))}",
                    )
                pending.append(frame)
    except TimeoutError as exc:
        raise UpstreamRefused(
            504, "upstream_timeout", "The upstream service did not start the session in time."
        ) from exc
    session = _session_of(event)
    # The client's copy says when the relay ends the session, if before the service would.
    created["session"] = shown_expiry(session, policy.max_session_seconds, time.time())
    return StartedSession(orjson.dumps(created), session, pending, policy)


def shown_expiry(
    session: dict[str, Any], max_session_seconds: float | None, started: float
) -> dict[str, Any]:
    """``session`` as a client is shown it: its `expires_at` (Unix seconds) no later than
    the relay's own limit from ``started``, which clients plan their reconnects by (it said
    60 minutes for a session the policy ends at 30). The same dict when nothing changes."""
    expires = session.get("expires_at")
    if max_session_seconds is None or not isinstance(expires, int | float):
        return session
    ends = int(started + max_session_seconds)
    return session if expires <= ends else {**session, "expires_at": ends}


async def _next_event(upstream: UpstreamSocket) -> tuple[bytes, dict[str, Any]]:
    msg = await upstream.receive()
    if msg.type is not aiohttp.WSMsgType.TEXT:
        raise _refusal(f"the upstream closed or failed during session start ({msg.type.name})")
    try:
        return msg.data, parse_event(msg.data)
    except FrameError as exc:
        raise _refusal(f"the upstream sent an invalid event during session start: {exc}") from exc


def _session_of(event: dict[str, Any]) -> dict[str, Any]:
    session = event.get("session")
    # Kept for the session's life: its strings shared with the other sessions'.
    return shared_strings.share(session) if isinstance(session, dict) else {}


_MAX_DETAIL_CHARS = 200


def _refusal(detail: str) -> UpstreamRefused:
    # The detail may quote the upstream (its first event's type): never the relay's own
    # credential, which a confused service may echo.
    detail = SECRETS.clean_known(detail)
    if len(detail) > _MAX_DETAIL_CHARS:  # a whole event's worth of "type" is no help
        detail = detail[:_MAX_DETAIL_CHARS] + "..."
    return UpstreamRefused(502, "upstream_protocol_error", f"Session start failed: {detail}.")
