"""The simulator's WebRTC endpoints: ephemeral client secrets and SDP calls.

``POST /openai/v1/realtime/client_secrets`` (api-key or Entra bearer) takes
``{"expires_after"?: {"anchor": "created_at", "seconds": 10..7200}, "session": {...}}`` and
answers ``{"value": "ek_…", "expires_at": <epoch>, "session": {...}}``, the session being the
service's default realtime session with the fragment applied (validated like a
``session.update``). ``POST /openai/v1/realtime/calls`` takes an SDP offer
(``Content-Type: application/sdp``) with ``Authorization: Bearer ek_…`` (a secret minted
here, not expired) or a key plus ``?model=``, and answers 201 with an SDP answer and
``Location: /openai/v1/realtime/calls/rtc_…``. openai-python's ``calls.create(sdp=…,
session=…)`` posts ``multipart/form-data`` instead: an ``sdp`` part and a ``session`` part
(JSON, a realtime session configuration). The answer is built from the offer: the same
m= sections, ``a=setup:passive``, fresh ICE credentials and DTLS fingerprint, one host
candidate; no media ever flows, but the call runs its session (`calls`: sideband sockets,
call control). Secrets and credentials are never logged.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from aiohttp import web

from relay.session.schema import merge_session
from relay.simulator import validate as v
from relay.simulator.calls import CALLS_KEY, CONTROL_ACTIONS, CallRegistry, on_shutdown
from relay.simulator.errors import ClientEventError, invalid_value, missing
from relay.simulator.schema import GA
from relay.simulator.server import OPTIONS_KEY, TOKEN_DENIED, authenticate, http_error
from relay.simulator.session import apply_update, default_session
from relay.simulator.transcription import apply_transcription_update, default_transcription_session

SECRETS_PATH = "/openai/v1/realtime/client_secrets"
CALLS_PATH = "/openai/v1/realtime/calls"
DEFAULT_SECRET_SECONDS = 600
MIN_SECRET_SECONDS, MAX_SECRET_SECONDS = 10, 7200
MAX_SECRETS = 10_000
# Where the simulated media would flow: a host candidate nobody answers on.
CANDIDATE_ADDRESS, CANDIDATE_PORT = "127.0.0.1", 3478
_DIRECTIONS = {"sendrecv": "sendrecv", "sendonly": "recvonly", "recvonly": "sendonly"}
_AUDIO_CODECS = ("opus/48000/2", "PCMU/8000", "PCMA/8000")

log = structlog.get_logger(__name__)


class OfferError(ValueError):
    """An SDP offer the service would refuse; the message says why."""


@dataclass(frozen=True, slots=True)
class MediaOffer:
    """One m= section of an offer: its line, its a= attributes (without ``a=``)."""

    kind: str
    proto: str
    formats: tuple[str, ...]
    attributes: tuple[str, ...]

    def attribute(self, name: str) -> str | None:
        prefix = name + ":"
        for attr in self.attributes:
            if attr.startswith(prefix):
                return attr[len(prefix) :]
        return None

    @property
    def mid(self) -> str | None:
        return self.attribute("mid")

    @property
    def direction(self) -> str:
        for attr in self.attributes:
            if attr in ("sendrecv", "sendonly", "recvonly", "inactive"):
                return attr
        return "sendrecv"


@dataclass(frozen=True, slots=True)
class Offer:
    session_attributes: tuple[str, ...]
    media: tuple[MediaOffer, ...]


@dataclass(frozen=True, slots=True)
class Transport:
    """What the answering side puts in every m= section."""

    ufrag: str
    pwd: str
    fingerprint: str
    address: str = CANDIDATE_ADDRESS
    port: int = CANDIDATE_PORT

    @classmethod
    def fresh(cls) -> Transport:
        digest = secrets.token_bytes(32)
        return cls(
            ufrag=secrets.token_hex(4),
            pwd=secrets.token_hex(16),
            fingerprint=":".join(f"{b:02X}" for b in digest),
        )


def parse_offer(sdp: str) -> Offer:
    """The offer's m= sections, or OfferError for what a WebRTC endpoint would refuse."""
    lines = [line.strip() for line in sdp.replace("\r\n", "\n").split("\n") if line.strip()]
    if not lines or lines[0] != "v=0":
        raise OfferError("The SDP offer must start with 'v=0'.")
    session: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    for line in lines[1:]:
        kind, sep, value = line.partition("=")
        if not sep or len(kind) != 1:
            raise OfferError(f"Malformed SDP line: {line[:60]!r}.")
        if kind == "m":
            sections.append((value, []))
        elif kind == "a":
            (sections[-1][1] if sections else session).append(value)
    if not sections:
        raise OfferError("The SDP offer has no media sections (m= lines).")
    media = tuple(_media(line, attrs) for line, attrs in sections)
    for name in ("ice-ufrag", "ice-pwd", "fingerprint"):
        if any(_lookup(m.attributes, session, name) is None for m in media):
            raise OfferError(f"The SDP offer is missing a={name}.")
    return Offer(tuple(session), media)


