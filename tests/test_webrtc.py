"""WebRTC clients: client secrets and SDP calls through the relay, against the simulator and
fakes at the HTTP boundary; the pure helpers without sockets."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from aiohttp import web
from openai import AsyncOpenAI
from yarl import URL

from relay.edge.webrtc import WEBRTC
from relay.edge.webrtc.requests import effective_session, parse_secret_request, webrtc_url
from relay.edge.webrtc.secret_book import MintedSecret, SecretBook
from relay.errors import RequestRejected
from relay.live import apply_config
from relay.session.policy import PolicyViolation, build_policy
from relay.session.schema import merge_session
from relay.simulator import SimulatorOptions, create_simulator_app
from relay.simulator.webrtc import (
    STORE_KEY,
    OfferError,
    Transport,
    build_answer,
    parse_offer,
)
from relay.state import STATE
from tests.helpers import ALPHA_KEY, AZURE_KEY, BETA_KEY, ENVIRON, relay_config
from tests.processes import free_port

DEFAULTS = {
    "instructions": "You are the support line of Contoso.",
    "audio": {
        "input": {
            "transcription": {"model": "whisper-1"},
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 200},
        },
        "output": {"voice": "alloy"},
    },
}
RULES = {
    "locked": ["instructions", "audio.input.transcription.model"],
    "allowed_values": {"audio.output.voice": ["alloy", "marin"]},
    "max_values": {"max_output_tokens": 1000},
    "instructions_prefix": "Never give legal advice.",
}
PREFIXED = "Never give legal advice.\n\nYou are the support line of Contoso."
# A browser-like offer: one audio transceiver and the events data channel, bundled.
OFFER = "\r\n".join(
    [
        "v=0",
        "o=- 4004522470 4004522470 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "a=msid-semantic:WMS *",
        "m=audio 44719 UDP/TLS/RTP/SAVPF 111 9 0 8",
        "c=IN IP4 192.0.2.2",
        "a=sendrecv",
        "a=mid:0",
        "a=rtcp-mux",
        "a=rtpmap:111 opus/48000/2",
        "a=fmtp:111 minptime=10;useinbandfec=1",
        "a=rtpmap:9 G722/8000",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000",
        "a=candidate:1 1 udp 2130706431 192.0.2.2 44719 typ host",
        "a=ice-ufrag:SvbL",
        "a=ice-pwd:cxB7GYR3WNZ8wq00GP6qy6",
        "a=fingerprint:sha-256 0E:9A:24:1C:B2:3F:49:04:BC:8B:F6:6E:C4:55:6B:38:21:7D:F9:8B:E4:6B:39:42:F3:01:D9:C6:43:87:8F:7B",
        "a=setup:actpass",
        "m=application 55140 UDP/DTLS/SCTP webrtc-datachannel",
        "c=IN IP4 192.0.2.2",
        "a=mid:1",
        "a=sctp-port:5000",
        "a=ice-ufrag:SvbL",
        "a=ice-pwd:cxB7GYR3WNZ8wq00GP6qy6",
        "a=fingerprint:sha-256 0E:9A:24:1C:B2:3F:49:04:BC:8B:F6:6E:C4:55:6B:38:21:7D:F9:8B:E4:6B:39:42:F3:01:D9:C6:43:87:8F:7B",
        "a=setup:actpass",
        "",
    ]
)
SECRETS = "/openai/v1/realtime/client_secrets"
CALLS = "/openai/v1/realtime/calls"
SDP = {"Content-Type": "application/sdp"}


def policy_config(
    endpoint: str, *, other_protocol: str = "ga", on_violation: str = "rewrite", **sections: Any
):
    """Team alpha on gpt-realtime with defaults and rules; beta on `other`."""
    deployment = {
        "endpoint": endpoint,
        "azure_deployment": "az-gpt-realtime",
        "credential": {"env": "TEST_AZURE_KEY"},
        "session": DEFAULTS,
        "policy": {**RULES, "on_violation": on_violation},
    }
    other = {
        "endpoint": endpoint,
        "credential": {"env": "TEST_AZURE_KEY"},
        "protocol": other_protocol,
    }
    return relay_config(
        endpoint, deployments={"gpt-realtime": deployment, "other": other}, **sections
    )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(http, url, *, key: str | None = ALPHA_KEY, json: Any = None, **kwargs):
    """(status, headers, body: dict or text) of a POST."""
    headers = kwargs.pop("headers", {})
    if key is not None:
        headers = {"Authorization": f"Bearer {key}", **headers}
    if json is not None:
        kwargs["data"] = orjson.dumps(json)
        headers.setdefault("Content-Type", "application/json")
    async with http.post(url, headers=headers, **kwargs) as response:
        text = await response.text()
        body = orjson.loads(text) if response.content_type == "application/json" else text
        return response.status, response.headers, body


async def mint(http, relay, session: dict | None = None, **body) -> dict:
    body.setdefault("session", {"type": "realtime", "model": "gpt-realtime", **(session or {})})
    status, _, minted = await post(http, relay.make_url(SECRETS), json=body)
    assert status == 200, minted
    return minted


@dataclass
class RecordingUpstream:
    """An upstream at the HTTP boundary: records requests; answers like the service, or with
    ``status`` (and ``headers``, ``body``) when told to."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(
            {
                "path": request.path,
                "query": dict(request.query),
                "headers": dict(request.headers),
                "body": body,
            }
        )
        if self.status is not None:
            error = {"error": {"code": str(self.status), "message": "refused"}}
            return web.Response(
                status=self.status,
                body=self.body if self.body is not None else orjson.dumps(error),
                headers={"Content-Type": "application/json", **self.headers},
            )
        if request.path.endswith("/client_secrets"):
            sent = orjson.loads(body)
            minted = {
                "value": "ek_fake0123456789",
                "expires_at": int(time.time()) + sent["expires_after"]["seconds"],
                "session": {**sent["session"], "object": "realtime.session", "id": "sess_1"},
            }
            return web.Response(body=orjson.dumps(minted), content_type="application/json")
        return web.Response(
            status=201,
            text="v=0\r\nanswer\r\n",
            content_type="application/sdp",
            headers={"Location": "/openai/v1/realtime/calls/rtc_fake"},
        )


