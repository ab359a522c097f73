"""No secret in any byte the relay writes.

A real `relay serve` at debug level goes through the fault suite: upstream 400 (quoting the
credential it got), 401, 403, 500, 503, a handshake that never answers and an unreachable
upstream, on the WebSocket and the WebRTC paths, with an api-key and an Entra credential;
relay keys in every accepted place and in the query forms it does not accept; wrong keys;
oversized request lines and headers carrying keys; client secrets minted and used. Then every
byte of its stdout and stderr, /metrics (both listeners), /status and every response (status
line, headers, body) is searched for every secret in play.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from pathlib import Path

import aiohttp
import orjson
from aiohttp import WSMsgType, web

from relay.edge.auth import hash_key
from tests.entra_fake import IDENTITY_HEADER, PATH, FakeIdentityEndpoint
from tests.helpers import UPGRADE
from tests.processes import free_port, relay_process
from tests.test_webrtc import OFFER

ALPHA = f"rk-alpha-{secrets.token_hex(12)}"
WRONG = f"rk-wrong-{secrets.token_hex(12)}"
ADMIN = f"rk-admin-{secrets.token_hex(12)}"
WRONG_ADMIN = f"rk-wrongadmin-{secrets.token_hex(12)}"
METRICS_TOKEN = f"mt-{secrets.token_hex(12)}"
SIMULATOR_KEY = f"azure-sim-{secrets.token_hex(12)}"
FAULT_KEY = f"azure-fault-{secrets.token_hex(12)}"
FAULTS = ("400", "401", "403", "500", "503", "hang")

CONFIG = """
[server]
port = 0
close_timeout_seconds = 1
max_header_bytes = 4096
[upstream]
connect_timeout_seconds = 1
[metrics]
port = {metrics_port}
on_main_port = true
token_env = "LEAK_METRICS_TOKEN"
[logging]
level = "debug"
format = "json"
[simulator]
speed = 0
[limits]
auth_failures_allowed = 1000
[admin]
keys = ["{admin}"]
[deployments.gpt-realtime]
endpoint = "simulator"
credential = {{ env = "LEAK_SIMULATOR_KEY" }}
{faults}
[teams.alpha]
keys = ["{alpha}"]
deployments = [{deployments}]
"""


def fault_deployments(upstream: str, closed_port: int) -> dict[str, str]:
    """Deployment name -> its TOML table."""
    tables = {}
    for fault in FAULTS:
        for credential in ("key", "entra"):
            spec = (
                '{ env = "LEAK_FAULT_KEY" }'
                if credential == "key"
                else '{ type = "entra", method = "managed-identity" }'
            )
            tables[f"{credential}-{fault}"] = (
                f'endpoint = "{upstream}/{fault}"\ncredential = {spec}'
            )
    tables["unreachable"] = (
        f'endpoint = "http://127.0.0.1:{closed_port}"\ncredential = {{ env = "LEAK_FAULT_KEY" }}'
    )
    return tables


class FaultyAzure:
    """Answers every request with the fault its path names; a 400 quotes the credential."""

    def __init__(self) -> None:
        self.requests = 0
        self.released = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{fault}/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        fault = request.match_info["fault"]
        if fault == "hang":
            await self.released.wait()
            return web.Response(status=503)
        credential = request.headers.get("api-key") or request.headers.get("Authorization", "")
        error = {"code": f"fault_{fault}", "message": f"refused: you sent {credential}"}
        return web.json_response({"error": error}, status=int(fault))


async def test_no_secret_in_any_byte_the_relay_writes(tmp_path: Path, aiohttp_server):
    identity = FakeIdentityEndpoint(time.time, lifetime=3600)
    identity_server = await aiohttp_server(identity.app())
    azure = FaultyAzure()
    azure_server = await aiohttp_server(azure.app())
    tables = fault_deployments(str(azure_server.make_url("")).rstrip("/"), free_port())
    config = tmp_path / "relay.toml"
    config.write_text(
        CONFIG.format(
            metrics_port=(metrics_port := free_port()),
            admin=hash_key(ADMIN),
            alpha=hash_key(ALPHA),
            faults="".join(f"[deployments.{n}]\n{t}\n" for n, t in tables.items()),
            deployments=", ".join(f'"{n}"' for n in ["gpt-realtime", *tables]),
        )
    )
    env = {
        "LEAK_SIMULATOR_KEY": SIMULATOR_KEY,
        "LEAK_FAULT_KEY": FAULT_KEY,
        "LEAK_METRICS_TOKEN": METRICS_TOKEN,
        "IDENTITY_ENDPOINT": str(identity_server.make_url(PATH)),
        "IDENTITY_HEADER": IDENTITY_HEADER,
    }
    stdout, stderr = bytearray(), bytearray()
    answers: list[bytes] = []  # every response (status line, headers, body) and frame
    minted: list[str] = []
    async with relay_process(config, env, stdout=stdout, stderr=stderr) as (process, base):
        async with aiohttp.ClientSession() as http:
            await run_faults(http, base, metrics_port, answers, minted)
            for raw in await oversized_heads(base):
                answers.append(raw)
        process.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
    azure.released.set()

    lines = bytes(stdout).splitlines()
    events = [orjson.loads(line) for line in lines]  # every line is JSON, the stdlib's too
    seen = {e["event"] for e in events}
    for expected in (
        "session_started", "session_refused", "upstream_connect_failed", "webrtc_refused",
        "client_secret_minted", "call_placed", "request_head_too_large", "http_request",
        "relay_stopped",
    ):  # fmt: skip
        assert expected in seen, f"the fault suite did not log {expected}"
    # A stdlib logger's line came through as JSON too (msal logs the token answer at debug).
    assert any(e.get("logger", "").startswith("msal") for e in events)
    assert identity.issued and minted and azure.requests >= 2 * len(FAULTS)

    everything = b"\n".join([bytes(stdout), bytes(stderr), *answers])
    in_play = [
        ALPHA, WRONG, ADMIN, WRONG_ADMIN, METRICS_TOKEN, SIMULATOR_KEY, FAULT_KEY,
        *identity.issued, *minted,
    ]  # fmt: skip
    for secret in in_play:
        for text in (secret, secret[:16]):  # the start of one too (a truncated echo)
            assert text.encode() not in everything, f"leaked: {secret[:8]}…"


async def run_faults(
    http: aiohttp.ClientSession,
    base: str,
    metrics_port: int,
    answers: list[bytes],
    minted: list[str],
) -> None:
    realtime = f"{base}/openai/v1/realtime"

    async def keep(response: aiohttp.ClientResponse) -> bytes:
        body = await response.read()
        head = f"{response.status} {response.reason}\n{response.raw_headers!r}\n"
        answers.append(head.encode() + body)
        return body

    upgrade = UPGRADE

    # Sessions with the key in every accepted place.
    for query, kwargs in (
        ("", {"headers": {"api-key": ALPHA}}),
        ("", {"headers": {"Authorization": f"Bearer {ALPHA}"}}),
        ("", {"protocols": ("realtime", f"openai-insecure-api-key.{ALPHA}")}),
        (f"&api-key={ALPHA}", {}),
        (f"&Authorization=Bearer%20{ALPHA}", {}),
    ):
        async with http.ws_connect(f"{realtime}?model=gpt-realtime{query}", **kwargs) as ws:
            await ws.send_str('{"type":"not.allowed"}')
            await ws.send_str('{"type":"response.create"}')
            async for msg in ws:
                answers.append(str(msg.data).encode())
                if msg.type == WSMsgType.TEXT and '"response.done"' in msg.data:
                    break

    # Query forms the relay does not accept, wrong keys everywhere.
    for query in (
        f"api_key={ALPHA}", f"key={ALPHA}", f"token={ALPHA}", f"api-key={WRONG}",
        f"Authorization=Bearer%20{WRONG}", f"sig={WRONG}",
    ):  # fmt: skip
        async with http.get(f"{realtime}?model=gpt-realtime&{query}", headers=upgrade) as r:
            await keep(r)
    for headers in (
        {"api-key": WRONG},
        {"Authorization": f"Bearer {WRONG}"},
        {"Sec-WebSocket-Protocol": f"realtime, openai-insecure-api-key.{WRONG}"},
    ):
        async with http.get(f"{realtime}?model=gpt-realtime", headers={**upgrade, **headers}) as r:
            await keep(r)

    # Upstream faults on the WebSocket path, with an api-key and an Entra token.
    deployments = [f"{c}-{f}" for f in FAULTS for c in ("key", "entra")] + ["unreachable"]
    for deployment in deployments:
        async with http.get(
            f"{realtime}?model={deployment}", headers={**upgrade, "api-key": ALPHA}
        ) as r:
            await keep(r)
            assert r.status >= 400

    # The same on the WebRTC path: minting and calls.
    secrets_url, calls_url = f"{realtime}/client_secrets", f"{realtime}/calls"
    sdp = {"Content-Type": "application/sdp"}
    for deployment in deployments:
        body = {"session": {"type": "realtime", "model": deployment}}
        async with http.post(secrets_url, json=body, headers={"api-key": ALPHA}) as r:
            await keep(r)
            assert r.status >= 400
        async with http.post(
            f"{calls_url}?model={deployment}", data=OFFER, headers={"api-key": ALPHA, **sdp}
        ) as r:
            await keep(r)
            assert r.status >= 400

    # A secret minted and used; a wrong one; a wrong key.
    body = {"session": {"type": "realtime", "model": "gpt-realtime"}}
    async with http.post(secrets_url, json=body, headers={"api-key": ALPHA}) as r:
        assert r.status == 200
        value = (await r.json())["value"]
        minted.append(value)  # the one answer that must carry it: not searched
    async with http.post(
        calls_url, data=OFFER, headers={"Authorization": f"Bearer {value}", **sdp}
    ) as r:
        await keep(r)
        assert r.status == 201
    for key in (f"ek_{secrets.token_hex(16)}", WRONG):
        async with http.post(calls_url, data=OFFER, headers={"api-key": key, **sdp}) as r:
            await keep(r)
            assert r.status == 401

    # The admin and metrics endpoints, with right and wrong credentials.
    for key in (ADMIN, WRONG_ADMIN):
        async with http.get(f"{base}/status", headers={"api-key": key}) as r:
            await keep(r)
    for token in (METRICS_TOKEN, WRONG):
        async with http.get(f"{base}/metrics", headers={"Authorization": f"Bearer {token}"}) as r:
            await keep(r)
    async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
        assert b"relay_sessions_total" in await keep(r)


async def oversized_heads(base: str) -> list[bytes]:
    """Request lines and headers over max_header_bytes, carrying keys."""
    port = int(base.rsplit(":", 1)[1])
    heads = [
        f"GET /openai/v1/realtime?model=gpt-realtime&api_key={ALPHA}&pad={'x' * 6000} HTTP/1.1"
        "\r\nHost: relay\r\n\r\n",
        f"GET /openai/v1/realtime?api-key={WRONG}{'x' * 6000} HTTP/1.1\r\nHost: relay\r\n\r\n",
        f"GET /healthz HTTP/1.1\r\nHost: relay\r\napi-key: {ALPHA}{'x' * 6000}\r\n\r\n",
        f"GET /healthz HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {WRONG}{'x' * 6000}\r\n\r\n",
    ]
    answers = []
    for head in heads:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head.encode())
        answer = await reader.read()
        writer.close()
        assert answer.split(b"\r\n")[0].endswith(b" 400 Bad Request")
        assert b'"request_head_too_large"' in answer
        answers.append(answer)
    return answers