def _media(line: str, attributes: list[str]) -> MediaOffer:
    parts = line.split()
    if len(parts) < 4:
        raise OfferError(f"Malformed m= line: {line[:60]!r}.")
    return MediaOffer(parts[0], parts[2], tuple(parts[3:]), tuple(attributes))


def _lookup(attributes: tuple[str, ...], session: list[str], name: str) -> str | None:
    for attr in (*attributes, *session):
        if attr.startswith(name + ":"):
            return attr[len(name) + 1 :]
    return None


def build_answer(offer: Offer, transport: Transport, *, session_id: int) -> str:
    """An SDP answer to ``offer``: every m= section mirrored (audio on opus, PCMU or PCMA,
    data channels on SCTP, anything else rejected with port 0), passive DTLS, ICE lite."""
    lines = ["v=0", f"o=- {session_id} 1 IN IP4 0.0.0.0", "s=-", "t=0 0", "a=ice-lite"]
    bundle = next((a for a in offer.session_attributes if a.startswith("group:BUNDLE")), None)
    if bundle is not None:
        lines.append("a=" + bundle)
    lines.append("a=msid-semantic:WMS *")
    for media in offer.media:
        lines.extend(_answer_media(media, transport))
    return "\r\n".join(lines) + "\r\n"


def _answer_media(media: MediaOffer, transport: Transport) -> list[str]:
    if media.kind == "audio":
        chosen = _audio_format(media)
        if chosen is not None:
            payload, rtpmap = chosen
            body = [f"a=rtpmap:{payload} {rtpmap}"]
            fmtp = next((a for a in media.attributes if a.startswith(f"fmtp:{payload} ")), None)
            body += [f"a={fmtp}"] if fmtp else []
            body += ["a=rtcp-mux", f"a=ssrc:{secrets.randbits(31) + 1} cname:realtime"]
            direction = _DIRECTIONS.get(media.direction, "inactive")
            return _section(media, f"audio 9 {media.proto} {payload}", direction, body, transport)
    elif media.kind == "application":
        body = ["a=sctp-port:5000", "a=max-message-size:1073741823"]
        mline = f"application 9 {media.proto} {media.formats[0]}"
        return _section(media, mline, "", body, transport)
    # Rejected: port 0, the offer's own formats.
    lines = [f"m={media.kind} 0 {media.proto} {' '.join(media.formats)}", "c=IN IP4 0.0.0.0"]
    lines += [f"a=mid:{media.mid}"] if media.mid is not None else []
    return [*lines, "a=inactive"]


def _audio_format(media: MediaOffer) -> tuple[str, str] | None:
    offered: dict[str, tuple[str, str]] = {}
    for attr in media.attributes:
        if attr.startswith("rtpmap:"):
            payload, _, codec = attr[len("rtpmap:") :].partition(" ")
            if payload in media.formats:
                offered.setdefault(codec.lower(), (payload, codec))
    for codec in _AUDIO_CODECS:
        if codec.lower() in offered:
            return offered[codec.lower()]
    # Static payload types need no rtpmap.
    static = {"0": "PCMU/8000", "8": "PCMA/8000"}
    return next(((f, static[f]) for f in media.formats if f in static), None)


def _section(
    media: MediaOffer, mline: str, direction: str, body: list[str], transport: Transport
) -> list[str]:
    lines = [f"m={mline}", f"c=IN IP4 {transport.address}"]
    lines += [f"a=mid:{media.mid}"] if media.mid is not None else []
    lines += [f"a={direction}"] if direction else []
    lines += [
        f"a=ice-ufrag:{transport.ufrag}",
        f"a=ice-pwd:{transport.pwd}",
        f"a=fingerprint:sha-256 {transport.fingerprint}",
        "a=setup:passive",
        *body,
        f"a=candidate:1 1 udp 2130706431 {transport.address} {transport.port} typ host",
        "a=end-of-candidates",
    ]
    return lines