def multipart_parts(content_type: str, body: bytes) -> dict[str, bytes]:
    """The parts of a multipart/form-data body, by name (a test's own small parser)."""
    boundary = content_type.split("boundary=")[1].encode()
    parts = {}
    for chunk in body.split(b"--" + boundary)[1:-1]:
        head, _, data = chunk[2:-2].partition(b"\r\n\r\n")  # between the CRLFs around it
        name = head.split(b'name="')[1].split(b'"')[0].decode()
        parts[name] = data
    return parts


# --- pure helpers ----------------------------------------------------------------------------


def test_merge_session_merges_tables_and_replaces_an_object_whose_type_changes():
    base = {"a": {"b": 1, "c": 2}, "td": {"type": "server_vad", "silence_duration_ms": 200}}
    patch = {"a": {"c": 3}, "td": {"type": "semantic_vad", "eagerness": "low"}, "x": None}
    assert merge_session(base, patch) == {
        "a": {"b": 1, "c": 3},
        "td": {"type": "semantic_vad", "eagerness": "low"},
        "x": None,
    }
    same_type = merge_session(base, {"td": {"silence_duration_ms": 500}})
    assert same_type["td"] == {"type": "server_vad", "silence_duration_ms": 500}


def alpha_policy(on_violation: str = "rewrite"):
    config = policy_config("http://127.0.0.1:1", on_violation=on_violation)
    return build_policy(config.deployments["gpt-realtime"], config.teams["alpha"])


def test_effective_session_puts_the_defaults_under_the_clients_fragment():
    session = effective_session(
        alpha_policy(),
        {
            "audio": {"output": {"voice": "marin"}},
            "instructions": PREFIXED,
            "max_output_tokens": 500,
        },
    )
    assert session["type"] == "realtime"
    assert session["instructions"] == PREFIXED
    assert session["audio"]["output"]["voice"] == "marin"
    assert session["audio"]["input"]["transcription"] == {"model": "whisper-1"}
    assert session["max_output_tokens"] == 500
    assert effective_session(alpha_policy(), {})["instructions"] == PREFIXED


@pytest.mark.parametrize(
    ("fragment", "param"),
    [
        ({"instructions": "Be a pirate."}, "session.instructions"),
        (
            {"audio": {"input": {"transcription": {"model": "x"}}}},
            "session.audio.input.transcription.model",
        ),
        ({"audio": None}, "session.audio.input.transcription.model"),
        ({"audio": {"output": {"voice": "ash"}}}, "session.audio.output.voice"),
        ({"max_output_tokens": 4096}, "session.max_output_tokens"),
        ({"max_output_tokens": "inf"}, "session.max_output_tokens"),
    ],
)
def test_effective_session_refuses_what_the_websocket_path_refuses(fragment, param):
    with pytest.raises(PolicyViolation) as info:
        effective_session(alpha_policy("refuse"), fragment)
    assert info.value.param == param and info.value.code == "policy_violation"


@pytest.mark.parametrize("locked", [["instructions"], []])
def test_null_instructions_keep_the_teams_prefix(monkeypatch, locked):
    """On a new session (a secret, a call) null instructions mean the service's default
    ones: the team's prefix stays in front of them (it was dropped with the defaults')."""
    monkeypatch.setitem(RULES, "locked", locked)
    session = effective_session(alpha_policy(), {"instructions": None})
    expected = PREFIXED if locked else RULES["instructions_prefix"]
    assert session["instructions"] == expected


def test_effective_session_corrects_what_the_websocket_path_corrects():
    session = effective_session(
        alpha_policy(),
        {
            "instructions": "Be a pirate.",
            "audio": {"input": {"transcription": {"model": "x"}}, "output": {"voice": "ash"}},
            "max_output_tokens": "inf",
        },
    )
    assert session["instructions"] == PREFIXED
    assert session["audio"]["input"]["transcription"] == {"model": "whisper-1"}
    assert session["audio"]["output"]["voice"] == "alloy"
    assert session["max_output_tokens"] == 1000


def test_a_team_that_may_not_update_sessions_may_not_shape_secrets():
    config = policy_config("http://127.0.0.1:1")
    config = relay_config(
        "http://127.0.0.1:1",
        teams={
            "alpha": {
                "keys": [list(config.teams["alpha"].keys)[0]],
                "deployments": ["gpt-realtime"],
                "policy": {"allowed_events": ["input_audio_buffer.append"]},
            }
        },
    )
    policy = build_policy(config.deployments["gpt-realtime"], config.teams["alpha"])
    assert effective_session(policy, {}) == {"type": "realtime"}
    with pytest.raises(PolicyViolation, match="may not change the session"):
        effective_session(policy, {"instructions": "x"})


