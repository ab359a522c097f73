"""The relay over loopback: auth, routing, upstream refusals, close propagation, shutdown."""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
import structlog
from aiohttp import WSMsgType, web

from relay.simulator import SimulatorOptions, start_simulator
from relay.state import STATE
from tests.helpers import (
    ALPHA_KEY,
    AZURE_KEY,
    BETA_KEY,
    UPGRADE,
    FakeUpstream,
    b64,
    read_until,
    relay_config,
)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def ws_url(relay, path="/openai/v1/realtime", **query) -> str:
    query.setdefault("model", "gpt-realtime")
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    return f"http://127.0.0.1:{relay.port}{path}?{qs}"


async def refused(http, url, status, code, **kwargs):
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(url, **kwargs)
    assert info.value.status == status
    # The body says why, as JSON: fetch it again with a plain GET carrying the same upgrade.
    headers = {**UPGRADE, **kwargs.get("headers", {})}
    async with http.get(url, headers=headers) as response:
        assert response.status == status
        body = await response.json()
    assert body["error"]["code"] == code
    return info.value


# --- client authentication and routing ----------------------------------------------------


async def test_browser_subprotocol_key_gets_realtime_selected(simulator, start_relay, http):
    relay = await start_relay(relay_config(simulator.url))
    async with http.ws_connect(
        ws_url(relay), protocols=("realtime", f"openai-insecure-api-key.{ALPHA_KEY}")
    ) as ws:
        assert ws.protocol == "realtime"
        events = await read_until(ws, "session.created")
        assert events[0]["session"]["type"] == "realtime"


async def test_a_key_subprotocol_without_realtime_is_a_400_before_the_upstream_is_dialled(
    start_relay, start_fake, http, caplog
):
    """The relay can select none of the offered subprotocols (selecting the key's would echo
    it): upgraded, a browser aborts the handshake at once (1006), after an upstream session
    had been started for it."""
    fake = FakeUpstream()
    upstream = await start_fake(fake.app())
    relay = await start_relay(relay_config(str(upstream.make_url(""))))
    offer = f"openai-insecure-api-key.{ALPHA_KEY}, openai-project.p1"
    headers = {**UPGRADE, "Sec-WebSocket-Protocol": offer}
    async with http.get(ws_url(relay), headers=headers) as response:
        assert response.status == 400
        body = await response.json()
    assert body["error"]["code"] == "realtime_subprotocol_required"
    assert ALPHA_KEY not in str(body) and ALPHA_KEY not in caplog.text
    assert fake.requests == []


async def test_query_key_is_accepted_and_never_logged(simulator, start_relay, http):
    relay = await start_relay(relay_config(simulator.url))
    with structlog.testing.capture_logs() as logs:
        async with http.ws_connect(ws_url(relay, **{"api-key": ALPHA_KEY})) as ws:
            await read_until(ws, "session.created")
        await refused(http, ws_url(relay, **{"api-key": "wrong-key-123"}), 401, "invalid_api_key")
    dumped = repr(logs)
    assert ALPHA_KEY not in dumped and "wrong-key-123" not in dumped and AZURE_KEY not in dumped
    refusal = next(entry for entry in logs if entry["event"] == "session_refused")
    assert "api-key=REDACTED" in refusal["url"]


async def test_a_session_logs_its_own_lines_and_other_requests_the_access_line(
    simulator, start_relay, http
):
    """A session's record is `session_started` and `session_ended`; the access line would
    repeat `session_ended` as the handler ends. A refused upgrade is not a session: it logs
    its refusal and the access line."""
    relay = await start_relay(relay_config(simulator.url))
    with structlog.testing.capture_logs() as logs:
        async with http.ws_connect(ws_url(relay), headers={"api-key": ALPHA_KEY}) as ws:
            await read_until(ws, "session.created")
        await relay.app[STATE].idle.wait()
        await refused(http, ws_url(relay, **{"api-key": "wrong-key-123"}), 401, "invalid_api_key")
    events = [entry["event"] for entry in logs]
    assert events.count("session_started") == events.count("session_ended") == 1
    [ended] = [entry for entry in logs if entry["event"] == "session_ended"]
    assert ended["url"] == "/openai/v1/realtime?model=gpt-realtime"  # as the access line had
    access = [entry for entry in logs if entry["event"] == "http_request"]
    assert len(access) == 2  # `refused` asks twice: the upgrade, then a GET for the body
    assert all(line["status"] == 401 and "api-key=REDACTED" in line["url"] for line in access)


