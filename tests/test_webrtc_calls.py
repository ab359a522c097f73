"""WebRTC calls after the SDP answer, and transcription sessions: the relay's observer, a
client's sideband socket and call control through the openai SDK, multipart calls, and
transcription sessions, against the simulator over real sockets."""

from __future__ import annotations

from typing import Any

import aiohttp
import aiortc
import orjson
import pytest
from openai import AsyncOpenAI, BadRequestError, NotFoundError

from relay.edge.auth import hash_key
from relay.edge.webrtc import WEBRTC
from relay.edge.webrtc.call_book import PlacedCall, ProcessCalls, call_id_from_location
from relay.edge.webrtc.requests import multipart_call, upstream_session
from relay.session.policy import build_policy
from relay.session.reported import judge_reported
from relay.simulator.calls import CALLS_KEY
from relay.state import STATE
from tests.helpers import (
    ALPHA_KEY,
    AZURE_KEY,
    BETA_KEY,
    UPGRADE,
    FakeUpstream,
    b64,
    relay_config,
    tone_pcm,
)
from tests.test_webrtc import (
    CALLS,
    DEFAULTS,
    OFFER,
    PREFIXED,
    RULES,
    SDP,
    SECRETS,
    mint,
    multipart_parts,
    post,
)


def calls_config(
    endpoint: str,
    *,
    rules: dict | None = None,
    observe: bool = True,
    alpha_limits: dict | None = None,
    priced: bool = False,
):
    """Alpha on an observed gpt-realtime and a transcription deployment; beta on `other`,
    and on gpt-realtime too (so its key can try alpha's calls)."""
    transcribe = {
        "endpoint": endpoint,
        "credential": {"env": "TEST_AZURE_KEY"},
        "kind": "transcription",
        "azure_deployment": "gpt-4o-transcribe",
        "session": {
            "audio": {
                "input": {
                    "transcription": {"language": "en"},
                    "noise_reduction": {"type": "near_field"},
                    "turn_detection": None,
                }
            }
        },
        "policy": {
            "locked": ["audio.input.noise_reduction"],
            "allowed_values": {"audio.input.transcription.language": ["en", "fr"]},
        },
    }
    deployments = {
        "gpt-realtime": {
            "endpoint": endpoint,
            "azure_deployment": "az-gpt-realtime",
            "credential": {"env": "TEST_AZURE_KEY"},
            "session": DEFAULTS,
            "policy": {**RULES, **(rules or {})},
            "webrtc": {"observe": observe},
        },
        "other": {"endpoint": endpoint, "credential": {"env": "TEST_AZURE_KEY"}},
        "gpt-4o-transcribe": transcribe,
    }
    teams = {
        "alpha": {
            "keys": [hash_key(ALPHA_KEY)],
            "deployments": ["gpt-realtime", "gpt-4o-transcribe"],
            "limits": alpha_limits or {},
        },
        "beta": {"keys": [hash_key(BETA_KEY)], "deployments": ["other", "gpt-realtime"]},
    }
    if priced:
        for deployment in deployments.values():
            deployment["prices"] = {"input_text": 4.0, "output_audio": 64.0}
    return relay_config(endpoint, deployments=deployments, teams=teams)


_CLIENTS: list[AsyncOpenAI] = []


def sdk(relay, key: str = ALPHA_KEY, base: str = "/openai/v1") -> AsyncOpenAI:
    """An openai client on the relay, closed when the test ends."""
    client = AsyncOpenAI(base_url=str(relay.make_url(base)), api_key=key, max_retries=0)
    _CLIENTS.append(client)
    return client


@pytest.fixture(autouse=True)
async def _close_clients():
    yield
    while _CLIENTS:
        await _CLIENTS.pop().close()