@pytest.mark.parametrize(
    ("body", "query_model", "code", "param"),
    [
        (b"{", None, "invalid_json", None),
        (b"[]", None, "invalid_type", None),
        (b'{"sesion": {}}', None, "unknown_parameter", "sesion"),
        (b'{"session": 1}', None, "invalid_type", "session"),
        (
            b'{"session": {"type": "translation", "model": "m"}}',
            None,
            "unsupported_session_type",
            "session.type",
        ),
        (
            b'{"session": {"type": "transcription"}}',
            None,
            "missing_deployment",
            "session.audio.input.transcription.model",
        ),
        (b'{"session": {"model": 5}}', None, "invalid_type", "session.model"),
        (b'{"session": {"type": "realtime"}}', None, "missing_deployment", "session.model"),
        (b'{"session": {"model": "a"}}', "b", "deployment_mismatch", "session.model"),
        (
            b'{"session": {"model": "a"}, "expires_after": 600}',
            None,
            "invalid_type",
            "expires_after",
        ),
        (
            b'{"session": {"model": "a"}, "expires_after": {"anchor": "now"}}',
            None,
            "invalid_value",
            "expires_after.anchor",
        ),
        (
            b'{"session": {"model": "a"}, "expires_after": {"seconds": 9}}',
            None,
            "invalid_value",
            "expires_after.seconds",
        ),
        (
            b'{"session": {"model": "a"}, "expires_after": {"seconds": 7201}}',
            None,
            "invalid_value",
            "expires_after.seconds",
        ),
        (
            b'{"session": {"model": "a"}, "expires_after": {"seconds": "60"}}',
            None,
            "invalid_type",
            "expires_after.seconds",
        ),
    ],
)
def test_parse_secret_request_refuses_bad_bodies(body, query_model, code, param):
    with pytest.raises(RequestRejected) as info:
        parse_secret_request(body, query_model, 600)
    assert (info.value.status, info.value.code, info.value.param) == (400, code, param)


def test_parse_secret_request_caps_the_lifetime_and_keeps_the_fragment():
    wanted = parse_secret_request(
        b'{"session": {"type": "realtime", "model": "d", "instructions": "hi"},'
        b' "expires_after": {"anchor": "created_at", "seconds": 7200}}',
        None,
        120,
    )
    assert (wanted.deployment, wanted.session, wanted.seconds) == ("d", {"instructions": "hi"}, 120)
    assert parse_secret_request(b"", "q", 7200).seconds == 600  # the service's default
    assert parse_secret_request(b"{}", "q", 7200).deployment == "q"


def test_secret_book_forgets_expired_and_oldest_secrets():
    now = [1000.0]
    book = SecretBook(max_entries=3, clock=lambda: now[0])
    for i in range(3):
        book.remember(f"ek_{i}", MintedSecret("t", "d", "b", 1010.0 + i))
    assert book.find("ek_0") == MintedSecret("t", "d", "b", 1010.0)
    assert book.find("ek_unknown") is None
    book.remember("ek_3", MintedSecret("t", "d", "b", 2000.0))
    assert len(book) == 3 and book.find("ek_0") is None  # the oldest, at the bound
    now[0] = 1011.5
    book.remember("ek_4", MintedSecret("t", "d", "b", 2000.0))
    assert book.find("ek_1") is None and book.find("ek_2") is not None  # expired, purged


def test_a_team_minting_by_the_thousand_evicts_its_own_secrets_not_anothers():
    """The book is shared by every team: full, it forgets the oldest secret of the team
    holding the most. Before, one team's 100,001 mints evicted another team's live secret,
    which was then refused as unknown (401)."""
    book = SecretBook(max_entries=100, clock=lambda: 1000.0)
    book.remember("ek_beta", MintedSecret("beta", "d", "b", 2000.0))
    for i in range(1000):
        book.remember(f"ek_alpha_{i}", MintedSecret("alpha", "d", "b", 2000.0))
    assert len(book) == 100
    assert book.find("ek_beta") is not None
    assert book.find("ek_alpha_999") is not None and book.find("ek_alpha_0") is None


def test_webrtc_url_is_https_on_the_backends_host():
    ws = URL("wss://res.openai.azure.com/openai/v1/realtime?model=dep")
    assert str(webrtc_url(ws, "calls", {"model": "dep"})) == (
        "https://res.openai.azure.com/openai/v1/realtime/calls?model=dep"
    )
    plain = URL("ws://127.0.0.1:9/prefix/openai/v1/realtime?model=dep")
    assert str(webrtc_url(plain, "client_secrets", {})) == (
        "http://127.0.0.1:9/prefix/openai/v1/realtime/client_secrets"
    )


