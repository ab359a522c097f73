"""Upstream faults: each gives the client a clear error, closes promptly, logs and counts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
import structlog
from aiohttp import WSMsgType

from relay.app import drain
from relay.state import STATE
from tests.faults.peers import send_after_created, silent_mid_response, stall_after_created
from tests.helpers import (
    ALPHA_KEY,
    AZURE_KEY,
    UPGRADE,
    FakeUpstream,
    echo,
    read_until,
    relay_config,
)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def relay_with(start_fake, start_relay, script, **sections):
    upstream = await start_fake(FakeUpstream(script=script).app())
    return await start_relay(relay_config(str(upstream.make_url("")), **sections))


def url(relay) -> str:
    return str(relay.make_url("/openai/v1/realtime?model=gpt-realtime"))


def outcomes(relay) -> dict[str, float]:
    found = {}
    for metric in relay.app[STATE].metrics.registry.collect():
        if metric.name == "relay_sessions":
            for s in metric.samples:
                # (Outcomes the alerts watch are exported at 0 from the start.)
                if s.name == "relay_sessions_total" and s.value:
                    found[s.labels["outcome"]] = s.value
    return found


async def session_fails(http, relay, *, code: str, close: int) -> None:
    async with http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        await ws.send_str('{"type":"response.create"}')
        [error] = await read_until(ws, "error")
        assert error["error"]["code"] == code
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, close)
    await relay.app[STATE].idle.wait()


async def test_stalled_upstream_is_found_by_heartbeat(start_fake, start_relay, http):
    relay = await relay_with(
        start_fake, start_relay, stall_after_created, upstream={"heartbeat_seconds": 0.2}
    )
    with structlog.testing.capture_logs() as logs:
        await session_fails(http, relay, code="upstream_disconnected", close=1011)
    assert outcomes(relay) == {"upstream_lost": 1}
    assert any(entry["event"] == "upstream_lost" for entry in logs)


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ("this is not json", "upstream_protocol_error"),
        ('["an", "array"]', "upstream_protocol_error"),
        (b"\x00binary", "upstream_protocol_error"),
        ('{"type":"x","pad":"' + "p" * 5000 + '"}', "upstream_message_too_big"),
        # Past a type prefix the relay forwards on, what it reads must still be JSON: these
        # ended as the relay's own failure (relay_internal_error, a traceback).
        ('{"type":"response.done","response":{"usage":{}}} GARBAGE', "upstream_protocol_error"),
        (
            '{"type":"response.done","response":{"usage":{"total_tokens":1e999}}}',
            "upstream_protocol_error",
        ),  # fmt: skip
        # Text that is not UTF-8: forwarded, the client closed with 1007 and was blamed.
        (
            ("text", b'{"type":"response.output_text.delta","delta":"\xff\xfe"}'),
            "upstream_protocol_error",
        ),  # fmt: skip
    ],
)
async def test_upstream_sending_garbage_ends_the_session(
    start_fake, start_relay, http, payload, code
):
    relay = await relay_with(
        start_fake, start_relay, send_after_created(payload), server={"max_message_bytes": 4096}
    )
    with structlog.testing.capture_logs() as logs:
        await session_fails(http, relay, code=code, close=1011)
    assert outcomes(relay) == {code: 1}
    assert any(entry["event"] == code for entry in logs)


async def test_a_masked_frame_from_the_upstream_ends_the_session(start_fake, start_relay, http):
    """RFC 6455 5.1: a client MUST fail a connection whose server masks a frame. aiohttp's
    reader took it, and the client got the event."""

    async def masking(ws, fake: FakeUpstream) -> None:
        await ws.send_str('{"type": "session.created", "event_id": "e0", "session": {}}')
        await ws.receive()  # the client's first event
        payload = b'{"type":"response.created","response":{"id":"masked"}}'
        ws._writer.transport.write(bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
        await ws.receive()  # until the relay closes

    relay = await relay_with(start_fake, start_relay, masking)
    with structlog.testing.capture_logs() as logs:
        await session_fails(http, relay, code="upstream_disconnected", close=1011)
    assert [e["must_be_masked"] for e in logs if e["event"] == "frame_wrongly_masked"] == [False]


async def test_upstream_silent_mid_response_is_stalled_and_closed(start_fake, start_relay, http):
    relay = await relay_with(
        start_fake, start_relay, silent_mid_response, upstream={"response_timeout_seconds": 0.3}
    )
    with structlog.testing.capture_logs() as logs:
        async with http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as ws:
            await read_until(ws, "session.created")
            await ws.send_str('{"type":"response.create"}')
            events = await read_until(ws, "error")
            assert events[-1]["error"]["code"] == "upstream_stalled"
            msg = await ws.receive()
            assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1011)
        await relay.app[STATE].idle.wait()
    assert outcomes(relay) == {"upstream_stalled": 1}
    assert any(entry["event"] == "upstream_stalled" for entry in logs)


async def test_a_drain_does_not_wait_past_a_stalled_response(start_fake, start_relay, http):
    relay = await relay_with(
        start_fake, start_relay, silent_mid_response, upstream={"response_timeout_seconds": 0.3}
    )
    state = relay.app[STATE]
    async with http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        await ws.send_str('{"type":"response.create"}')
        await read_until(ws, "response.created")
        # The grace is far longer than the response timeout: the drain ends with the stall.
        async with asyncio.timeout(20):
            await drain(state, grace_seconds=60)
        [error] = await read_until(ws, "error")
        assert error["error"]["code"] == "upstream_stalled"


async def calling_a_tool(ws, fake: FakeUpstream) -> None:
    """A service whose first response calls a tool, and whose next answers its output."""

    async def send(event: dict) -> None:
        await ws.send_str(orjson.dumps(event).decode())

    await send({"type": "session.created", "event_id": "e0", "session": {}})
    responses = 0
    async for msg in ws:
        event = orjson.loads(msg.data)
        if event["type"] == "conversation.item.create":
            await send({"type": "conversation.item.added", "item": event["item"]})
        elif event["type"] == "response.create":
            responses += 1
            response = {"id": f"resp_{responses}", "status": "completed", "output": []}
            await send({"type": "response.created", "response": response})
            if responses == 1:
                call = {"id": "item_call", "type": "function_call", "status": "completed",
                        "call_id": "call_1", "name": "lookup", "arguments": "{}"}  # fmt: skip
                response = {**response, "output": [call]}
            await send({"type": "response.done", "response": response})


async def test_a_drain_waits_for_a_tool_the_client_runs_and_its_answer(
    start_fake, start_relay, http
):
    """The response that called the tool was done, so the drain closed the session at once:
    the tool's output never went up and the user never heard an answer."""
    relay = await relay_with(start_fake, start_relay, calling_a_tool)
    state = relay.app[STATE]
    async with http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        await ws.send_str('{"type":"response.create"}')
        [*_, done] = await read_until(ws, "response.done")
        assert done["response"]["output"][0]["call_id"] == "call_1"  # the tool runs now
        draining = asyncio.ensure_future(drain(state, grace_seconds=60))
        await asyncio.sleep(0)  # one pass of the loop: the drain's first step
        assert state.draining
        output = {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
        await ws.send_str(
            orjson.dumps({"type": "conversation.item.create", "item": output}).decode()
        )
        await read_until(ws, "conversation.item.added")
        await ws.send_str('{"type":"response.create"}')
        [*_, answer] = await read_until(ws, "response.done")
        assert answer["response"]["id"] == "resp_2"
        [error] = await read_until(ws, "error")
        assert error["error"]["code"] == "relay_shutting_down"
        async with asyncio.timeout(10):
            await draining


# --- an upstream that quotes the relay's credential back (found by probing) ----------------


def _quoting(how: str):
    async def script(ws, fake: FakeUpstream) -> None:
        created = {"type": "session.created", "event_id": "e0", "session": {}}
        await ws.send_str(orjson.dumps(created).decode())
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            quoted = f"you sent {AZURE_KEY}"
            if how == "error":
                error = {"type": "invalid_request_error", "code": "x", "message": quoted,
                         "param": AZURE_KEY, "event_id": None}  # fmt: skip
                await ws.send_str(orjson.dumps({"type": "error", "error": error}).decode())
            elif how == "escaped":  # the same words, JSON-escaped: raw bytes miss them
                error = {"type": "invalid_request_error", "message": quoted, AZURE_KEY: 1}
                text = orjson.dumps({"type": "error", "error": error}).decode()
                await ws.send_str(
                    text.replace(AZURE_KEY, "\\u" + f"{ord(AZURE_KEY[0]):04x}" + AZURE_KEY[1:])
                )
            elif how == "failed_response":
                details = {"type": "failed", "error": {"type": "server_error", "message": quoted}}
                response = {"id": "resp_1", "status": "failed", "status_details": details}
                await ws.send_str(
                    orjson.dumps({"type": "response.done", "response": response}).decode()
                )
            else:
                await ws.close(code=1008, message=quoted.encode())
                return

    return script


@pytest.mark.parametrize("how", ["error", "escaped", "failed_response", "close"])
async def test_the_upstreams_words_never_carry_the_relays_key_to_the_client(
    start_fake, start_relay, http, how
):
    """The service's `error` events and close reasons reach the client; one quoting the
    credential it was sent passed it on byte for byte (the logs alone were cleaned)."""
    relay = await relay_with(start_fake, start_relay, _quoting(how))
    async with http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        await ws.send_str('{"type":"response.create"}')
        msg = await ws.receive()
        if how == "error":
            error = orjson.loads(msg.data)["error"]
            assert error["message"] == "you sent [REDACTED]" and error["param"] == "[REDACTED]"
        elif how in ("escaped", "failed_response"):
            assert AZURE_KEY not in str(orjson.loads(msg.data))
            assert "you sent [REDACTED]" in str(orjson.loads(msg.data))
        else:
            assert (msg.type, msg.data, msg.extra) == (
                WSMsgType.CLOSE,
                1008,
                "you sent [REDACTED]",
            )
        assert AZURE_KEY not in str(msg.data) + str(msg.extra)


async def test_session_defaults_refused_in_words_quoting_the_key(start_fake, start_relay, http):
    async def refuse_defaults(ws, fake: FakeUpstream) -> None:
        created = {"type": "session.created", "event_id": "e0", "session": {}}
        await ws.send_str(orjson.dumps(created).decode())
        await ws.receive()  # the relay's session defaults
        error = {"type": "invalid_request_error", "message": f"bad {AZURE_KEY}"}
        await ws.send_str(orjson.dumps({"type": "error", "error": error}).decode())
        await ws.receive()

    upstream = await start_fake(FakeUpstream(script=refuse_defaults).app())
    deployment = {
        "endpoint": str(upstream.make_url("")),
        "credential": {"env": "TEST_AZURE_KEY"},
        "session": {"instructions": "Be brief."},
    }
    endpoint = str(upstream.make_url(""))
    relay = await start_relay(relay_config(endpoint, deployments={"gpt-realtime": deployment}))
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY})
    assert refused.value.status == 502
    async with http.get(url(relay), headers={"api-key": ALPHA_KEY, **UPGRADE}) as response:
        body = await response.text()
    assert "session_defaults_rejected" in body and AZURE_KEY not in body
    assert "bad [REDACTED]" in body