async def aiortc_offer() -> tuple[Any, str]:
    pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=[]))
    pc.createDataChannel("oai-events")
    pc.addTransceiver("audio", direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def place_call(http, relay, offer: str = OFFER, key: str = ALPHA_KEY) -> str:
    url = relay.make_url(CALLS).with_query(model="gpt-realtime")
    status, headers, answer = await post(http, url, key=key, data=offer, headers=SDP)
    assert status == 201, answer
    call_id = call_id_from_location(headers["Location"])
    assert call_id is not None
    return call_id


def sample(relay, name: str, labels: dict) -> float:
    value = relay.app[STATE].metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def next_of(connection, kind: str) -> Any:
    async for event in connection:
        if event.type == kind:
            return event
    raise AssertionError(f"the socket closed before {kind}")


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


# --- pure helpers ----------------------------------------------------------------------------


def test_the_call_id_is_the_last_segment_of_the_location():
    assert call_id_from_location("/openai/v1/realtime/calls/rtc_1") == "rtc_1"
    assert call_id_from_location("https://x/openai/v1/realtime/calls/rtc_2/") == "rtc_2"
    assert call_id_from_location("/openai/v1/realtime/calls") is None
    assert call_id_from_location(None) is None


async def test_the_process_call_book_forgets_calls_after_two_hours():
    now = [0.0]
    book = ProcessCalls(clock=lambda: now[0])

    await book.remember("rtc_1", PlacedCall("alpha", "gpt-realtime", "default", True))
    assert (await book.find("rtc_1")).team == "alpha"
    now[0] = 2 * 3600 + 1
    assert await book.find("rtc_1") is None


async def test_a_team_placing_calls_by_the_thousand_evicts_its_own_not_anothers():
    book = ProcessCalls(max_entries=100, clock=lambda: 0.0)
    await book.remember("rtc_beta", PlacedCall("beta", "gpt-realtime", "default", True))
    for i in range(1000):
        await book.remember(f"rtc_{i}", PlacedCall("alpha", "gpt-realtime", "default", True))
    assert (await book.find("rtc_beta")).team == "beta"
    assert await book.find("rtc_0") is None and await book.find("rtc_999") is not None


def test_multipart_call_and_upstream_session():
    body = multipart_call(b"v=0\r\n", {"type": "realtime"}, "b0undary")
    assert multipart_parts("multipart/form-data; boundary=b0undary", body) == {
        "sdp": b"v=0\r\n",
        "session": b'{"type":"realtime"}',
    }
    assert upstream_session({"type": "realtime"}, "az") == {"type": "realtime", "model": "az"}
    transcription = upstream_session({"type": "transcription"}, "az-transcribe")
    assert transcription["audio"]["input"]["transcription"]["model"] == "az-transcribe"


def test_a_reported_session_that_breaks_the_policy_is_restored():
    config = calls_config("http://127.0.0.1:1")
    policy = build_policy(config.deployments["gpt-realtime"], config.teams["alpha"])
    in_force = {
        "type": "realtime",
        "instructions": PREFIXED,
        "audio": {"output": {"voice": "alloy"}},
        "max_output_tokens": "inf",
    }
    same = judge_reported(policy, in_force, {**in_force, "tools": []})
    assert same.update is None and same.violation is None and same.in_force["tools"] == []
    echo = {**in_force, "audio": {"output": {"voice": "echo"}}}
    verdict = judge_reported(policy, in_force, echo)
    assert verdict.violation is not None and verdict.violation.param == "session.audio.output.voice"
    assert verdict.in_force == in_force
    assert orjson.loads(verdict.update)["session"] == {
        "type": "realtime",
        "audio": {"output": {"voice": "alloy"}},
    }
    marin = judge_reported(policy, in_force, {**in_force, "audio": {"output": {"voice": "marin"}}})
    assert marin.update is None and marin.in_force["audio"]["output"]["voice"] == "marin"
    pirate = judge_reported(policy, in_force, {**in_force, "instructions": "Be a pirate."})
    assert pirate.violation.param == "session.instructions"
    assert orjson.loads(pirate.update)["session"]["instructions"] == PREFIXED


@pytest.mark.parametrize("in_force_input", [{"transcription": None}, {}])
def test_a_locked_field_under_a_table_off_in_force_is_restored_by_turning_the_table_off(
    in_force_input,
):
    """The device turns on transcription with a model of its choosing, where none was in
    force: the restore turns transcription off again. It sent `{"model": null}` under it,
    which the service refuses, so the device's model stayed (or none, where the table was
    absent)."""
    config = calls_config("http://127.0.0.1:1")
    policy = build_policy(config.deployments["gpt-realtime"], config.teams["alpha"])
    in_force = {
        "type": "realtime",
        "instructions": PREFIXED,
        "audio": {"input": in_force_input, "output": {"voice": "alloy"}},
    }
    chosen = {"transcription": {"model": "gpt-4o-transcribe"}}
    reported = {**in_force, "audio": {"input": chosen, "output": {"voice": "alloy"}}}
    verdict = judge_reported(policy, in_force, reported)
    assert verdict.violation is not None
    assert orjson.loads(verdict.update)["session"] == {
        "type": "realtime",
        "audio": {"input": {"transcription": None}},
    }


# --- the relay observes the calls it places --------------------------------------------------


async def test_an_aiortc_call_is_observed_metered_and_watched_by_a_client_sideband(
    simulator, start_relay, http
):
    relay = await start_relay(calls_config(simulator.url))
    pc, offer = await aiortc_offer()
    try:
        call_id = await place_call(http, relay, offer)
        watch = relay.app[WEBRTC].watches[call_id]
        await watch.ready.wait()
        call = await simulator_call(simulator, call_id)
        # The team's defaults are in force on a relay-key call.
        assert call.engine.session["instructions"] == PREFIXED
        assert call.engine.session["audio"]["input"]["transcription"]["model"] == "whisper-1"
        labels = {"team": "alpha", "deployment": "gpt-realtime"}
        assert sample(relay, "relay_sessions_active", labels) == 1

        async with sdk(relay).realtime.connect(call_id=call_id) as sideband:
            # The device changes its voice to one the policy refuses: the relay restores it.
            update = {"type": "session.update", "session": {"type": "realtime"}}
            update["session"]["audio"] = {"output": {"voice": "echo"}}
            await call.from_device(orjson.dumps(update))
            changed = await next_of(sideband, "session.updated")
            assert changed.session.audio.output.voice == "echo"
            restored = await next_of(sideband, "session.updated")
            assert restored.session.audio.output.voice == "alloy"
            assert watch.violations == 1
            violation = {**labels, "code": "policy_violation"}
            assert sample(relay, "relay_client_violations_total", violation) == 1

            # The user speaks, the model answers (server VAD): the relay meters the call.
            speech = tone_pcm(600) + bytes(48 * 500)  # 600 ms of tone, 500 ms of silence
            await call.from_device(
                orjson.dumps({"type": "input_audio_buffer.append", "audio": b64(speech)})
            )
            stopped = await next_of(sideband, "input_audio_buffer.speech_stopped")
            await next_of(sideband, "output_audio_buffer.started")
            await next_of(sideband, "output_audio_buffer.stopped")
            await next_of(sideband, "response.done")

            # The client's sideband may control the call: a response of its own, held to the
            # policy there too (its locked instructions set back to those in force).
            await sideband.response.create(response={"instructions": "Be a pirate."})
            await next_of(sideband, "response.done")
            rewritten = {**labels, "param": "response.instructions"}
            assert sample(relay, "relay_client_events_rewritten_total", rewritten) == 1

            await sdk(relay).realtime.calls.hangup(call_id)
        await watch.ended.wait()
    finally:
        await pc.close()
    assert call_id not in simulator.app[CALLS_KEY].calls
    assert watch.outcome == "upstream_closed"
    assert watch.meter.responses == 2
    tokens = sample(relay, "relay_tokens_total", {**labels, "kind": "output_audio"})
    assert tokens > 0 and watch.meter.tokens["output_audio"] == tokens  # counted once
    assert watch.meter.audio_seconds_total["in"] == stopped.audio_end_ms / 1000
    assert sample(relay, "relay_audio_seconds_total", {"direction": "in", **labels}) > 0
    # The call and the client's sideband socket: both ended by the service.
    assert sample(relay, "relay_sessions_total", {**labels, "outcome": "upstream_closed"}) == 2
    assert sample(relay, "relay_sessions_active", labels) == 0


async def simulator_call(simulator, call_id: str):
    return simulator.app[CALLS_KEY].calls[call_id]


async def test_the_relay_hangs_up_a_call_at_its_duration_limit(simulator, start_relay, http):
    relay = await start_relay(calls_config(simulator.url, rules={"max_session_seconds": 0.5}))
    call_id = await place_call(http, relay)
    watch = relay.app[WEBRTC].watches[call_id]
    async with sdk(relay).realtime.connect(call_id=call_id) as sideband:
        async for _ in sideband:
            pass  # until the call ends
    await watch.ended.wait()
    assert watch.outcome == "session_expired"
    assert call_id not in simulator.app[CALLS_KEY].calls
    labels = {"team": "alpha", "deployment": "gpt-realtime", "outcome": "session_expired"}
    assert sample(relay, "relay_sessions_total", labels) == 1


async def test_an_observed_call_counts_against_max_sessions(simulator, start_relay, http):
    relay = await start_relay(calls_config(simulator.url, alpha_limits={"max_sessions": 1}))
    call_id = await place_call(http, relay)
    watch = relay.app[WEBRTC].watches[call_id]
    url = relay.make_url(CALLS).with_query(model="gpt-realtime")
    status, _, body = await post(http, url, data=OFFER, headers=SDP)
    assert (status, body["error"]["code"]) == (429, "team_session_limit")
    await sdk(relay).realtime.calls.hangup(call_id)
    await watch.ended.wait()
    await place_call(http, relay)  # the slot is free again


async def test_a_client_sideband_takes_a_session_slot(simulator, start_relay, http):
    relay = await start_relay(
        calls_config(simulator.url, observe=False, alpha_limits={"max_sessions": 1})
    )
    call_id = await place_call(http, relay)  # unobserved: its media does not pass here
    async with sdk(relay).realtime.connect(call_id=call_id) as sideband:
        await sideband.response.create()
        await next_of(sideband, "response.done")
        # Its socket and its upstream socket are the team's one session: no second one...
        with pytest.raises(Exception) as refused:
            async with sdk(relay).realtime.connect(call_id=call_id):
                pass
        assert getattr(getattr(refused.value, "response", None), "status_code", None) == 429
        ws_url = relay.make_url("/openai/v1/realtime").with_query(model="gpt-realtime")
        async with http.get(ws_url, headers={**UPGRADE, "api-key": ALPHA_KEY}) as answer:
            assert (answer.status, (await answer.json())["error"]["code"]) == (
                429,
                "team_session_limit",
            )
    await relay.app[STATE].idle.wait()
    async with sdk(relay).realtime.connect(call_id=call_id) as sideband:  # free again
        await sdk(relay).realtime.calls.hangup(call_id)


async def test_another_teams_key_gets_404_for_the_sideband_and_call_control(
    simulator, start_relay, http
):
    relay = await start_relay(calls_config(simulator.url, observe=False))
    call_id = await place_call(http, relay)
    with pytest.raises(Exception) as refused:
        async with sdk(relay, BETA_KEY).realtime.connect(call_id=call_id):
            pass
    assert getattr(getattr(refused.value, "response", None), "status_code", None) == 404
    with pytest.raises(NotFoundError) as info:
        await sdk(relay, BETA_KEY).realtime.calls.hangup(call_id)
    assert info.value.body["code"] == "call_not_found"
    with pytest.raises(NotFoundError):
        await sdk(relay).realtime.calls.hangup("rtc_unknown")
    assert call_id in simulator.app[CALLS_KEY].calls  # still up
    # SIP's actions reach the service, which refuses them on a WebRTC call.
    with pytest.raises(BadRequestError):
        await sdk(relay).realtime.calls.reject(call_id)
    # The owner's sideband, on the OpenAI-style path, unobserved: its usage is metered here.
    async with sdk(relay, base="/v1").realtime.connect(call_id=call_id) as sideband:
        await sideband.response.create()
        await next_of(sideband, "response.done")
        await sdk(relay).realtime.calls.hangup(call_id)
    labels = {"team": "alpha", "deployment": "gpt-realtime", "kind": "output_audio"}
    assert sample(relay, "relay_tokens_total", labels) > 0


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ({"intent": "translation", "model": "gpt-realtime"}, "unsupported_parameter"),
        ({"intent": "transcription", "model": "gpt-realtime"}, "intent_mismatch"),
        ({"model": "gpt-4o-transcribe"}, "intent_mismatch"),
        ({"call_id": ""}, "unsupported_parameter"),
    ],
)
async def test_bad_intents_and_call_ids_are_400(simulator, start_relay, http, query, code):
    relay = await start_relay(calls_config(simulator.url))
    headers = {"api-key": ALPHA_KEY, **UPGRADE}
    headers |= {"Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    url = relay.make_url("/openai/v1/realtime").with_query(query)
    async with http.get(url, headers=headers) as response:
        body = await response.json()
    assert (response.status, body["error"]["code"]) == (400, code)


# --- multipart calls -------------------------------------------------------------------------


async def test_the_sdks_multipart_call_goes_through_the_policy(simulator, start_relay):
    relay = await start_relay(calls_config(simulator.url, observe=False))
    pc, offer = await aiortc_offer()
    await pc.close()  # only its offer is needed
    session = {"type": "realtime", "model": "gpt-realtime", "audio": {"output": {"voice": "marin"}}}
    async with sdk(relay) as client:
        raw = await client.realtime.calls.with_raw_response.create(sdp=offer, session=session)
        assert raw.status_code == 201 and raw.text.startswith("v=0")
        call_id = call_id_from_location(raw.headers["Location"])
        call = simulator.app[CALLS_KEY].calls[call_id]
        assert call.engine.session["audio"]["output"]["voice"] == "marin"
        assert call.engine.session["instructions"] == PREFIXED
        # Locked instructions are set back to the team's, as on the WebSocket path.
        pirate = {**session, "instructions": "Be a pirate."}
        raw = await client.realtime.calls.with_raw_response.create(sdp=offer, session=pirate)
        corrected_id = call_id_from_location(raw.headers["Location"])
        corrected = simulator.app[CALLS_KEY].calls[corrected_id]
        assert corrected.engine.session["instructions"] == PREFIXED
        await client.realtime.calls.hangup(call_id)
        await client.realtime.calls.hangup(corrected_id)


async def test_a_secret_with_a_multipart_session_and_a_wrong_deployment(
    simulator, start_relay, http
):
    relay = await start_relay(calls_config(simulator.url, observe=False))
    secret = (await mint(http, relay))["value"]
    async with AsyncOpenAI(
        base_url=str(relay.make_url("/openai/v1")), api_key=secret, max_retries=0
    ) as client:
        raw = await client.realtime.calls.with_raw_response.create(
            sdp=OFFER, session={"type": "realtime", "audio": {"output": {"voice": "marin"}}}
        )
        assert raw.status_code == 201
        with pytest.raises(BadRequestError) as refused:
            await client.realtime.calls.create(
                sdp=OFFER, session={"type": "realtime", "model": "other"}
            )
        assert refused.value.body["code"] == "deployment_mismatch"


# A tool schema nested past orjson's 254 levels (built as text: orjson cannot write it).
DEEP = '{"type":"object","properties":{"a":' * 300 + '{"type":"object"}' + "}}" * 300


@pytest.mark.parametrize(
    "session",
    [
        '{"type":"realtime","model":"gpt-realtime","tools":[{"type":"function",'
        f'"name":"f","parameters":{DEEP}}}]}}',
        {"type": "transcription", "audio": "x"},
        {"type": "transcription", "audio": {"input": None}},
        {"type": "transcription", "audio": {"input": {"transcription": 7}}},
    ],  # fmt: skip
    ids=["nested_too_deep", "audio_not_a_table", "input_null", "transcription_not_a_table"],
)
async def test_an_odd_session_gets_a_400_not_a_500(simulator, start_relay, http, session):
    """Valid JSON that the relay's session handling did not expect: a 500 and an error-level
    traceback before."""
    relay = await start_relay(calls_config(simulator.url, observe=False))
    raw = session if isinstance(session, str) else orjson.dumps(session).decode()
    headers = {"Content-Type": "application/json"}
    data = f'{{"session":{raw}}}'
    status, _, body = await post(http, relay.make_url(SECRETS), data=data, headers=headers)
    assert status == 400, body
    assert body["error"]["type"] == "invalid_request_error"


async def test_a_chunked_multipart_call_is_held_to_the_body_limit(simulator, start_relay, http):
    """A chunked body announces no length: its parts are measured once read (a 909 KB one
    went upstream past the 256 KiB limit)."""
    from relay.edge.webrtc.handlers import MAX_BODY_BYTES

    relay = await start_relay(calls_config(simulator.url, observe=False))
    padded = OFFER + "a=x-pad:" + "x" * MAX_BODY_BYTES + "\r\n"
    body = multipart_call(padded.encode(), {"type": "realtime"}, "b0undary")

    async def chunks():
        for at in range(0, len(body), 65536):
            yield body[at : at + 65536]

    url = relay.make_url(CALLS).with_query(model="gpt-realtime")
    headers = {"Content-Type": "multipart/form-data; boundary=b0undary"}
    status, _, answer = await post(http, url, data=chunks(), headers=headers)
    assert status == 413, answer
    assert answer["error"]["code"] == "request_too_large"


# --- transcription sessions ------------------------------------------------------------------


async def test_a_transcription_session_through_the_relay_with_the_sdk(simulator, start_relay):
    relay = await start_relay(calls_config(simulator.url))
    async with sdk(relay).realtime.connect(
        model="gpt-4o-transcribe", extra_query={"intent": "transcription"}
    ) as connection:
        created = await next_of(connection, "session.created")
        session = created.session
        assert session.type == "transcription"
        assert session.audio.input.transcription.model == "gpt-4o-transcribe"
        assert session.audio.input.transcription.language == "en"
        assert session.audio.input.noise_reduction.type == "near_field"
        await connection.session.update(
            session={
                "type": "transcription",
                "audio": {"input": {"transcription": {"model": "whisper-1"}}},
            }
        )
        # The deployment is the transcription model: another one is set back to it.
        corrected = await next_of(connection, "session.updated")
        assert corrected.session.audio.input.transcription.model == "gpt-4o-transcribe"
        await connection.session.update(
            session={
                "type": "transcription",
                "audio": {"input": {"transcription": {"language": "fr"}}},
            }
        )
        updated = await next_of(connection, "session.updated")
        assert updated.session.audio.input.transcription.language == "fr"
        await connection.input_audio_buffer.append(audio=b64(tone_pcm(1000)))
        await connection.input_audio_buffer.commit()
        delta = await next_of(connection, "conversation.item.input_audio_transcription.delta")
        done = await next_of(connection, "conversation.item.input_audio_transcription.completed")
        assert done.transcript.startswith(delta.delta)
        assert done.usage.type == "tokens"
        await connection.send({"type": "response.create"})
        refused = await next_of(connection, "error")
        assert "transcription sessions" in refused.error.message
    labels = {"team": "alpha", "deployment": "gpt-4o-transcribe"}
    audio = sample(relay, "relay_tokens_total", {**labels, "kind": "transcription_input_audio"})
    out = sample(relay, "relay_tokens_total", {**labels, "kind": "transcription_output_text"})
    assert audio == done.usage.input_token_details.audio_tokens and out == done.usage.output_tokens
    rewritten = {**labels, "param": "session.audio.input.transcription.model"}
    assert sample(relay, "relay_client_events_rewritten_total", rewritten) == 1


async def test_the_relay_dials_transcription_as_azure_documents(start_fake, start_relay):
    async def script(ws, fake):
        created = {"type": "transcription_session.created", "session": {"id": "s"}}
        await ws.send_str(orjson.dumps(created).decode())
        async for msg in ws:
            fake.received.append(msg.data.encode())
            event = orjson.loads(msg.data)
            updated = {"type": "transcription_session.updated", "session": event["session"]}
            await ws.send_str(orjson.dumps(updated).decode())

    fake = FakeUpstream(script=script)
    server = await start_fake(fake.app())
    endpoint = f"http://127.0.0.1:{server.port}"
    deployments = {
        name: {
            "endpoint": endpoint,
            "credential": {"env": "TEST_AZURE_KEY"},
            "kind": "transcription",
            "protocol": protocol,
            "azure_deployment": "az-transcribe",
            "session": {"audio": {"input": {"transcription": {"language": "en"}}}},
        }
        for name, protocol in (("ga-t", "ga"), ("preview-t", "preview"))
    }
    config = relay_config(
        endpoint,
        deployments=deployments,
        teams={"alpha": {"keys": [hash_key(ALPHA_KEY)], "deployments": list(deployments)}},
    )
    relay = await start_relay(config)
    async with aiohttp.ClientSession() as http:
        url = relay.make_url("/openai/realtime").with_query(
            {
                "api-version": "2025-04-01-preview",
                "deployment": "preview-t",
                "intent": "transcription",
            }
        )
        async with http.ws_connect(url, headers={"api-key": ALPHA_KEY}) as ws:
            first = orjson.loads((await ws.receive()).data)
            assert first["type"] == "transcription_session.created"
            assert first["session"]["input_audio_transcription"] == {
                "language": "en",
                "model": "az-transcribe",
            }
    sent = fake.requests[0]
    assert sent["path"] == "/openai/realtime"
    assert sent["query"] == {"api-version": "2025-04-01-preview", "intent": "transcription"}
    assert orjson.loads(fake.received[0])["type"] == "transcription_session.update"


async def test_a_transcription_secret_places_a_transcription_call(simulator, start_relay, http):
    relay = await start_relay(calls_config(simulator.url))
    session = {
        "type": "transcription",
        "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe", "language": "fr"}}},
    }
    async with sdk(relay) as client:
        minted = await client.realtime.client_secrets.create(session=session)
    assert minted.session.type == "transcription"
    audio_input = minted.session.audio.input
    assert audio_input.transcription.language == "fr"
    assert audio_input.noise_reduction.type == "near_field"
    status, headers, _ = await post(
        http, relay.make_url(CALLS), key=minted.value, data=OFFER, headers=SDP
    )
    assert status == 201
    call = simulator.app[CALLS_KEY].calls[call_id_from_location(headers["Location"])]
    assert call.engine.transcription
    assert call.engine.session["audio"]["input"]["transcription"]["model"] == "gpt-4o-transcribe"
    status, _, body = await post(
        http,
        relay.make_url("/openai/v1/realtime/client_secrets"),
        json={"session": {**session, "audio": {"input": {"transcription": {"language": "de"}}}}},
    )
    assert (status, body["error"]["code"]) == (400, "missing_deployment")
    assert body["error"]["param"] == "session.audio.input.transcription.model"
    # A language off the allow-list is set back to the one in force (the deployment's).
    german = {"transcription": {"model": "gpt-4o-transcribe", "language": "de"}}
    status, _, body = await post(
        http,
        relay.make_url("/openai/v1/realtime/client_secrets"),
        json={"session": {**session, "audio": {"input": german}}},
    )
    assert status == 200
    assert body["session"]["audio"]["input"]["transcription"]["language"] == "en"


