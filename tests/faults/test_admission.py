"""Admission and abuse: caps, rates, the brake on failed authentication, Origins, headers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
import structlog

from relay.edge.admission import AuthThrottle, MemoryAdmission, TokenBucket
from relay.edge.auth import hash_key
from relay.errors import ClientRefused
from relay.ops.config import LimitsConfig, TeamLimits
from relay.state import STATE
from tests.helpers import ALPHA_KEY, BETA_KEY, read_until, relay_config

UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --- pure ---------------------------------------------------------------------------------


def test_token_bucket():
    bucket = TokenBucket.full(2.0, now=0.0)
    assert bucket.take(0.0) == 0 and bucket.take(0.0) == 0
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0


async def test_memory_admission_caps_and_rates():
    clock = Clock()
    admission = MemoryAdmission(
        LimitsConfig(max_sessions=3, max_new_sessions_per_second=100),
        {"a": TeamLimits(max_sessions=2), "b": TeamLimits(max_new_sessions_per_second=1)},
        clock,
    )
    a1, a2 = await admission.acquire("a"), await admission.acquire("a")
    with pytest.raises(ClientRefused) as info:
        await admission.acquire("a")
    assert (info.value.status, info.value.code, info.value.retry_after) == (
        429,
        "team_session_limit",
        "1",
    )
    b1 = await admission.acquire("b")
    with pytest.raises(ClientRefused) as info:
        await admission.acquire("c")  # the relay is full
    assert (info.value.status, info.value.code) == (503, "relay_full")
    await a1.release()
    await a1.release()  # twice is harmless
    with pytest.raises(ClientRefused) as info:
        await admission.acquire("b")  # b's rate: one a second
    assert (info.value.status, info.value.code, info.value.retry_after) == (
        429,
        "team_rate_limit",
        "1",
    )
    clock.now = 1.0
    b2 = await admission.acquire("b")
    for lease in (a2, b1, b2):
        await lease.release()
    assert admission.active == 0


async def test_auth_throttle_blocks_then_forgets():
    clock = Clock()
    throttle = AuthThrottle(3, 60.0, 30.0, clock, max_addresses=2)
    for _ in range(3):
        await throttle.check("10.0.0.1")
        await throttle.failed("10.0.0.1")
    with pytest.raises(ClientRefused) as info:
        await throttle.check("10.0.0.1")
    assert (info.value.status, info.value.retry_after) == (429, "30")
    clock.now = 31.0
    await throttle.check("10.0.0.1")
    await throttle.failed("a")
    await throttle.failed("b")
    await throttle.failed("c")
    assert len(throttle._seen) == 2  # bounded


# --- over sockets --------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def url(relay) -> str:
    return str(relay.make_url("/openai/v1/realtime?model=gpt-realtime"))


async def status_of(http, relay, **headers) -> tuple[int, str | None, str | None]:
    async with http.get(url(relay), headers={**UPGRADE, **headers}) as response:
        code = (await response.json())["error"]["code"] if response.status != 101 else None
        return response.status, code, response.headers.get("Retry-After")


async def test_team_session_cap_is_429_and_frees_on_close(simulator, start_relay, http):
    config = relay_config(
        simulator.url,
        teams={
            "alpha": {
                "keys": [hash_key(ALPHA_KEY)],
                "deployments": ["gpt-realtime"],
                "limits": {"max_sessions": 2},
            }
        },
    )
    relay = await start_relay(config)
    first = await http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY})
    second = await http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY})
    assert await status_of(http, relay, **{"api-key": ALPHA_KEY}) == (
        429,
        "team_session_limit",
        "1",
    )
    await first.close()
    await second.close()
    await relay.app[STATE].idle.wait()  # both sessions over: their slots are back
    third = await http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY})
    fourth = await http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY})
    await read_until(fourth, "session.created")
    await third.close()
    await fourth.close()


async def test_relay_full_is_503_for_everyone(simulator, start_relay, http):
    relay = await start_relay(relay_config(simulator.url, limits={"max_sessions": 1}))
    first = await http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY})
    assert await status_of(http, relay, **{"api-key": ALPHA_KEY}) == (503, "relay_full", "1")
    await first.close()


async def test_new_session_rate(simulator, start_relay, http):
    relay = await start_relay(
        relay_config(simulator.url, limits={"max_new_sessions_per_second": 1})
    )
    ws = await http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY})
    await ws.close()
    status, code, retry_after = await status_of(http, relay, **{"api-key": ALPHA_KEY})
    assert (status, code) == (503, "relay_rate_limit") and int(retry_after) >= 1


async def test_repeated_auth_failures_are_refused_for_a_while(simulator, start_relay, http):
    relay = await start_relay(relay_config(simulator.url, limits={"auth_failures_allowed": 3}))
    for _ in range(3):
        assert (await status_of(http, relay, **{"api-key": "guess"}))[:2] == (
            401,
            "invalid_api_key",
        )
    # Now even the right key is refused from this address, without being checked.
    status, code, retry_after = await status_of(http, relay, **{"api-key": ALPHA_KEY})
    assert (status, code) == (429, "too_many_auth_failures") and int(retry_after) > 1


async def test_a_success_does_not_reset_the_failure_count(simulator, start_relay, http):
    relay = await start_relay(relay_config(simulator.url, limits={"auth_failures_allowed": 3}))
    guess = {"api-key": "rk-guessing-0123456789"}
    for _ in range(2):
        assert (await status_of(http, relay, **guess))[:2] == (401, "invalid_api_key")
    # A valid key in between (one team's) does not buy the address more guesses.
    ws = await http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY})
    await ws.close()
    assert (await status_of(http, relay, **guess))[:2] == (401, "invalid_api_key")
    status, code, _ = await status_of(http, relay, **{"api-key": ALPHA_KEY})
    assert (status, code) == (429, "too_many_auth_failures")


async def test_status_attempts_count_toward_the_brake(simulator, start_relay, http):
    admin_key = "rk-admin-0123456789"
    config = relay_config(
        simulator.url,
        limits={"auth_failures_allowed": 3},
        admin={"keys": [hash_key(admin_key)]},
    )
    relay = await start_relay(config)

    async def status_page(key: str) -> tuple[int, str | None]:
        async with http.get(relay.make_url("/status"), headers={"api-key": key}) as response:
            body = await response.json()
            return response.status, body.get("error", {}).get("code")

    assert await status_page(admin_key) == (200, None)
    for _ in range(3):
        assert await status_page("rk-admin-guess-0123") == (401, "invalid_admin_key")
    assert await status_page(admin_key) == (429, "too_many_auth_failures")
    # One brake per address: the realtime endpoint is closed to it too.
    status, code, _ = await status_of(http, relay, **{"api-key": ALPHA_KEY})
    assert (status, code) == (429, "too_many_auth_failures")


async def test_allowed_origins(simulator, start_relay, http):
    config = relay_config(simulator.url, server={"allowed_origins": ["https://app.example.com"]})
    relay = await start_relay(config)
    key = {"api-key": ALPHA_KEY}
    assert (await status_of(http, relay, Origin="https://evil.example.com", **key))[:2] == (
        403,
        "origin_not_allowed",
    )
    ws = await http.ws_connect(url(relay), headers=key, origin="https://app.example.com")
    await ws.close()
    ws = await http.ws_connect(url(relay), headers=key)  # no Origin: not a browser
    await ws.close()


async def test_oversize_headers_are_refused(simulator, start_relay, http):
    relay = await start_relay(relay_config(simulator.url, server={"max_header_bytes": 4096}))
    async with http.get(
        url(relay), headers={**UPGRADE, "api-key": ALPHA_KEY, "X-Big": "x" * 8000}
    ) as response:
        assert response.status in (400, 431)


async def test_beta_key_cannot_use_alpha_deployment_even_with_capacity(
    simulator, start_relay, http
):
    relay = await start_relay(relay_config(simulator.url))
    assert (await status_of(http, relay, **{"api-key": BETA_KEY}))[:2] == (
        403,
        "deployment_not_allowed",
    )


async def test_a_key_that_is_not_utf8_is_a_wrong_key_counted_by_the_brake(simulator, start_relay):
    """A key's bytes that are not UTF-8 got a 500 and an error-level traceback, and were
    never counted: any client could flood the log. Now a 401 like any wrong key."""
    relay = await start_relay(relay_config(simulator.url, limits={"auth_failures_allowed": 3}))
    head = (
        b"GET /openai/v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: relay\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\napi-key: rk-\xff\xfe-guess\r\n\r\n"
    )

    async def answer() -> tuple[int, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        try:
            writer.write(head)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            body = orjson.loads(await reader.readexactly(length))
            return int(status_line.split()[1]), body["error"]["code"]
        finally:
            writer.close()

    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            assert await answer() == (401, "invalid_api_key")
        assert await answer() == (429, "too_many_auth_failures")
    assert not [e for e in logs if e["log_level"] == "error"]
