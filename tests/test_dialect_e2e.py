"""A client of one dialect on a deployment of the other: the relay translates both ways.

Raw aiohttp clients, so every byte the client gets can be checked; tests/compat runs the real
SDKs the same way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from relay.ops.config import RelayConfig
from tests.helpers import ALPHA_KEY, b64, read_until, relay_config, tone_pcm

GA_NAMES = ("response.output_audio", "response.output_text", "conversation.item.added")
PREVIEW_NAMES = ("response.audio.", "response.audio_transcript.", "response.text.")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def send(ws: aiohttp.ClientWebSocketResponse, event: dict) -> None:
    await ws.send_str(orjson.dumps(event).decode())


async def talk(ws: aiohttp.ClientWebSocketResponse) -> list[dict]:
    """Append a tone, commit, ask for a response; every event up to response.done."""
    await send(ws, {"type": "input_audio_buffer.append", "audio": b64(tone_pcm(300))})
    await send(ws, {"type": "input_audio_buffer.commit"})
    await send(ws, {"type": "response.create"})
    return await read_until(ws, "response.done")


async def test_a_preview_client_on_a_ga_deployment(simulator, start_relay, http):
    relay = await start_relay(relay_config(simulator.url))
    url = (
        f"http://127.0.0.1:{relay.port}/openai/realtime"
        "?api-version=2024-10-01-preview&deployment=gpt-realtime"
    )
    async with http.ws_connect(url, headers={"api-key": ALPHA_KEY}) as ws:
        created = (await read_until(ws, "session.created"))[-1]["session"]
        assert "type" not in created and created["input_audio_format"] == "pcm16"
        assert created["modalities"] == ["text", "audio"]
        await send(
            ws,
            {
                "type": "session.update",
                "event_id": "c1",
                "session": {
                    "voice": "ash",
                    "turn_detection": None,
                    "output_audio_format": "g711_ulaw",
                    "temperature": 0.7,
                },
            },
        )
        events = await read_until(ws, "session.updated")
        error = next(e for e in events if e["type"] == "error")["error"]
        assert (error["code"], error["param"], error["event_id"]) == (
            "untranslatable_field",
            "session.temperature",
            "c1",
        )
        session = events[-1]["session"]
        assert (session["voice"], session["turn_detection"]) == ("ash", None)
        assert session["output_audio_format"] == "g711_ulaw"
        await send(ws, {"type": "session.update", "session": {"output_audio_format": "pcm16"}})
        await read_until(ws, "session.updated")
        events = await talk(ws)
    kinds = [e["type"] for e in events]
    assert "response.audio.delta" in kinds and "response.audio_transcript.done" in kinds
    assert "conversation.item.created" in kinds and "error" not in kinds
    assert not [k for k in kinds if k.startswith(GA_NAMES) or k == "conversation.item.done"]
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["voice"] == "ash"
    assert done["output"][0]["content"][0]["type"] == "audio"


async def test_a_ga_client_on_a_preview_deployment(simulator, start_relay, http):
    config = relay_config(
        simulator.url,
        deployments={
            "gpt-realtime": {
                "endpoint": simulator.url,
                "azure_deployment": "gpt-4o-realtime-preview",
                "protocol": "preview",
                "api_version": "2025-04-01-preview",
                "credential": {"env": "TEST_AZURE_KEY"},
            }
        },
    )
    relay = await start_relay(config)
    url = f"http://127.0.0.1:{relay.port}/openai/v1/realtime?model=gpt-realtime"
    async with http.ws_connect(url, headers={"api-key": ALPHA_KEY}) as ws:
        created = (await read_until(ws, "session.created"))[-1]["session"]
        assert created["type"] == "realtime"
        assert created["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
        await send(
            ws,
            {
                "type": "session.update",
                "session": {
                    "type": "realtime",
                    "audio": {"input": {"turn_detection": None}, "output": {"voice": "ash"}},
                },
            },
        )
        session = (await read_until(ws, "session.updated"))[-1]["session"]
        assert session["audio"]["output"]["voice"] == "ash"
        assert "temperature" not in session
        events = await talk(ws)
    kinds = [e["type"] for e in events]
    assert "response.output_audio.delta" in kinds
    assert "conversation.item.added" in kinds and "conversation.item.done" in kinds
    assert not [k for k in kinds if k.startswith(PREVIEW_NAMES)] and "error" not in kinds
    assert events[-1]["response"]["audio"]["output"]["voice"] == "ash"


async def test_an_event_with_no_counterpart_is_answered_not_sent(simulator, start_relay, http):
    relay = await start_relay(relay_config(simulator.url))
    url = f"http://127.0.0.1:{relay.port}/v1/realtime?model=gpt-realtime"
    headers = {"Authorization": f"Bearer {ALPHA_KEY}", "OpenAI-Beta": "realtime=v1"}
    async with http.ws_connect(url, headers=headers) as ws:
        await read_until(ws, "session.created")
        await send(ws, {"type": "transcription_session.update", "event_id": "t1", "session": {}})
        error = (await read_until(ws, "error"))[-1]["error"]
        assert (error["code"], error["param"], error["event_id"]) == (
            "untranslatable_field",
            "type",
            "t1",
        )
        # The session goes on.
        await send(ws, {"type": "session.update", "session": {"instructions": "Hi."}})
        assert (await read_until(ws, "session.updated"))[-1]["session"]["instructions"]


# --- events a strict parser takes and orjson does not (found by probing as a hostile client) -

BIG = 123456789012345678901234567890  # past 64 bits: json reads it, orjson does not
DEEP = '{"a":' * 300 + "1" + "}" * 300  # past orjson's 254 levels, within json's
ODD_EVENTS = {
    "truncated": '{"type":"session.update","session":{',
    "lone_surrogate": '{"type":"session.update","session":{"instructions":"\\ud800"}}',
    "big_integer": (
        '{"type":"session.update","session":{"tools":[{"type":"function","name":"f",'
        f'"parameters":{{"type":"object","maximum":{BIG}}}}}]}}}}'
    ),
    "deep": (
        '{"type":"session.update","session":{"instructions":"x","tools":[{"type":"function",'
        f'"name":"f","parameters":{DEEP}}}]}}}}'
    ),
    "response_metadata": (
        '{"type":"response.create","response":{"instructions":"hello",'
        f'"metadata":{{"n":{BIG}}}}}}}'
    ),
}


def policy_config(endpoint: str, policy: dict) -> RelayConfig:
    deployment = {"endpoint": endpoint, "credential": {"env": "TEST_AZURE_KEY"}, "policy": policy}
    return relay_config(endpoint, deployments={"gpt-realtime": deployment})


def read_any_json(data: str) -> dict:
    """An event as json reads it: the upstream may echo an integer orjson cannot read."""
    import json  # noqa: TID251 (json's reading is what is under test)

    return json.loads(data)


@pytest.mark.parametrize("dialect", ["ga", "preview"])
@pytest.mark.parametrize("name", list(ODD_EVENTS))
async def test_an_odd_event_gets_an_answer_and_the_session_goes_on(
    simulator, start_relay, http, dialect, name
):
    """Each was read by the strict parse (or passed unparsed by its prefix), then failed in
    orjson while being translated or rewritten: the session ended with 1011
    `relay_internal_error`, an error-level log line and an outcome that alerts operators."""
    policy = {"instructions_prefix": "Be kind.", "locked": ["audio.input.transcription.model"]}
    relay = await start_relay(policy_config(simulator.url, policy))
    path = (
        "/openai/v1/realtime?model=gpt-realtime"
        if dialect == "ga"
        else "/openai/realtime?api-version=2024-10-01-preview&deployment=gpt-realtime"
    )
    async with http.ws_connect(
        f"http://127.0.0.1:{relay.port}{path}", headers={"api-key": ALPHA_KEY}
    ) as ws:
        await read_until(ws, "session.created")
        await ws.send_str(ODD_EVENTS[name])
        after = {"type": "conversation.item.retrieve", "event_id": "after", "item_id": "none"}
        await send(ws, after)
        seen = []
        while True:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, (msg, seen)
            event = read_any_json(msg.data)
            seen.append(event)
            if event["type"] == "error" and event["error"].get("event_id") == "after":
                break
        codes = [e["error"]["code"] for e in seen if e["type"] == "error"]
        assert "relay_internal_error" not in codes, seen
        if name == "truncated":
            assert codes[0] == "invalid_json"


async def test_a_translated_event_too_complex_to_parse_is_refused_and_the_session_goes_on(
    simulator, start_relay, http
):
    """A preview client's large item is translated, which parses it on the event loop: one
    of 30 MiB of tiny parts held every session of the process for 1.2 s. The scan counts
    its values off the loop, and past MAX_PARSED_VALUES the event is refused."""
    from relay.session.codec import MAX_PARSED_VALUES

    relay = await start_relay(relay_config(simulator.url))
    path = "/openai/realtime?api-version=2024-10-01-preview&deployment=gpt-realtime"
    async with http.ws_connect(
        f"http://127.0.0.1:{relay.port}{path}", headers={"api-key": ALPHA_KEY}, max_msg_size=0
    ) as ws:
        await read_until(ws, "session.created")
        part = {"type": "input_text", "text": "a"}
        item = {"type": "message", "role": "user", "content": [part] * MAX_PARSED_VALUES}
        await send(ws, {"type": "conversation.item.create", "event_id": "big", "item": item})
        error = (await read_until(ws, "error"))[-1]["error"]
        assert (error["code"], error["event_id"]) == ("event_too_complex", "big")
        item["content"] = [part]
        await send(ws, {"type": "conversation.item.create", "item": item})
        await read_until(ws, "conversation.item.created")


@pytest.mark.parametrize("client", ["ga", "preview"])
async def test_a_translated_tool_turn_validates_against_the_clients_sdk(
    simulator, start_relay, http, client
):
    """Every event a translated client gets, a tool call's included, is one its SDK's own
    models take: GA clients on a preview deployment got content parts retyped as items are,
    and a `response.function_call_arguments.done` without the `name` GA requires."""
    from tests.simulator import sdk_types

    deployment = {"endpoint": simulator.url, "credential": {"env": "TEST_AZURE_KEY"}}
    if client == "ga":
        deployment |= {"protocol": "preview", "api_version": "2025-04-01-preview"}
        path = "/openai/v1/realtime?model=gpt-realtime"
        session: dict = {"type": "realtime"}
    else:
        path = "/openai/realtime?api-version=2024-10-01-preview&deployment=gpt-realtime"
        session = {}
    relay = await start_relay(relay_config(simulator.url, deployments={"gpt-realtime": deployment}))
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    async with http.ws_connect(f"http://127.0.0.1:{relay.port}{path}",
                               headers={"api-key": ALPHA_KEY}) as ws:  # fmt: skip
        await read_until(ws, "session.created")
        await send(ws, {"type": "session.update", "session": {**session, "tools": [tool]}})
        await read_until(ws, "session.updated")
        item = {"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "get weather please"}]}  # fmt: skip
        await send(ws, {"type": "conversation.item.create", "item": item})
        await send(ws, {"type": "response.create"})
        raws = []
        while True:
            msg = await ws.receive()
            raws.append(msg.data.encode())
            if b'"response.done"' in raws[-1]:
                break
    kinds = [sdk_types.check("beta" if client == "preview" else "ga", raw)["type"]
             for raw in raws]  # fmt: skip
    assert "response.function_call_arguments.done" in kinds


@pytest.mark.parametrize("on_violation", ["rewrite", "refuse"])
@pytest.mark.parametrize(
    "number", ["-1e400", "1e400", "1" + "0" * 400], ids=["minus_1e400", "1e400", "400_digits"]
)
async def test_a_number_past_a_doubles_range_is_refused_as_the_service_refuses_it(
    simulator, start_relay, http, on_violation, number
):
    """The service (orjson in the simulator) refuses such a frame as invalid JSON; the
    relay's fallback parse read it as infinity, judged that, and wrote it back as null, an
    event the upstream then ran (`turn_detection: 1e400` turned server VAD off)."""
    policy = {
        "instructions_prefix": "Be kind.",
        "max_values": {"max_output_tokens": 1024},
        "on_violation": on_violation,
    }
    relay = await start_relay(policy_config(simulator.url, policy))
    url = f"http://127.0.0.1:{relay.port}/openai/v1/realtime?model=gpt-realtime"
    async with http.ws_connect(url, headers={"api-key": ALPHA_KEY}) as ws:
        created = (await read_until(ws, "session.created"))[-1]["session"]
        detection = created["audio"]["input"]["turn_detection"]
        for field in ('"max_output_tokens"', '"audio":{"input":{"turn_detection"'):
            closing = "}}}}" if "audio" in field else "}}"
            await ws.send_str(
                '{"type":"session.update","event_id":"odd","session":{"type":"realtime",'
                f'"instructions":"hi",{field}:{number}{closing}'
            )
            await send(
                ws, {"type": "conversation.item.retrieve", "event_id": "after", "item_id": "x"}
            )
            seen = await read_until(ws, "error")
            while seen[-1]["error"].get("event_id") != "after":
                seen += await read_until(ws, "error")
            assert [e["type"] for e in seen if e["type"] == "session.updated"] == []
            assert seen[0]["error"]["code"] == "invalid_json"
        await send(ws, {"type": "session.update", "session": {"type": "realtime"}})
        session = (await read_until(ws, "session.updated"))[-1]["session"]
        assert session["audio"]["input"]["turn_detection"] == detection
        assert session["max_output_tokens"] in ("inf", 1024)