def test_the_answer_mirrors_the_offer():
    audio = OFFER[OFFER.index("m=audio") : OFFER.index("m=application")]
    video = audio.replace("m=audio 44719", "m=video 9").replace("a=mid:0", "a=mid:2")
    offer = parse_offer(OFFER.replace("m=application", video + "m=application"))
    transport = Transport.fresh()
    answer = build_answer(offer, transport, session_id=7)
    lines = answer.split("\r\n")
    assert lines[0] == "v=0" and answer.endswith("\r\n")
    assert [line for line in lines if line.startswith("m=")] == [
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "m=video 0 UDP/TLS/RTP/SAVPF 111 9 0 8",  # rejected
        "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
    ]
    assert [line for line in lines if line.startswith("a=mid:")] == [
        "a=mid:0",
        "a=mid:2",
        "a=mid:1",
    ]
    assert "a=group:BUNDLE 0 1" in lines
    assert lines.count("a=setup:passive") == 2
    assert "a=fmtp:111 minptime=10;useinbandfec=1" in lines
    assert f"a=ice-ufrag:{transport.ufrag}" in lines and "a=ice-ufrag:SvbL" not in lines
    assert f"a=fingerprint:sha-256 {transport.fingerprint}" in lines
    assert "a=candidate:1 1 udp 2130706431 127.0.0.1 3478 typ host" in lines
    assert len(transport.fingerprint.split(":")) == 32


@pytest.mark.parametrize(
    ("sdp", "message"),
    [
        ("", "start with 'v=0'"),
        ("hello", "start with 'v=0'"),
        ("v=0\r\ns=-\r\n", "no media sections"),
        ("v=0\r\nm=audio\r\n", "Malformed m= line"),
        ("v=0\r\nbad line\r\nm=audio 9 X 0\r\n", "Malformed SDP line"),
        (OFFER.replace("a=ice-ufrag:SvbL\r\n", ""), "a=ice-ufrag"),
        (OFFER.replace("a=fingerprint", "a=x-fingerprint"), "a=fingerprint"),
    ],
)
def test_bad_offers_are_refused(sdp, message):
    with pytest.raises(OfferError, match=message):
        parse_offer(sdp)


def test_an_audio_offer_without_a_known_codec_is_answered_inactive():
    offer = parse_offer(OFFER.replace(" 111 9 0 8", " 9").replace("a=rtpmap:111", "a=x:111"))
    lines = build_answer(offer, Transport.fresh(), session_id=1).split("\r\n")
    assert "m=audio 0 UDP/TLS/RTP/SAVPF 9" in lines


# --- end to end: relay + simulator -----------------------------------------------------------


