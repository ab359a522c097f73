"""The pure core: what a caller asks for, the session a secret carries, the upstream's URL,
and what the upstream's answers mean. No I/O; each raises the refusal the caller gets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import orjson
from yarl import URL

from relay.errors import RequestRejected, UpstreamRefused
from relay.ops.redaction import SECRETS
from relay.session.policy import PolicyViolation, Rewritten, SessionPolicy
from relay.session.schema import merge_session, set_path
from relay.session.transcription import GA_MODEL_PATH as TRANSCRIPTION_MODEL

DEFAULT_SECRET_SECONDS = 600  # the service's default
# Call control (`POST …/calls/{call_id}/{action}`): WebRTC and SIP; the last three are SIP's.
CONTROL_ACTIONS = ("hangup", "accept", "reject", "refer")
MIN_SECRET_SECONDS, MAX_SECRET_SECONDS = 10, 7200  # the service's range


class UpstreamRejected(RequestRejected):
    """The upstream's own 400 for what the caller sent (a bad session, a bad offer)."""


@dataclass(frozen=True, slots=True)
class SecretRequest:
    deployment: str
    session: dict[str, Any]
    seconds: int
    # A transcription session's secret (session.type = "transcription").
    transcription: bool = False


@dataclass(frozen=True, slots=True)
class SessionRequest:
    """A session a caller asks for: the deployment it names (if any) and the fragment."""

    deployment: str | None
    fragment: dict[str, Any]
    transcription: bool


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
    wanted = parse_session(data.get("session", {}), query_model)
    if wanted.deployment is None:
        param = f"session.{TRANSCRIPTION_MODEL}" if wanted.transcription else "session.model"
        raise RequestRejected("missing_deployment", f"Name the deployment in {param}.", param)
    seconds = min(_requested_seconds(data.get("expires_after")), max_seconds)
    return SecretRequest(wanted.deployment, wanted.fragment, seconds, wanted.transcription)


def parse_session(session: Any, query_model: str | None) -> SessionRequest:
    """A realtime or transcription session a caller sends (a client secret's, a multipart
    call's), and the deployment it names: ``session.model``, or for a transcription session
    its transcription model (the relay's name for the transcription deployment)."""
    if not isinstance(session, dict):
        raise RequestRejected("invalid_type", "session must be an object.", "session")
    try:
        orjson.dumps(session)  # what the relay sends on must be written back
    except orjson.JSONEncodeError as exc:
        raise RequestRejected(
            "invalid_value", "The session is nested too deeply; flatten it.", "session"
        ) from exc
    kind = session.get("type", "realtime")
    if kind not in ("realtime", "transcription"):
        raise RequestRejected(
            "unsupported_session_type",
            "The relay takes realtime and transcription sessions only.",
            "session.type",
        )
    transcription = kind == "transcription"
    param = f"session.{TRANSCRIPTION_MODEL if transcription else 'model'}"
    fragment = {k: v for k, v in session.items() if k not in ("type", "model")}
    if transcription:
        table = _transcription_of(fragment)
        model = table.get("model") if table is not None else None
        if table is not None and "model" in table:
            fragment = merge_session(fragment, {})
            del fragment["audio"]["input"]["transcription"]["model"]
    else:
        model = session.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestRejected("invalid_type", f"{param} must be a string.", param)
    if model and query_model and model != query_model:
        raise RequestRejected(
            "deployment_mismatch",
            f"{param} and the model query parameter name different deployments.",
            param,
        )
    return SessionRequest(model or query_model or None, fragment, transcription)


def _transcription_of(fragment: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """``audio.input.transcription`` where each level is a table (else the upstream judges
    the shape, as it would without the relay)."""
    node: Any = fragment
    for part in ("audio", "input", "transcription"):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else None


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
        if isinstance(judged, Rewritten):  # corrected to the rules: the secret carries that
            judged = judged.frame
        checked = orjson.loads(judged)["session"]
    session = merge_session(policy.defaults, checked)
    if policy.instructions_prefix and not isinstance(session.get("instructions"), str):
        # A new session's null instructions are the service's default ones: the team's
        # prefix is still kept in front of whatever the model is told.
        session["instructions"] = policy.instructions_prefix
    return {"type": "realtime", **session}


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


_REFUSED = "The upstream service refused the request."


def upstream_rejection(body: bytes) -> UpstreamRejected:
    """The upstream's 400, told to the caller with its own message and parameter."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    error = error if isinstance(error, dict) else {}
    code, message, param = error.get("code"), error.get("message"), error.get("param")
    # The upstream's words reach the caller: never a credential it may have quoted, in any
    # field (a code that quotes one is replaced whole: a code is a word to match on).
    if not isinstance(code, str) or len(code) > 64 or SECRETS.clean(code) != code:
        code = "invalid_request"
    return UpstreamRejected(
        code,
        SECRETS.clean(message) if isinstance(message, str) else _REFUSED,
        SECRETS.clean(param) if isinstance(param, str) else None,
    )


def multipart_call(offer: bytes, session: dict[str, Any], boundary: str) -> bytes:
    """A call as openai-python posts it: ``multipart/form-data`` with an ``sdp`` part and a
    ``session`` part (JSON); ``boundary`` goes in the Content-Type."""
    body = bytearray()
    for name, content_type, data in (
        ("sdp", "application/sdp", offer),
        ("session", "application/json", orjson.dumps(session)),
    ):
        body += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        body += data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body)


def upstream_session(session: Mapping[str, Any], azure_deployment: str) -> dict[str, Any]:
    """The session as a backend needs it: its Azure deployment as the model (a realtime
    session's ``model``, a transcription session's transcription model)."""
    if session.get("type") == "transcription":
        named: dict[str, Any] = {}
        set_path(named, TRANSCRIPTION_MODEL, azure_deployment)
        return merge_session(session, named)
    return {**session, "model": azure_deployment}