async def test_an_observer_that_cannot_attach_gives_the_slot_back(start_fake, start_relay, http):
    from tests.test_webrtc import RecordingUpstream

    fake = RecordingUpstream()  # answers calls; has no sideband socket (405)
    server = await start_fake(fake.app())
    relay = await start_relay(
        calls_config(f"http://127.0.0.1:{server.port}", alpha_limits={"max_sessions": 1})
    )
    call_id = await place_call(http, relay)
    assert call_id == "rtc_fake"
    watch = relay.app[WEBRTC].watches[call_id]
    await watch.ended.wait()
    assert watch.outcome == "observer_failed"
    labels = {"team": "alpha", "deployment": "gpt-realtime", "outcome": "observer_failed"}
    assert sample(relay, "relay_sessions_total", labels) == 1
    await place_call(http, relay)  # the slot came back
    # The call control of an unknown call at the upstream is its 404, as it is.
    fake.status = 404
    with pytest.raises(NotFoundError):
        await sdk(relay).realtime.calls.hangup(call_id)
    assert fake.requests[-1]["path"] == f"/openai/v1/realtime/calls/{call_id}/hangup"
    assert fake.requests[-1]["headers"]["api-key"] == AZURE_KEY


@pytest.mark.parametrize("status", [400, 404, 409])
async def test_call_controls_refusal_keeps_its_status_not_a_credential_it_quoted(
    start_fake, start_relay, http, status
):
    """The upstream's refusal of a hangup reaches the caller with its status, code and
    words, cleaned as every upstream message is (it was passed on byte for byte)."""
    from tests.test_webrtc import RecordingUpstream

    fake = RecordingUpstream()
    server = await start_fake(fake.app())
    relay = await start_relay(calls_config(f"http://127.0.0.1:{server.port}", observe=False))
    call_id = await place_call(http, relay)
    fake.status = status
    quoted = {"code": "call_refused", "message": f"refused: you sent {AZURE_KEY}"}
    fake.body = orjson.dumps({"error": quoted})
    url = relay.make_url(f"{CALLS}/{call_id}/hangup")
    answer_status, _, body = await post(http, url, json={})
    assert answer_status == status
    assert body["error"]["code"] == "call_refused"
    assert AZURE_KEY not in orjson.dumps(body).decode()
    assert body["error"]["message"].startswith("refused: you sent ")