async def test_a_first_event_quoting_the_key_is_refused_without_it(start_fake, start_relay, http):
    """The refusal quoted the unexpected first event's type: the upstream's words, which
    carried the relay's key (cut short too) to the client's 502."""

    async def confused(ws, fake: FakeUpstream) -> None:
        event = {"type": f"unauthorized api-key {AZURE_KEY}, or {AZURE_KEY[:20]}"}
        await ws.send_str(orjson.dumps(event).decode())
        await ws.receive()

    relay = await relay_with(start_fake, start_relay, confused)
    async with http.get(url(relay), headers={"api-key": ALPHA_KEY, **UPGRADE}) as response:
        assert response.status == 502
        body = await response.text()
    assert "upstream_protocol_error" in body and AZURE_KEY[:16] not in body
    assert "unauthorized api-key [REDACTED], or [REDACTED]" in body


async def test_an_upstream_that_stops_reading_is_dropped_and_the_session_ends(
    start_fake, start_relay, http
):
    """The client is held by backpressure and told `upstream_stalled`; then the upstream's
    close must not wait for ever. A graceful close waited for a write buffer the upstream
    never drained: the session, its slot and its socket stayed until a restart."""
    stopped, checked = asyncio.Event(), asyncio.Event()

    async def stop_reading(ws, fake: FakeUpstream) -> None:
        created = {"type": "session.created", "event_id": "e0", "session": {}}
        await ws.send_str(orjson.dumps(created).decode())
        assert ws._req is not None and ws._req.transport is not None
        ws._req.transport.pause_reading()
        stopped.set()
        await checked.wait()  # reading nothing meanwhile
        ws._req.transport.resume_reading()  # sees the relay's abort: the handler ends

    relay = await relay_with(
        start_fake,
        start_relay,
        stop_reading,
        server={"close_timeout_seconds": 0.5, "stall_timeout_seconds": 1.0},
    )
    append = orjson.dumps({"type": "input_audio_buffer.append", "audio": "A" * 1_000_000})
    async with http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        await stopped.wait()

        async def flood() -> None:
            with contextlib.suppress(ConnectionError):
                while not ws.closed:
                    await ws.send_str(append.decode())

        sender = asyncio.ensure_future(flood())
        [error] = await read_until(ws, "error")
        assert error["error"]["code"] == "upstream_stalled"
        sender.cancel()
    await asyncio.wait_for(relay.app[STATE].idle.wait(), 10)
    assert outcomes(relay) == {"upstream_stalled": 1}
    checked.set()