async def test_behind_a_trusted_proxy_every_line_names_the_client_not_the_proxy(
    simulator, start_relay, http
):
    """The refusal's line and the access line both give the address X-Forwarded-For names
    (the access line gave the proxy's, so a client's refusals could not be traced from it)."""
    relay = await start_relay(
        relay_config(simulator.url, server={"trusted_proxies": ["127.0.0.0/8"]})
    )
    forwarded = {"X-Forwarded-For": "203.0.113.7"}
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        await refused(
            http,
            ws_url(relay, **{"api-key": "wrong-key-123"}),
            401,
            "invalid_api_key",
            headers=forwarded,
        )
    refusal = next(entry for entry in logs if entry["event"] == "session_refused")
    access = [entry for entry in logs if entry["event"] == "http_request"]
    assert refusal["peer"] == "203.0.113.7"
    assert access and all(line["peer"] == "203.0.113.7" for line in access)


@pytest.mark.parametrize(
    ("headers", "code"),
    [({}, "missing_api_key"), ({"api-key": "nope"}, "invalid_api_key")],
)
async def test_missing_or_wrong_key_is_401_without_upstream(
    start_relay, start_fake, http, headers, code
):
    fake = FakeUpstream()
    upstream = await start_fake(fake.app())
    relay = await start_relay(relay_config(str(upstream.make_url(""))))
    await refused(http, ws_url(relay), 401, code, headers=headers)
    assert fake.requests == []


async def test_unknown_and_forbidden_deployments(simulator, start_relay, http):
    relay = await start_relay(relay_config(simulator.url))
    headers = {"api-key": ALPHA_KEY}
    await refused(http, ws_url(relay, model="nope"), 404, "deployment_not_found", headers=headers)
    await refused(
        http, ws_url(relay, model="other"), 403, "deployment_not_allowed", headers=headers
    )
    # Team beta may use `other`, not gpt-realtime.
    beta = {"api-key": BETA_KEY}
    await refused(http, ws_url(relay), 403, "deployment_not_allowed", headers=beta)
    await refused(http, ws_url(relay, path="/openai/v1/realtime"), 401, "missing_api_key")


async def test_missing_model_and_plain_http(simulator, start_relay, http):
    relay = await start_relay(relay_config(simulator.url))
    url = f"http://127.0.0.1:{relay.port}/openai/v1/realtime"
    await refused(http, url, 400, "missing_deployment", headers={"api-key": ALPHA_KEY})
    async with http.get(ws_url(relay), headers={"api-key": ALPHA_KEY}) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "websocket_required"