async def test_a_relay_shutdown_stops_observing_and_counts_the_call(simulator, start_relay, http):
    relay = await start_relay(calls_config(simulator.url))
    call_id = await place_call(http, relay)
    watch = relay.app[WEBRTC].watches[call_id]
    await watch.ready.wait()
    await relay.close()
    assert watch.ended.is_set() and watch.outcome == "relay_closed"
    assert call_id in simulator.app[CALLS_KEY].calls  # the call itself goes on with the service


async def test_an_unreachable_call_store_is_a_clear_503():
    import redis.asyncio as aioredis

    from relay.edge.webrtc.call_book import RedisCalls
    from relay.errors import ClientRefused
    from tests.processes import free_port

    client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}")
    calls = RedisCalls.connect(client, "relay", 0.5)
    try:
        for attempt in (
            calls.remember("rtc_1", PlacedCall("alpha", "gpt-realtime", "default", False)),
            calls.find("rtc_1"),
        ):
            with pytest.raises(ClientRefused) as info:
                await attempt
            assert (info.value.status, info.value.code) == (503, "call_store_unavailable")
    finally:
        await client.aclose()


async def call_answered_by(answer, start_fake, start_relay, http) -> tuple[int, Any, Any]:
    """A call placed through the relay, its upstream answering with ``answer``."""
    from aiohttp import web

    app = web.Application()
    app.router.add_post("/{tail:.*}", answer)
    server = await start_fake(app)
    relay = await start_relay(calls_config(f"http://127.0.0.1:{server.port}", observe=False))
    url = relay.make_url(CALLS).with_query(model="gpt-realtime")
    return await post(http, url, data=OFFER, headers=SDP)