# --- client secrets --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MintedSecret:
    model: str
    expires_at: int
    # The session a call placed with this secret starts with.
    session: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class SecretStore:
    """Secrets this simulator minted, newest last; the oldest are forgotten past a bound."""

    clock: Callable[[], float] = time.time
    minted: OrderedDict[str, MintedSecret] = field(default_factory=OrderedDict)

    def mint(self, model: str, seconds: int, session: dict[str, Any]) -> tuple[str, MintedSecret]:
        value = "ek_" + secrets.token_hex(16)
        record = MintedSecret(model, int(self.clock()) + seconds, session)
        self.minted[value] = record
        while len(self.minted) > MAX_SECRETS:
            self.minted.popitem(last=False)
        return value, record

    def find(self, value: str) -> MintedSecret | None:
        """The live secret ``value`` names; None if unknown or expired."""
        found = self.minted.get(value)
        if found is None or found.expires_at <= self.clock():
            return None
        return found


STORE_KEY = web.AppKey("simulator_webrtc", SecretStore)


def secret_seconds(raw: Any) -> int:
    """The lifetime an ``expires_after`` asks for (the service's default when absent)."""
    if raw is None:
        return DEFAULT_SECRET_SECONDS
    expires = v.obj(raw, "expires_after")
    v.check_keys(expires, ("anchor", "seconds"), "expires_after")
    if expires.get("anchor", "created_at") != "created_at":
        raise invalid_value("expires_after.anchor", expires["anchor"], ("created_at",))
    if "seconds" not in expires:
        return DEFAULT_SECRET_SECONDS
    return v.integer(
        expires["seconds"], "expires_after.seconds", MIN_SECRET_SECONDS, MAX_SECRET_SECONDS
    )


def secret_session(raw: Any, *, session_id: str, expires_at: int) -> dict[str, Any]:
    """The session a secret carries: the defaults with the fragment applied. A realtime
    session names its deployment in ``model``; a transcription session has none."""
    if raw is None:
        raise missing("session")
    fragment = v.obj(raw, "session")
    if fragment.get("type") == "transcription":
        base = default_transcription_session(GA, session_id=session_id, expires_at=expires_at)
        session, _ = apply_transcription_update(GA, base, fragment)
        return session
    if fragment.get("type") != "realtime":
        if "type" not in fragment:
            raise missing("session.type")
        raise invalid_value("session.type", fragment["type"], ("realtime", "transcription"))
    model = v.string(v.required(fragment, "model", "session"), "session.model")
    base = default_session(GA, session_id=session_id, model=model, expires_at=expires_at)
    session, _ = apply_update(GA, base, fragment)
    return session


def _invalid_request(error: ClientEventError) -> web.Response:
    body = {
        "error": {
            "type": "invalid_request_error",
            "code": error.code,
            "message": error.message,
            "param": error.param,
        }
    }
    return web.Response(status=400, body=orjson.dumps(body), content_type="application/json")


async def client_secrets(request: web.Request) -> web.Response:
    denied = authenticate(request, request.app[OPTIONS_KEY])
    if denied is not None:
        return denied
    store = request.app[STORE_KEY]
    try:
        body = _json_object(await request.read())
        v.check_keys(body, ("expires_after", "session"), "")
        seconds = secret_seconds(body.get("expires_after"))
        expires_at = int(store.clock()) + seconds
        session = secret_session(
            body.get("session"), session_id="sess_" + secrets.token_hex(12), expires_at=expires_at
        )
    except ClientEventError as error:
        return _invalid_request(error)
    value, record = store.mint(session.get("model", ""), seconds, session)
    log.info("simulator.client_secret_created", model=record.model, seconds=seconds)
    answer = {"value": value, "expires_at": record.expires_at, "session": session}
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise ClientEventError(
            "invalid_json", "We could not parse the JSON body of your request."
        ) from exc
    return v.obj(value, "body")