async def test_an_upstream_flooding_before_it_confirms_the_session_is_refused(
    start_fake, start_relay, http
):
    """Events before `session.updated` are held for the client: an upstream that sent on
    and on took the process from 67 MiB to 2 GiB in 4 s. Past 1 MiB the start fails."""
    from relay.session.setup import MAX_HELD_AT_START_BYTES

    async def flood(ws, fake: FakeUpstream) -> None:
        created = {"type": "session.created", "event_id": "e0", "session": {}}
        await ws.send_str(orjson.dumps(created).decode())
        await ws.receive()  # the relay's session defaults
        note = orjson.dumps({"type": "rate_limits.updated", "pad": "x" * 100_000}).decode()
        with contextlib.suppress(ConnectionError):
            for _ in range(2 * MAX_HELD_AT_START_BYTES // 100_000):
                await ws.send_str(note)
        await ws.receive()

    upstream = await start_fake(FakeUpstream(script=flood).app())
    endpoint = str(upstream.make_url(""))
    deployment = {
        "endpoint": endpoint,
        "credential": {"env": "TEST_AZURE_KEY"},
        "session": {"instructions": "Be brief."},
    }
    relay = await start_relay(relay_config(endpoint, deployments={"gpt-realtime": deployment}))
    async with http.get(url(relay), headers={"api-key": ALPHA_KEY, **UPGRADE}) as response:
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "upstream_protocol_error"


async def test_a_client_leaving_while_its_upstream_is_set_up_is_counted_not_a_500(
    start_fake, start_relay
):
    dialled, go = asyncio.Event(), asyncio.Event()

    async def slow_start(ws, fake: FakeUpstream) -> None:
        dialled.set()
        await go.wait()
        await echo(ws, fake)

    fake = FakeUpstream(script=slow_start)
    upstream = await start_fake(fake.app())
    relay = await start_relay(relay_config(str(upstream.make_url(""))))
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    head = (
        "GET /openai/v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: relay\r\n"
        f"api-key: {ALPHA_KEY}\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in UPGRADE.items())
        + "\r\n"
    )
    with structlog.testing.capture_logs() as logs:
        writer.write(head.encode())
        await dialled.wait()
        writer.transport.abort()  # the client gives up while the upstream starts
        go.set()
        await fake.closed.wait()
        refusals = relay.app[STATE].metrics.session_refusals.labels("alpha", "499", "client_gone")
        for _ in range(500):
            if refusals._value.get():
                break
            # The relay's handler ends once the upstream's close returns: no event of its
            # own to await from here.
            await asyncio.sleep(0.01)
    assert fake.close_code == 1001
    assert refusals._value.get() == 1
    assert [e for e in logs if e["event"] == "session_abandoned"]
    assert not [e for e in logs if e["log_level"] == "error"]