async def test_a_calls_answer_never_carries_the_relays_key(start_fake, start_relay, http):
    """The service's `Location` and SDP answer came back byte for byte: one quoting the
    credential it was sent (a query parameter, the body) passed it on."""
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(
            status=201,
            text=f"v=0\r\na=note:{AZURE_KEY}\r\n",
            content_type="application/sdp",
            headers={"Location": f"/openai/v1/realtime/calls/rtc_q?api-key={AZURE_KEY}"},
        )

    status, headers, body = await call_answered_by(answer, start_fake, start_relay, http)
    assert status == 201
    assert AZURE_KEY not in headers["Location"] and AZURE_KEY not in body
    assert headers["Location"].startswith("/openai/v1/realtime/calls/rtc_q")


async def test_an_oversized_answer_from_the_upstream_is_refused_not_held(
    start_fake, start_relay, http
):
    """A 315 MB SDP answer took the process to 668 MiB and went back whole."""
    from aiohttp import web

    from relay.edge.webrtc.forward import MAX_ANSWER_BYTES

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        sdp = "v=0\r\n" + "a=x:" + "y" * MAX_ANSWER_BYTES + "\r\n"
        return web.Response(status=201, text=sdp, content_type="application/sdp")

    status, _, body = await call_answered_by(answer, start_fake, start_relay, http)
    assert status == 502 and body["error"]["code"] == "upstream_invalid_response"


async def test_an_observed_call_is_hung_up_when_its_team_goes_over_budget(
    simulator, start_relay, http
):
    """A call is costed like a session: it ran on past its team's budget to its duration
    limit, while the team's WebSocket sessions were ended."""
    config = calls_config(simulator.url, alpha_limits={"max_usd_per_day": 1.0}, priced=True)
    relay = await start_relay(config)
    call_id = await place_call(http, relay)
    watch = relay.app[WEBRTC].watches[call_id]
    relay.app[STATE].budgets.book.add("alpha", 2.0)  # another session's spend
    await watch.ended.wait()
    assert watch.outcome == "budget_exceeded"
    assert call_id not in simulator.app[CALLS_KEY].calls
    labels = {"team": "alpha", "deployment": "gpt-realtime", "outcome": "budget_exceeded"}
    assert sample(relay, "relay_sessions_total", labels) == 1