async def test_a_team_mints_a_secret_with_its_defaults_applied(simulator, start_relay, http):
    relay = await start_relay(policy_config(simulator.url))
    minted = await mint(http, relay, {"audio": {"output": {"voice": "marin"}}})
    assert minted["value"].startswith("ek_")
    assert time.time() + 590 < minted["expires_at"] <= time.time() + 600
    session = minted["session"]
    assert session["type"] == "realtime" and session["object"] == "realtime.session"
    assert session["model"] == "gpt-realtime"  # the relay's name, not the Azure deployment's
    assert session["instructions"] == PREFIXED
    assert session["audio"]["input"]["transcription"] == {"model": "whisper-1"}
    assert session["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 200
    assert session["audio"]["output"]["voice"] == "marin"


async def test_the_openai_sdk_mints_through_the_relay(simulator, start_relay):
    relay = await start_relay(policy_config(simulator.url))
    for base in ("/openai/v1", "/v1"):
        client = AsyncOpenAI(base_url=str(relay.make_url(base)), api_key=ALPHA_KEY, max_retries=0)
        async with client:
            minted = await client.realtime.client_secrets.create(
                session={"type": "realtime", "model": "gpt-realtime"},
                expires_after={"anchor": "created_at", "seconds": 60},
            )
        assert minted.value.startswith("ek_") and minted.expires_at <= time.time() + 60
        assert minted.session.instructions == PREFIXED


async def test_a_locked_field_is_refused_with_the_policy_error(simulator, start_relay, http):
    relay = await start_relay(policy_config(simulator.url, on_violation="refuse"))
    session = {"type": "realtime", "model": "gpt-realtime", "instructions": "Be a pirate."}
    status, _, body = await post(http, relay.make_url(SECRETS), json={"session": session})
    assert status == 400
    assert body == {
        "error": {
            "type": "invalid_request_error",
            "code": "policy_violation",
            "message": "instructions is locked by the relay's policy and cannot be changed.",
            "param": "session.instructions",
        }
    }
    assert len(relay.app[WEBRTC].book.book) == 0


async def test_the_lifetime_is_capped(simulator, start_relay, http):
    relay = await start_relay(policy_config(simulator.url, webrtc={"max_secret_seconds": 60}))
    minted = await mint(http, relay, expires_after={"anchor": "created_at", "seconds": 3600})
    assert minted["expires_at"] <= time.time() + 60


async def test_an_offer_gets_an_answer_with_a_relay_key(simulator, start_relay, http):
    relay = await start_relay(policy_config(simulator.url))
    url = relay.make_url(CALLS).with_query(model="gpt-realtime")
    status, headers, answer = await post(
        http, url, key=None, data=OFFER, headers={"api-key": ALPHA_KEY, **SDP}
    )
    assert status == 201, answer
    assert headers["Content-Type"] == "application/sdp"
    assert headers["Location"].startswith("/openai/v1/realtime/calls/rtc_")
    assert answer.startswith("v=0\r\n") and "a=setup:passive" in answer
    assert [line for line in answer.split("\r\n") if line.startswith("m=")] == [
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
    ]


async def test_an_offer_gets_an_answer_with_a_minted_secret(simulator, start_relay, http):
    relay = await start_relay(policy_config(simulator.url))
    secret = (await mint(http, relay))["value"]
    for path in (CALLS, "/v1/realtime/calls"):
        url = relay.make_url(path).with_query(webrtcfilter="on")
        status, headers, answer = await post(http, url, key=secret, data=OFFER, headers=SDP)
        assert status == 201, answer
        assert headers["Location"].startswith("/openai/v1/realtime/calls/rtc_")
        assert "a=ice-lite" in answer


async def test_an_expired_secret_is_refused(simulator, start_relay, http):
    relay = await start_relay(policy_config(simulator.url))
    secret = (await mint(http, relay, expires_after={"seconds": 60}))["value"]
    relay.app[WEBRTC].book.book.clock = lambda: time.time() + 61
    status, _, body = await post(http, relay.make_url(CALLS), key=secret, data=OFFER, headers=SDP)
    assert (status, body["error"]["code"]) == (401, "client_secret_expired")
    assert body["error"]["message"] == "The client secret has expired; mint a new one."


async def test_a_secret_whose_team_a_reload_removed_is_refused(simulator, start_relay, http):
    config = policy_config(simulator.url)
    relay = await start_relay(config)
    secret = (await mint(http, relay))["value"]
    without_alpha = dataclasses.replace(config, teams={"beta": config.teams["beta"]})
    await apply_config(relay.app[STATE], without_alpha, ENVIRON)
    status, _, body = await post(http, relay.make_url(CALLS), key=secret, data=OFFER, headers=SDP)
    assert (status, body["error"]["code"]) == (401, "client_secret_revoked")


@pytest.mark.parametrize(
    ("path", "key", "query", "kwargs", "expected"),
    [
        (CALLS, None, {"model": "gpt-realtime"}, {}, (401, "missing_api_key")),
        (CALLS, "rk-wrong", {"model": "gpt-realtime"}, {}, (401, "invalid_api_key")),
        (CALLS, "ek_not_minted_here", {}, {}, (401, "invalid_api_key")),
        (CALLS, ALPHA_KEY, {}, {}, (400, "missing_deployment")),
        (CALLS, ALPHA_KEY, {"model": "nope"}, {}, (404, "deployment_not_found")),
        (CALLS, BETA_KEY, {"model": "gpt-realtime"}, {}, (403, "deployment_not_allowed")),
        (CALLS, BETA_KEY, {"model": "other"}, {}, (400, "protocol_mismatch")),
        (
            CALLS,
            ALPHA_KEY,
            {"model": "gpt-realtime"},
            {"headers": {"Content-Type": "text/plain"}},
            (400, "unsupported_content_type"),
        ),
        (CALLS, ALPHA_KEY, {"model": "gpt-realtime"}, {"data": " "}, (400, "missing_offer")),
        (CALLS, ALPHA_KEY, {"model": "gpt-realtime"}, {"data": "v=0\r\n"}, (400, "invalid_offer")),
        (
            CALLS,
            ALPHA_KEY,
            {"model": "gpt-realtime"},
            {"data": "x" * 300_000},
            (413, "request_too_large"),
        ),
        (SECRETS, None, {}, {"json": {}}, (401, "missing_api_key")),
        (SECRETS, "rk-wrong", {}, {"json": {}}, (401, "invalid_api_key")),
        (
            SECRETS,
            ALPHA_KEY,
            {},
            {"json": {"session": {"model": "nope"}}},
            (404, "deployment_not_found"),
        ),
        (
            SECRETS,
            ALPHA_KEY,
            {},
            {
                "json": {
                    "session": {"model": "gpt-realtime", "audio": {"output": {"voice": "shrek"}}}
                }
            },
            (400, "policy_violation"),
        ),
    ],
)
async def test_refusals_are_clear(simulator, start_relay, http, path, key, query, kwargs, expected):
    config = policy_config(
        simulator.url,
        other_protocol="preview",
        on_violation="refuse",
        limits={"auth_failures_allowed": 100},
    )
    relay = await start_relay(config)
    kwargs = {"data": OFFER, "headers": SDP, **kwargs} if path == CALLS else kwargs
    status, headers, body = await post(
        http, relay.make_url(path).with_query(query), key=key, **kwargs
    )
    assert (status, body["error"]["code"]) == expected, body
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    assert headers["Content-Type"] == "application/json"


async def test_secrets_are_for_calls_only_and_for_their_deployment(simulator, start_relay, http):
    relay = await start_relay(policy_config(simulator.url))
    secret = (await mint(http, relay))["value"]
    status, _, body = await post(http, relay.make_url(SECRETS), key=secret, json={})
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    url = relay.make_url(CALLS).with_query(model="other")
    status, _, body = await post(http, url, key=secret, data=OFFER, headers=SDP)
    assert (status, body["error"]["code"], body["error"]["param"]) == (
        400,
        "deployment_mismatch",
        "model",
    )


async def test_a_team_over_its_secret_rate_gets_429(simulator, start_relay, http):
    config = policy_config(simulator.url)
    alpha = config.teams["alpha"]
    config = policy_config(
        simulator.url,
        teams={
            "alpha": {
                "keys": list(alpha.keys),
                "deployments": ["gpt-realtime"],
                "limits": {"max_client_secrets_per_minute": 2},
            }
        },
    )
    relay = await start_relay(config)
    await mint(http, relay)
    await mint(http, relay)
    body = {"session": {"model": "gpt-realtime"}}
    status, headers, refused = await post(http, relay.make_url(SECRETS), json=body)
    assert (status, refused["error"]["code"]) == (429, "team_secret_rate_limit")
    assert 1 <= int(headers["Retry-After"]) <= 30


async def test_browsers_get_cors_headers_and_the_location(simulator, start_relay, http):
    config = policy_config(simulator.url, server={"allowed_origins": ["https://app.example.com"]})
    relay = await start_relay(config)
    url = relay.make_url(CALLS)
    origin = {"Origin": "https://app.example.com"}
    async with http.options(
        url, headers={**origin, "Access-Control-Request-Method": "POST"}
    ) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
        assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    secret = (await mint(http, relay))["value"]
    status, headers, _ = await post(http, url, key=secret, data=OFFER, headers={**SDP, **origin})
    assert status == 201
    assert headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert headers["Access-Control-Expose-Headers"] == "Location"
    evil = {"Origin": "https://evil.example.com"}
    async with http.options(url, headers=evil) as response:
        assert response.status == 403
    status, headers, body = await post(http, url, key=secret, data=OFFER, headers={**SDP, **evil})
    assert (status, body["error"]["code"]) == (403, "origin_not_allowed")
    assert "Access-Control-Allow-Origin" not in headers


async def test_a_draining_relay_refuses_new_secrets_and_calls(simulator, start_relay, http):
    relay = await start_relay(policy_config(simulator.url))
    relay.app[STATE].draining = True
    status, _, body = await post(http, relay.make_url(SECRETS), json={})
    assert (status, body["error"]["code"]) == (503, "relay_draining")


# --- the upstream at the HTTP boundary -------------------------------------------------------


async def test_upstream_requests_carry_the_relays_credential_and_azure_names(
    start_fake, start_relay, http
):
    fake = RecordingUpstream()
    server = await start_fake(fake.app())
    relay = await start_relay(policy_config(f"http://127.0.0.1:{server.port}"))
    minted = await mint(http, relay, expires_after={"seconds": 120})
    assert minted["session"]["model"] == "gpt-realtime"
    sent = fake.requests[0]
    assert sent["path"] == SECRETS and sent["query"] == {}
    assert sent["headers"]["api-key"] == AZURE_KEY and "Authorization" not in sent["headers"]
    assert sent["headers"]["x-ms-client-request-id"].startswith("rq_")
    outbound = orjson.loads(sent["body"])
    assert outbound["expires_after"] == {"anchor": "created_at", "seconds": 120}
    assert outbound["session"]["model"] == "az-gpt-realtime"
    assert outbound["session"]["instructions"] == PREFIXED

    url = relay.make_url(CALLS).with_query(model="gpt-realtime", webrtcfilter="on", other="x")
    status, headers, answer = await post(http, url, data=OFFER, headers=SDP)
    assert (status, headers["Location"], answer) == (
        201,
        "/openai/v1/realtime/calls/rtc_fake",
        "v=0\r\nanswer\r\n",
    )
    sent = fake.requests[1]
    assert sent["path"] == CALLS and sent["query"] == {
        "model": "az-gpt-realtime",
        "webrtcfilter": "on",
    }
    # A relay-key call carries the team's session: multipart, as openai-python posts it.
    assert sent["headers"]["api-key"] == AZURE_KEY
    parts = multipart_parts(sent["headers"]["Content-Type"], sent["body"])
    assert parts["sdp"] == OFFER.encode()
    session = orjson.loads(parts["session"])
    assert session["model"] == "az-gpt-realtime" and session["instructions"] == PREFIXED

    await post(http, relay.make_url(CALLS), key=minted["value"], data=OFFER, headers=SDP)
    sent = fake.requests[2]
    assert sent["query"] == {} and "api-key" not in sent["headers"]
    assert sent["headers"]["Authorization"] == f"Bearer {minted['value']}"


@pytest.mark.parametrize(
    ("path", "upstream", "headers", "expected", "retry_after"),
    [
        (SECRETS, 401, {}, (502, "upstream_auth_failed"), None),
        (SECRETS, 403, {}, (502, "upstream_auth_failed"), None),
        (SECRETS, 429, {"Retry-After": "7"}, (429, "upstream_rate_limited"), "7"),
        (SECRETS, 500, {}, (502, "upstream_error"), None),
        (SECRETS, 200, {}, (502, "upstream_invalid_response"), None),
        (CALLS, 401, {}, (502, "upstream_auth_failed"), None),
        (CALLS, 429, {"Retry-After": "2.5"}, (429, "upstream_rate_limited"), "3"),
        (CALLS, 503, {}, (502, "upstream_error"), None),
    ],
)
async def test_upstream_failures_give_clear_errors(
    start_fake, start_relay, http, path, upstream, headers, expected, retry_after
):
    fake = RecordingUpstream(
        status=upstream, headers=headers, body=b"not json" if upstream == 200 else None
    )
    server = await start_fake(fake.app())
    relay = await start_relay(policy_config(f"http://127.0.0.1:{server.port}"))
    if path == SECRETS:
        status, response_headers, body = await post(
            http, relay.make_url(path), json={"session": {"model": "gpt-realtime"}}
        )
    else:
        url = relay.make_url(path).with_query(model="gpt-realtime")
        status, response_headers, body = await post(http, url, data=OFFER, headers=SDP)
    assert (status, body["error"]["code"]) == expected, body
    assert response_headers.get("Retry-After") == retry_after
    assert len(fake.requests) == 1


async def test_the_upstreams_400_reaches_the_caller(start_fake, start_relay, http):
    error = {
        "error": {
            "type": "invalid_request_error",
            "code": "invalid_value",
            "message": "Invalid value: 'x'.",
            "param": "session.audio.output.voice",
        }
    }
    fake = RecordingUpstream(status=400, body=orjson.dumps(error))
    server = await start_fake(fake.app())
    relay = await start_relay(policy_config(f"http://127.0.0.1:{server.port}"))
    status, _, body = await post(
        http, relay.make_url(SECRETS), json={"session": {"model": "gpt-realtime"}}
    )
    assert (status, body) == (400, error)
    samples = relay.app[STATE].metrics.registry.get_sample_value
    labels = {
        "team": "alpha",
        "endpoint": "client_secrets",
        "status": "400",
        "code": "upstream_rejected",
    }
    assert samples("relay_webrtc_refusals_total", labels) == 1


async def test_the_upstreams_400_quoting_the_key_reaches_the_caller_without_it(
    start_fake, start_relay, http
):
    """Only the message was cleaned: a code or a parameter quoting the relay's Azure key
    passed it to the caller."""
    error = {
        "type": "invalid_request_error",
        "code": AZURE_KEY,
        "message": f"bad key {AZURE_KEY}",
        "param": f"session.{AZURE_KEY}",
    }
    fake = RecordingUpstream(status=400, body=orjson.dumps({"error": error}))
    server = await start_fake(fake.app())
    relay = await start_relay(policy_config(f"http://127.0.0.1:{server.port}"))
    status, _, body = await post(
        http, relay.make_url(SECRETS), json={"session": {"model": "gpt-realtime"}}
    )
    assert status == 400 and AZURE_KEY not in orjson.dumps(body).decode()
    assert body["error"]["code"] == "invalid_request"
    assert body["error"]["param"] == "session.[REDACTED]"


async def test_a_secret_the_upstream_no_longer_accepts_is_401(start_fake, start_relay, http):
    fake = RecordingUpstream()
    server = await start_fake(fake.app())
    relay = await start_relay(policy_config(f"http://127.0.0.1:{server.port}"))
    secret = (await mint(http, relay))["value"]
    fake.status = 401
    status, _, body = await post(http, relay.make_url(CALLS), key=secret, data=OFFER, headers=SDP)
    assert (status, body["error"]["code"]) == (401, "client_secret_rejected")


async def test_an_unreachable_upstream_is_502(start_relay, http):
    relay = await start_relay(policy_config(f"http://127.0.0.1:{free_port()}"))
    status, _, body = await post(
        http, relay.make_url(SECRETS), json={"session": {"model": "gpt-realtime"}}
    )
    assert (status, body["error"]["code"], body["error"]["type"]) == (
        502,
        "upstream_unavailable",
        "server_error",
    )


async def test_minting_fails_over_and_calls_go_to_the_minting_backend(
    simulator, start_fake, start_relay, http
):
    fake = RecordingUpstream(status=503)
    server = await start_fake(fake.app())
    credential = {"env": "TEST_AZURE_KEY"}
    backends = [
        {
            "name": "broken",
            "endpoint": f"http://127.0.0.1:{server.port}",
            "credential": credential,
            "priority": 1,
        },
        {"name": "good", "endpoint": simulator.url, "credential": credential, "priority": 2},
    ]
    config = relay_config(simulator.url, deployments={"gpt-realtime": {"backends": backends}})
    relay = await start_relay(config)
    secret = (await mint(http, relay))["value"]
    assert len(fake.requests) == 1
    status, _, _ = await post(http, relay.make_url(CALLS), key=secret, data=OFFER, headers=SDP)
    assert status == 201 and len(fake.requests) == 1
    samples = relay.app[STATE].metrics.registry.get_sample_value
    labels = {"deployment": "gpt-realtime", "backend": "broken", "reason": "upstream_error"}
    assert samples("relay_upstream_connect_failures_total", labels) == 1


# --- observability ---------------------------------------------------------------------------


async def test_metrics_count_secrets_calls_and_refusals(simulator, start_relay, http):
    relay = await start_relay(policy_config(simulator.url))
    secret = (await mint(http, relay))["value"]
    await post(http, relay.make_url(CALLS), key=secret, data=OFFER, headers=SDP)
    url = relay.make_url(CALLS).with_query(model="gpt-realtime")
    await post(http, url, data=OFFER, headers=SDP)
    await post(http, url, key="rk-wrong", data=OFFER, headers=SDP)
    samples = relay.app[STATE].metrics.registry.get_sample_value
    td = {"team": "alpha", "deployment": "gpt-realtime"}
    assert samples("relay_client_secrets_total", td) == 1
    assert samples("relay_webrtc_calls_total", {**td, "auth": "client_secret"}) == 1
    assert samples("relay_webrtc_calls_total", {**td, "auth": "relay_key"}) == 1
    latency = {"deployment": "gpt-realtime", "endpoint": "calls"}
    assert samples("relay_webrtc_upstream_seconds_count", latency) == 2
    latency = {"deployment": "gpt-realtime", "endpoint": "client_secrets"}
    assert samples("relay_webrtc_upstream_seconds_count", latency) == 1
    refused = {"team": "unknown", "endpoint": "calls", "status": "401", "code": "invalid_api_key"}
    assert samples("relay_webrtc_refusals_total", refused) == 1


async def test_no_credential_or_secret_appears_in_responses_or_logs(
    simulator, start_fake, start_relay, http, caplog
):
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    relay = await start_relay(policy_config(simulator.url))
    fake = RecordingUpstream(status=401)
    failing = await start_relay(
        policy_config(f"http://127.0.0.1:{(await start_fake(fake.app())).port}")
    )

    async def record(*args, **kwargs):
        status, headers, body = await post(http, *args, **kwargs)
        seen.append(f"{status} {dict(headers)} {body}")
        return body

    with structlog.testing.capture_logs() as logs:
        minted = await record(relay.make_url(SECRETS), json={"session": {"model": "gpt-realtime"}})
        secret = minted["value"]
        await record(relay.make_url(CALLS), key=secret, data=OFFER, headers=SDP)
        await record(
            relay.make_url(CALLS).with_query(model="gpt-realtime"), data=OFFER, headers=SDP
        )
        await record(relay.make_url(CALLS), key="ek_wrong_secret_value", data=OFFER, headers=SDP)
        await record(failing.make_url(SECRETS), json={"session": {"model": "gpt-realtime"}})
        await record(
            failing.make_url(CALLS).with_query(model="gpt-realtime"), data=OFFER, headers=SDP
        )
    responses, logged = "\n".join(seen), "\n".join([repr(logs), caplog.text])
    assert (
        "client_secret_minted" in logged and "call_placed" in logged and "webrtc_refused" in logged
    )
    assert AZURE_KEY not in responses
    for value in (AZURE_KEY, ALPHA_KEY, secret, "ek_wrong_secret_value"):
        assert value not in logged, f"a secret was logged: {value[:6]}…"


# --- the simulator on its own ----------------------------------------------------------------


async def test_the_simulator_checks_credentials_bodies_and_expiry(aiohttp_server, http):
    app = create_simulator_app(SimulatorOptions(api_keys=frozenset({AZURE_KEY}), speed=0))
    server = await aiohttp_server(app)
    secrets_url, calls_url = server.make_url(SECRETS), server.make_url(CALLS)
    good = {
        "session": {"type": "realtime", "model": "dep", "audio": {"output": {"voice": "marin"}}}
    }
    status, _, minted = await post(
        http, secrets_url, key=None, headers={"api-key": AZURE_KEY}, json=good
    )
    assert status == 200 and minted["value"].startswith("ek_")
    assert (
        minted["session"]["model"] == "dep"
        and minted["session"]["audio"]["output"]["voice"] == "marin"
    )
    assert minted["session"]["id"].startswith("sess_")

    for key, body, expected in [
        ("wrong", good, (401, "401")),
        (minted["value"], good, (401, "401")),  # a secret does not mint secrets
        (AZURE_KEY, {"session": {"type": "realtime"}}, (400, "missing_required_parameter")),
        (AZURE_KEY, {"session": {"model": "dep"}}, (400, "missing_required_parameter")),
        (
            AZURE_KEY,
            {"session": {**good["session"], "audio": {"output": {"voice": "shrek"}}}},
            (400, "invalid_value"),
        ),
        (AZURE_KEY, {**good, "expires_after": {"seconds": 5}}, (400, "invalid_value")),
        (AZURE_KEY, {**good, "extra": 1}, (400, "unknown_parameter")),
    ]:
        status, _, body = await post(http, secrets_url, key=key, json=body)
        assert (status, body["error"]["code"]) == expected, body

    status, headers, _ = await post(http, calls_url, key=minted["value"], data=OFFER, headers=SDP)
    assert status == 201 and headers["Location"].startswith("/openai/v1/realtime/calls/rtc_")
    for key, query, data, content_type, expected in [
        (AZURE_KEY, {}, OFFER, "application/sdp", 400),  # a key needs ?model=
        (AZURE_KEY, {"model": "dep"}, OFFER, "application/json", 400),
        (AZURE_KEY, {"model": "dep"}, "v=0\r\n", "application/sdp", 400),
        ("ek_unknown", {}, OFFER, "application/sdp", 401),
    ]:
        url = calls_url.with_query(query)
        status, _, _ = await post(
            http, url, key=key, data=data, headers={"Content-Type": content_type}
        )
        assert status == expected
    app[STORE_KEY].clock = lambda: time.time() + minted["expires_at"]
    status, _, _ = await post(http, calls_url, key=minted["value"], data=OFFER, headers=SDP)
    assert status == 401


# --- a real WebRTC stack ---------------------------------------------------------------------


async def test_a_real_offer_from_aiortc_gets_an_answer_it_accepts(simulator, start_relay, http):
    import aiortc  # a test dependency (pyproject [test])

    relay = await start_relay(policy_config(simulator.url))
    secret = (await mint(http, relay))["value"]
    pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=[]))
    try:
        pc.createDataChannel("oai-events")
        pc.addTransceiver("audio", direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription.sdp
        status, headers, answer = await post(
            http, relay.make_url(CALLS), key=secret, data=offer, headers=SDP
        )
        assert status == 201, answer
        await pc.setRemoteDescription(aiortc.RTCSessionDescription(sdp=answer, type="answer"))
        assert pc.signalingState == "stable"
        kinds = [t.kind for t in pc.getTransceivers()]
        assert kinds == ["audio"] and pc.sctp is not None  # audio and the data channel
    finally:
        await pc.close()