async def calls(request: web.Request) -> web.Response:
    try:
        sdp, fragment = await _read_call(request)
    except ClientEventError as error:
        return _invalid_request(error)
    route = _call_route(request, fragment)
    if isinstance(route, web.Response):
        return route
    model, session = route
    try:
        offer = parse_offer(sdp)
    except OfferError as exc:
        return _invalid_request(ClientEventError("invalid_offer", str(exc), "sdp"))
    call_id = "rtc_" + secrets.token_hex(16)
    answer = build_answer(offer, Transport.fresh(), session_id=secrets.randbits(62))
    try:
        request.app[CALLS_KEY].open(call_id, model, session, request.app[OPTIONS_KEY])
    except ClientEventError as error:
        return _invalid_request(error)
    log.info("simulator.call_created", call_id=call_id, model=model)
    return web.Response(
        status=201,
        body=answer.encode(),
        content_type="application/sdp",
        headers={"Location": f"{CALLS_PATH}/{call_id}"},
    )


async def _read_call(request: web.Request) -> tuple[str, dict[str, Any] | None]:
    """The SDP offer, and the session of a multipart call (None for a plain SDP body)."""
    if request.content_type == "application/sdp":
        return (await request.read()).decode("utf-8", errors="replace"), None
    if request.content_type != "multipart/form-data":
        raise ClientEventError(
            "unsupported_content_type",
            f"Unsupported content type {request.content_type!r}; send the SDP offer "
            "as application/sdp, or multipart/form-data with sdp and session.",
        )
    form = await request.post()
    sdp, raw_session = form.get("sdp"), form.get("session")
    if sdp is None:
        raise missing("sdp")
    if raw_session is None:
        return _field_text(sdp), None
    session = _json_object(_field_text(raw_session).encode())
    v.check_keys(session, _SESSION_KEYS, "session")
    if session.get("type") != "realtime":
        if "type" not in session:
            raise missing("session.type")
        raise invalid_value("session.type", session["type"], ("realtime",))
    return _field_text(sdp), session


def _field_text(value: str | bytes | bytearray | web.FileField) -> str:
    if isinstance(value, web.FileField):
        value = value.file.read()
    return value if isinstance(value, str) else bytes(value).decode("utf-8", "replace")


def _call_route(
    request: web.Request, fragment: dict[str, Any] | None
) -> tuple[str, dict[str, Any]] | web.Response:
    """The deployment and starting session of a call (from its secret, or a key plus
    ``?model=`` or the multipart session's model), or a refusal."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token.startswith("ek_"):
        minted = request.app[STORE_KEY].find(token)
        if minted is None:
            log.info("simulator.auth_failed", path=request.path, credential="ephemeral")
            return http_error(401, "401", TOKEN_DENIED)
        return minted.model, merge_session(minted.session, fragment or {})
    denied = authenticate(request, request.app[OPTIONS_KEY])
    if denied is not None:
        return denied
    model = request.query.get("model") or (fragment or {}).get("model")
    if not model or not isinstance(model, str):
        return http_error(400, "BadRequest", "Missing required query parameter: model")
    return model, fragment or {"type": "realtime"}


async def call_control(request: web.Request) -> web.Response:
    """``POST …/calls/{call_id}/{action}``: hang up a call; SIP actions are refused."""
    denied = authenticate(request, request.app[OPTIONS_KEY])
    if denied is not None:
        return denied
    call_id, action = request.match_info["call_id"], request.match_info["action"]
    registry = request.app[CALLS_KEY]
    if action not in CONTROL_ACTIONS:
        return http_error(404, "NotFound", "Resource not found")
    if call_id not in registry.calls:
        return http_error(404, "call_not_found", f"Call '{call_id}' not found.")
    if action != "hangup":
        return _invalid_request(
            ClientEventError(
                "invalid_call_state",
                f"Call '{call_id}' is not an incoming SIP call; it cannot be {action}ed.",
            )
        )
    await registry.hang_up(call_id)
    log.info("simulator.call_hung_up", call_id=call_id)
    return web.Response(status=200)


_SESSION_KEYS = (
    "type", "model", "audio", "include", "instructions", "max_output_tokens",
    "output_modalities", "parallel_tool_calls", "prompt", "reasoning", "tool_choice", "tools",
    "tracing", "truncation",
)  # fmt: skip


def add_routes(app: web.Application) -> None:
    """Serve both endpoints; ``app[STORE_KEY].clock`` can be replaced in tests."""
    app[STORE_KEY] = SecretStore()
    app[CALLS_KEY] = CallRegistry()
    app.router.add_post(SECRETS_PATH, client_secrets)
    app.router.add_post(CALLS_PATH, calls)
    app.router.add_post(CALLS_PATH + "/{call_id}/{action}", call_control)
    app.on_shutdown.append(on_shutdown)