@pytest.mark.parametrize(
    "headers",
    [
        {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"},
        {"Upgrade": "websocket", "Connection": "keep-alive", "Sec-WebSocket-Key": "x" * 24},
        # A browser's offer of the `realtime` subprotocol: refusals usually go in band, after
        # an upgrade; a malformed one cannot be upgraded.
        {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Protocol": "realtime"},
    ],
)
async def test_a_malformed_upgrade_is_a_json_400_before_the_upstream_is_dialled(
    start_relay, start_fake, http, headers
):
    """aiohttp refused these only once the upgrade was under way, after the upstream session
    had started: in plain text ("Handshake error: None"), leaving its exception's traceback in
    a cycle with the connection."""
    fake = FakeUpstream()
    upstream = await start_fake(fake.app())
    relay = await start_relay(relay_config(str(upstream.make_url(""))))
    async with http.get(ws_url(relay), headers={"api-key": ALPHA_KEY, **headers}) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "websocket_handshake_invalid"
    assert fake.requests == []


# --- what goes upstream -------------------------------------------------------------------


async def test_upstream_gets_the_azure_url_and_credential_only(start_relay, start_fake, http):
    fake = FakeUpstream()
    upstream = await start_fake(fake.app())
    relay = await start_relay(relay_config(str(upstream.make_url(""))))
    url = ws_url(relay, path="/openai/realtime", deployment="gpt-realtime")
    url = url.replace("model=gpt-realtime", "api-version=2025-08-28")
    headers = {"api-key": ALPHA_KEY, "Authorization": f"Bearer {ALPHA_KEY}", "X-Extra": "1"}
    async with http.ws_connect(url, headers=headers) as ws:
        await read_until(ws, "session.created")
        await ws.send_str('{"type":"input_audio_buffer.clear"}')
        await read_until(ws, "input_audio_buffer.clear")  # the fake echoes
    [request] = fake.requests
    assert request["path"] == "/openai/v1/realtime"
    assert request["query"] == {"model": "az-gpt-realtime"}  # GA: no api-version
    sent = {k.lower(): v for k, v in request["headers"].items()}
    assert sent["api-key"] == AZURE_KEY
    assert "authorization" not in sent and "x-extra" not in sent and "openai-beta" not in sent
    assert sent["x-ms-client-request-id"].startswith("rs_")
    assert "permessage-deflate" not in sent.get("sec-websocket-extensions", "")
    # Frames pass through as the same bytes.
    assert fake.received == [b'{"type":"input_audio_buffer.clear"}']


async def test_preview_deployment_gets_the_preview_url(start_relay, start_fake, http):
    fake = FakeUpstream()
    upstream = await start_fake(fake.app())
    config = relay_config(
        str(upstream.make_url("")),
        deployments={
            "gpt-realtime": {
                "endpoint": str(upstream.make_url("")),
                "protocol": "preview",
                "api_version": "2025-04-01-preview",
                "credential": {"env": "TEST_AZURE_KEY"},
            }
        },
    )
    relay = await start_relay(config)
    async with http.ws_connect(ws_url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
    [request] = fake.requests
    assert request["path"] == "/openai/realtime"
    assert request["query"] == {"api-version": "2025-04-01-preview", "deployment": "gpt-realtime"}


# --- upstream refusals become honest HTTP answers ----------------------------------------


async def test_upstream_down_is_502(start_relay, http):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connection refused
        relay = await start_relay(relay_config(f"http://127.0.0.1:{port}"))
        await refused(
            http, ws_url(relay), 502, "upstream_unavailable", headers={"api-key": ALPHA_KEY}
        )


async def test_upstream_401_is_502_with_a_generic_message(simulator, start_relay, http):
    relay = await start_relay(relay_config(simulator.url), environ={"TEST_AZURE_KEY": "wrong"})
    error = await refused(
        http, ws_url(relay), 502, "upstream_auth_failed", headers={"api-key": ALPHA_KEY}
    )
    assert error.status == 502


async def test_upstream_429_passes_retry_after(start_relay, start_fake, http):
    fake = FakeUpstream(refuse_status=429, refuse_headers={"Retry-After": "17"})
    upstream = await start_fake(fake.app())
    relay = await start_relay(relay_config(str(upstream.make_url(""))))
    error = await refused(
        http, ws_url(relay), 429, "upstream_rate_limited", headers={"api-key": ALPHA_KEY}
    )
    assert error.headers["Retry-After"] == "17"


async def test_upstream_500_is_502(start_relay, start_fake, http):
    upstream = await start_fake(FakeUpstream(refuse_status=500).app())
    relay = await start_relay(relay_config(str(upstream.make_url(""))))
    await refused(http, ws_url(relay), 502, "upstream_error", headers={"api-key": ALPHA_KEY})


async def test_upstream_handshake_timeout_is_504(start_relay, http):
    accepted = asyncio.Event()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()  # until the relay gives up and closes
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        config = relay_config(f"http://127.0.0.1:{port}", upstream={"connect_timeout_seconds": 0.2})
        relay = await start_relay(config)
        await refused(http, ws_url(relay), 504, "upstream_timeout", headers={"api-key": ALPHA_KEY})
        assert accepted.is_set()
    finally:
        server.close()
        await server.wait_closed()


# --- close propagation --------------------------------------------------------------------


async def test_client_close_code_reaches_the_upstream(start_relay, start_fake, http):
    fake = FakeUpstream()
    upstream = await start_fake(fake.app())
    relay = await start_relay(relay_config(str(upstream.make_url(""))))
    ws = await http.ws_connect(ws_url(relay), headers={"api-key": ALPHA_KEY})
    await read_until(ws, "session.created")
    await ws.close(code=4001, message=b"app closing")
    await fake.closed.wait()
    assert fake.close_code == 4001


async def test_client_vanishing_closes_the_upstream(start_relay, start_fake):
    fake = FakeUpstream()
    upstream = await start_fake(fake.app())
    relay = await start_relay(relay_config(str(upstream.make_url(""))))
    async with aiohttp.ClientSession() as own:
        ws = await own.ws_connect(ws_url(relay), headers={"api-key": ALPHA_KEY})
        await read_until(ws, "session.created")
        # Tear the TCP connection down without a close frame.
        ws._response.connection.transport.abort()
        await fake.closed.wait()
    assert fake.close_code == 1001


async def test_the_relays_own_cancel_meeting_an_ended_response_is_no_upstream_error(
    start_relay, start_fake
):
    """A client that leaves mid-response gets its response cancelled by the relay (it is
    billed); when the response had just ended, the service's `response_cancel_not_active`
    for the relay's own cancel was counted and logged as the upstream's error (noise in the
    Errors panel). A cancel the client sent itself is still counted."""
    errors = []

    async def ended_just_before(ws: web.WebSocketResponse, fake: FakeUpstream) -> None:
        await ws.send_str('{"type":"session.created","event_id":"e","session":{}}')
        async for msg in ws:
            event = orjson.loads(msg.data)
            if event["type"] == "response.create":
                await ws.send_str('{"type":"response.created","response":{"id":"resp_1"}}')
            elif event["type"] == "response.cancel":
                error = {"type": "invalid_request_error", "code": "response_cancel_not_active",
                         "message": "Cancellation failed: no active response found",
                         "event_id": event.get("event_id")}  # fmt: skip
                errors.append(event.get("event_id"))
                await ws.send_str(orjson.dumps({"type": "error", "error": error}).decode())
                done = {
                    "type": "response.done",
                    "response": {"id": "resp_1", "status": "completed"},
                }
                await ws.send_str(orjson.dumps(done).decode())

    upstream = await start_fake(FakeUpstream(script=ended_just_before).app())
    relay = await start_relay(relay_config(str(upstream.make_url(""))))
    state = relay.app[STATE]
    with structlog.testing.capture_logs() as logs:
        async with aiohttp.ClientSession() as own:
            ws = await own.ws_connect(ws_url(relay), headers={"api-key": ALPHA_KEY})
            await read_until(ws, "session.created")
            await ws.send_str('{"type":"response.cancel","event_id":"mine"}')
            await read_until(ws, "error")
            # A client sending the relay's own id does not hide its error.
            await ws.send_str('{"type":"response.cancel","event_id":"relay_settle"}')
            await read_until(ws, "error")
            await ws.send_str('{"type":"response.create"}')
            await read_until(ws, "response.created")
            ws._response.connection.transport.abort()  # gone mid-response
            await state.idle.wait()
    assert errors == ["mine", "relay_settle", "relay_settle"]
    counted = state.metrics.registry.get_sample_value(
        "relay_upstream_error_events_total",
        {"deployment": "gpt-realtime", "code": "response_cancel_not_active"},
    )
    assert counted == 2  # the client's own
    events = [e.get("event_id") for e in logs if e["event"] == "upstream_error_event"]
    assert events == ["mine", "relay_settle"]


async def test_upstream_close_code_reaches_the_client(start_relay, start_fake, http):
    async def close_with_code(ws: web.WebSocketResponse, fake: FakeUpstream) -> None:
        await ws.send_str('{"type":"session.created","event_id":"e","session":{}}')
        await ws.close(code=4321, message=b"upstream says bye")

    upstream = await start_fake(FakeUpstream(script=close_with_code).app())
    relay = await start_relay(relay_config(str(upstream.make_url(""))))
    async with http.ws_connect(ws_url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        msg = await ws.receive()
        assert msg.type == WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (4321, "upstream says bye")


async def test_upstream_dropping_mid_stream_gives_error_and_1011(start_relay, start_fake, http):
    async def drop(ws: web.WebSocketResponse, fake: FakeUpstream) -> None:
        await ws.send_str('{"type":"session.created","event_id":"e","session":{}}')
        await ws.receive()  # the client's first event, then the TCP connection goes
        ws._req.transport.abort()

    upstream = await start_fake(FakeUpstream(script=drop).app())
    relay = await start_relay(relay_config(str(upstream.make_url(""))))
    async with http.ws_connect(ws_url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        await ws.send_str('{"type":"response.create"}')
        [error] = await read_until(ws, "error")
        assert error["error"]["code"] == "upstream_disconnected"
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1011)


async def test_binary_frames_get_an_error_and_the_session_goes_on(simulator, start_relay, http):
    relay = await start_relay(relay_config(simulator.url))
    async with http.ws_connect(ws_url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        await ws.send_bytes(b"\x00\x01")
        [error] = await read_until(ws, "error")
        assert error["error"]["code"] == "invalid_frame_type"
        await ws.send_str('{"type":"input_audio_buffer.clear"}')
        await read_until(ws, "input_audio_buffer.cleared")


async def test_shutdown_closes_sessions_with_1001_and_an_error(simulator, start_relay, http):
    relay = await start_relay(relay_config(simulator.url))
    ws = await http.ws_connect(ws_url(relay), headers={"api-key": ALPHA_KEY})
    await read_until(ws, "session.created")
    closing = asyncio.ensure_future(relay.close())
    [error] = await read_until(ws, "error")
    assert error["error"]["code"] == "relay_shutting_down"
    msg = await ws.receive()
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
    await closing


# --- probes and the embedded simulator ----------------------------------------------------


async def test_health_and_readiness(simulator, start_relay, http):
    relay = await start_relay(relay_config(simulator.url))
    async with http.get(f"http://127.0.0.1:{relay.port}/healthz") as response:
        assert (response.status, await response.json()) == (200, {"status": "ok"})
    async with http.get(f"http://127.0.0.1:{relay.port}/readyz") as response:
        assert (response.status, await response.json()) == (200, {"status": "ready"})


async def test_embedded_simulator_serves_the_simulator_endpoint(start_relay, http):
    relay = await start_relay(relay_config("simulator"))
    async with http.ws_connect(ws_url(relay), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        # The simulator accepted the key the relay holds, and answers.
        await ws.send_str(orjson.dumps({"type": "input_audio_buffer.clear"}).decode())
        await read_until(ws, "input_audio_buffer.cleared")


# --- sizes the API allows, and the service's own errors -------------------------------------


async def test_the_largest_append_and_its_whole_item_pass_both_ways(simulator, start_relay, http):
    """15 MiB of audio in one append (~20 MiB of JSON) reaches the service, and the item it
    becomes comes back whole in `conversation.item.retrieved`, with the default limits."""
    relay = await start_relay(relay_config(simulator.url))
    audio = bytes(range(256)) * (15 * 1024 * 1024 // 256)
    async with http.ws_connect(ws_url(relay), headers={"api-key": ALPHA_KEY}, max_msg_size=0) as ws:
        await read_until(ws, "session.created")
        no_vad = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}
        await ws.send_str(orjson.dumps({"type": "session.update", "session": no_vad}).decode())
        await read_until(ws, "session.updated")
        append = orjson.dumps({"type": "input_audio_buffer.append", "audio": b64(audio)})
        assert len(append) > 20 * 1024 * 1024
        await ws.send_str(append.decode())
        await ws.send_str('{"type":"input_audio_buffer.commit"}')
        [*_, committed] = await read_until(ws, "input_audio_buffer.committed")
        retrieve = {"type": "conversation.item.retrieve", "item_id": committed["item_id"]}
        await ws.send_str(orjson.dumps(retrieve).decode())
        [*_, retrieved] = await read_until(ws, "conversation.item.retrieved")
        assert base64.b64decode(retrieved["item"]["content"][0]["audio"]) == audio


async def test_upstream_error_events_are_logged_and_counted(simulator, start_relay, http):
    relay = await start_relay(relay_config(simulator.url))
    with structlog.testing.capture_logs() as logs:
        async with http.ws_connect(ws_url(relay), headers={"api-key": ALPHA_KEY}) as ws:
            await read_until(ws, "session.created")
            retrieve = {"type": "conversation.item.retrieve", "item_id": "nope", "event_id": "c7"}
            await ws.send_str(orjson.dumps(retrieve).decode())
            [*_, error] = await read_until(ws, "error")
            assert error["error"]["code"] == "invalid_value"
    [logged] = [entry for entry in logs if entry["event"] == "upstream_error_event"]
    assert {k: logged[k] for k in ("error_type", "code", "param", "event_id")} == {
        "error_type": "invalid_request_error",
        "code": "invalid_value",
        "param": "item_id",
        "event_id": "c7",
    }
    assert "message" not in logged  # it may quote the client's input
    metrics = relay.app[STATE].metrics.registry
    labels = {"deployment": "gpt-realtime", "code": "invalid_value"}
    assert metrics.get_sample_value("relay_upstream_error_events_total", labels) == 1


async def test_the_service_ending_an_expired_session_reaches_the_client_as_1001(start_relay, http):
    options = SimulatorOptions(api_keys=frozenset({AZURE_KEY}), speed=0, max_session_seconds=0.3)
    async with await start_simulator(options) as simulator:
        relay = await start_relay(relay_config(simulator.url))
        async with http.ws_connect(ws_url(relay), headers={"api-key": ALPHA_KEY}) as ws:
            await read_until(ws, "session.created")
            [*_, error] = await read_until(ws, "error")
            assert error["error"]["code"] == "session_expired"
            msg = await ws.receive()
            assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
