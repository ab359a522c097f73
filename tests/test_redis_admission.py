"""Limits shared through a real Redis: across processes, after a crash, and when Redis dies."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from structlog.testing import capture_logs

from relay.edge.admission_redis import RedisAdmission, window
from relay.edge.auth import hash_key
from relay.errors import ClientRefused
from relay.ops.config import AdmissionConfig, LimitsConfig, TeamLimits
from relay.state import STATE
from tests.helpers import ALPHA_KEY, BETA_KEY, ENVIRON, UPGRADE, read_until, relay_config
from tests.processes import needs_redis, redis_server, relay_process

pytestmark = needs_redis

CAPPED_KEY = "rk-capped-team-key"
CONFIG = """
[server]
port = 0
close_timeout_seconds = 1
[metrics]
enabled = false
[logging]
format = "json"
[simulator]
speed = 0
[admission]
backend = "redis"
slot_ttl_seconds = {ttl}
[deployments.gpt-realtime]
endpoint = "simulator"
credential = {{ env = "RELAY_SIMULATOR_KEY" }}
[teams.capped]
keys = ["{key}"]
deployments = ["gpt-realtime"]
limits = {{ max_sessions = 3 }}
"""


def test_rate_windows():
    assert window(None) == (1000, -1)
    assert window(5) == (1000, 5)
    assert window(0.5) == (2000, 1)
    assert window(2.5) == (1000, 2)


async def test_caps_rates_release_and_refresh(tmp_path):
    async with redis_server(tmp_path) as url:
        store = RedisAdmission.connect(
            AdmissionConfig(backend="redis", slot_ttl_seconds=1.0),
            LimitsConfig(max_sessions=10),
            {"a": TeamLimits(max_sessions=2), "b": TeamLimits(max_new_sessions_per_second=1)},
            url,
        )
        await store.start()
        try:
            a1, a2 = await store.acquire("a"), await store.acquire("a")
            with pytest.raises(ClientRefused) as info:
                await store.acquire("a")
            assert (info.value.status, info.value.code) == (429, "team_session_limit")
            await a1.release()
            a3 = await store.acquire("a")
            await store.acquire("b")
            with pytest.raises(ClientRefused) as info:
                await store.acquire("b")
            assert info.value.code == "team_rate_limit" and int(info.value.retry_after) >= 1
            # Refreshed slots outlive their TTL: after 1.5 TTLs the cap still holds.
            for _ in range(3):
                await store.refresh()
                await asyncio.sleep(0.5)  # real time must pass for Redis's clock to expire slots
            with pytest.raises(ClientRefused):
                await store.acquire("a")
            for lease in (a2, a3):
                await lease.release()
        finally:
            await store.close()


async def test_a_team_cap_holds_across_two_processes_and_a_killed_process_frees_its_slots(tmp_path):
    config = tmp_path / "relay.toml"
    config.write_text(CONFIG.format(ttl=1.5, key=hash_key(CAPPED_KEY)))
    async with redis_server(tmp_path) as url:
        env = {"RELAY_SIMULATOR_KEY": "sim", "RELAY_REDIS_URL": url}
        async with (
            relay_process(config, env) as (first, first_url),
            relay_process(config, env) as (
                _,
                second_url,
            ),
            aiohttp.ClientSession() as http,
        ):

            async def connect(base: str) -> aiohttp.ClientWebSocketResponse:
                ws = await http.ws_connect(
                    f"{base}/openai/v1/realtime?model=gpt-realtime", headers={"api-key": CAPPED_KEY}
                )
                await read_until(ws, "session.created")
                return ws

            held = [await connect(first_url), await connect(first_url), await connect(second_url)]
            for base in (first_url, second_url):
                with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                    await connect(base)
                assert info.value.status == 429
            # The first process dies without releasing its two slots...
            first.kill()
            await first.wait()

            # ...which expire with their TTL (Redis's clock): then sessions are admitted again.
            async def once_expired() -> aiohttp.ClientWebSocketResponse:
                for _ in range(50):
                    try:
                        return await connect(second_url)
                    except aiohttp.WSServerHandshakeError as exc:
                        assert exc.status == 429
                        await asyncio.sleep(0.1)  # waiting on Redis's clock, not on an event
                raise AssertionError("the dead process's slot never expired")

            admitted = await once_expired()
            # Both of the dead process's slots come back (each expires a TTL after its own
            # last refresh, so the second may be a refresh later).
            second_too = await once_expired()
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await connect(second_url)
            for ws in (*held, admitted, second_too):
                await ws.close()


async def test_redis_going_down_fails_open_or_closed_per_team(tmp_path, start_relay, simulator):
    async with redis_server(tmp_path) as url:
        config = relay_config(
            simulator.url,
            admission={"backend": "redis", "redis_timeout_seconds": 0.3},
            teams={
                "alpha": {
                    "keys": [hash_key(ALPHA_KEY)],
                    "deployments": ["gpt-realtime"],
                    "limits": {"on_redis_error": "open"},
                },
                "beta": {
                    "keys": [hash_key(BETA_KEY)],
                    "deployments": ["gpt-realtime"],
                    "limits": {"on_redis_error": "closed"},
                },
            },
        )
        relay = await start_relay(config, environ={**ENVIRON, "RELAY_REDIS_URL": url})
        url_ = relay.make_url("/openai/v1/realtime?model=gpt-realtime")
        async with aiohttp.ClientSession() as http:
            for key in (ALPHA_KEY, BETA_KEY):  # Redis up: both admitted
                async with http.ws_connect(url_, headers={"api-key": key}) as ws:
                    await read_until(ws, "session.created")
    # Redis is gone now.
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url_, headers={"api-key": ALPHA_KEY}) as ws:  # fails open
            await read_until(ws, "session.created")
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:  # fails closed
            await http.ws_connect(url_, headers={"api-key": BETA_KEY})
        assert info.value.status == 503
    registry = relay.app[STATE].metrics.registry
    # Alpha's: its admission, and its slot's release (the slot expires by itself).
    assert registry.get_sample_value("relay_admission_redis_errors_total", {"team": "alpha"}) == 2
    assert registry.get_sample_value("relay_admission_redis_errors_total", {"team": "beta"}) == 1


async def test_webrtc_rates_are_shared_too(tmp_path):
    async with redis_server(tmp_path) as url:
        limits = {"a": TeamLimits(max_client_secrets_per_minute=2, max_new_sessions_per_second=1)}
        stores = [
            RedisAdmission.connect(AdmissionConfig(backend="redis"), LimitsConfig(), limits, url)
            for _ in range(2)
        ]
        try:
            await stores[0].take_client_secret("a")
            await stores[1].take_client_secret("a")
            with pytest.raises(ClientRefused) as info:  # two a minute, across both "processes"
                await stores[0].take_client_secret("a")
            assert (info.value.status, info.value.code) == (429, "team_secret_rate_limit")
            await stores[1].take_call("a")
            with pytest.raises(ClientRefused) as info:
                await stores[0].take_call("a")
            assert info.value.code == "team_rate_limit"
        finally:
            for store in stores:
                await store.close()


async def test_a_secret_minted_by_one_relay_places_a_call_through_another(
    tmp_path, simulator, start_relay
):
    async with redis_server(tmp_path) as url:
        config = relay_config(simulator.url, admission={"backend": "redis"})
        environ = {**ENVIRON, "RELAY_REDIS_URL": url}
        first, second = [await start_relay(config, environ) for _ in range(2)]
        async with aiohttp.ClientSession() as http:
            body = {"session": {"type": "realtime", "model": "gpt-realtime"}}
            async with http.post(
                first.make_url("/openai/v1/realtime/client_secrets"),
                json=body,
                headers={"api-key": ALPHA_KEY},
            ) as response:
                assert response.status == 200
                secret = (await response.json())["value"]
            offer = (
                "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sctp-port:5000\r\na=setup:actpass\r\na=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=fingerprint:sha-256 "
                + ":".join(["AB"] * 32)
                + "\r\n"
            )
            async with http.post(
                second.make_url("/openai/v1/realtime/calls"),
                data=offer,
                headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/sdp"},
            ) as response:
                assert response.status == 201, await response.text()
                assert (await response.text()).startswith("v=0")


async def test_a_call_placed_through_one_relay_is_joined_and_hung_up_through_another(
    tmp_path, simulator, start_relay
):
    from openai import AsyncOpenAI, NotFoundError

    from relay.edge.webrtc.call_book import call_id_from_location
    from relay.simulator.calls import CALLS_KEY
    from tests.test_webrtc import OFFER

    async with redis_server(tmp_path) as url:
        config = relay_config(
            simulator.url,
            admission={"backend": "redis"},
            teams={
                "alpha": {"keys": [hash_key(ALPHA_KEY)], "deployments": ["gpt-realtime"]},
                "beta": {"keys": [hash_key(BETA_KEY)], "deployments": ["gpt-realtime"]},
            },
        )
        environ = {**ENVIRON, "RELAY_REDIS_URL": url}
        first, second = [await start_relay(config, environ) for _ in range(2)]
        async with aiohttp.ClientSession() as http:
            async with http.post(
                first.make_url("/openai/v1/realtime/calls").with_query(model="gpt-realtime"),
                data=OFFER,
                headers={"api-key": ALPHA_KEY, "Content-Type": "application/sdp"},
            ) as response:
                assert response.status == 201, await response.text()
                call_id = call_id_from_location(response.headers["Location"])
        base = str(second.make_url("/openai/v1"))
        async with AsyncOpenAI(base_url=base, api_key=BETA_KEY, max_retries=0) as other:
            with pytest.raises(NotFoundError):
                await other.realtime.calls.hangup(call_id)
        async with AsyncOpenAI(base_url=base, api_key=ALPHA_KEY, max_retries=0) as client:
            async with client.realtime.connect(call_id=call_id) as sideband:
                await sideband.response.create()
                async for event in sideband:
                    if event.type == "response.done":
                        break
                await client.realtime.calls.hangup(call_id)
        assert call_id not in simulator.app[CALLS_KEY].calls


async def test_failed_authentication_is_counted_across_relays(tmp_path, simulator, start_relay):
    async with redis_server(tmp_path) as url:
        config = relay_config(
            simulator.url, admission={"backend": "redis"}, limits={"auth_failures_allowed": 4}
        )
        environ = {**ENVIRON, "RELAY_REDIS_URL": url}
        relays = [await start_relay(config, environ) for _ in range(2)]
        upgrade = UPGRADE

        async def attempt(relay, key: str) -> tuple[int, str]:
            realtime = relay.make_url("/openai/v1/realtime?model=gpt-realtime")
            async with http.get(realtime, headers={**upgrade, "api-key": key}) as response:
                return response.status, (await response.json())["error"]["code"]

        async with aiohttp.ClientSession() as http:
            for relay in (*relays, *relays[:1]):  # three guesses, over both relays
                assert await attempt(relay, "rk-guess-0123456789") == (401, "invalid_api_key")
            ws = await http.ws_connect(
                relays[1].make_url("/openai/v1/realtime?model=gpt-realtime"),
                headers={"api-key": ALPHA_KEY},
            )
            await ws.close()  # a success resets nothing
            assert await attempt(relays[1], "rk-guess-0123456789") == (401, "invalid_api_key")
            for relay in relays:
                assert await attempt(relay, ALPHA_KEY) == (429, "too_many_auth_failures")


async def test_the_brake_falls_back_to_the_process_when_redis_is_unreachable():
    from redis.asyncio import Redis

    from relay.edge.admission import AuthThrottle
    from relay.edge.auth_brake_redis import RedisAuthThrottle
    from tests.processes import free_port

    config = AdmissionConfig(backend="redis", redis_timeout_seconds=0.5)
    client = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    brake = RedisAuthThrottle(client, config, LimitsConfig(), AuthThrottle(2, 60.0, 30.0))
    try:
        for _ in range(2):
            await brake.check("10.0.0.9")
            await brake.failed("10.0.0.9")
        with pytest.raises(ClientRefused) as info:
            await brake.check("10.0.0.9")
        assert info.value.code == "too_many_auth_failures"
    finally:
        await client.aclose()


async def test_slots_redis_lost_are_put_back_and_slow_rates_hold(tmp_path):
    """Found by probing with two relays and a real Redis: after a FLUSHALL (or a restart
    without persistence) the refresh only extended slots still there, so a team's live
    sessions stopped counting (12 live against a cap of 3); a team rate under one a second
    had its window cut to the relay's 1 s (10 of 10 starts let in for a limit of 3); a
    release under `maxmemory` went through MULTI, which an out-of-memory Redis refuses."""
    import redis.asyncio as aioredis

    async with redis_server(tmp_path) as url:
        store = RedisAdmission.connect(
            AdmissionConfig(backend="redis", slot_ttl_seconds=30.0),
            LimitsConfig(),
            {"a": TeamLimits(max_sessions=2), "slow": TeamLimits(max_new_sessions_per_second=0.2)},
            url,
        )
        admin = aioredis.Redis.from_url(url)
        try:
            held = [await store.acquire("a"), await store.acquire("a")]
            await admin.flushall()
            await store.refresh()  # the live sessions count again
            with pytest.raises(ClientRefused) as info:
                await store.acquire("a")
            assert info.value.code == "team_session_limit"

            await admin.config_set("maxmemory", 1)  # out of memory: noeviction refuses writes
            for lease in held:
                await lease.release()
            await admin.config_set("maxmemory", 0)
            assert await admin.zcard("relay:slots:team:a") == 0
            await (await store.acquire("a")).release()

            await (await store.acquire("slow")).release()
            # One start per 5 s: its window's counter lives 5 s (it lived the relay's 1 s, so
            # a start 1.1 s later in the same window was let in).
            [counter] = await admin.keys("relay:started:team:slow:*")
            assert 1000 < await admin.pttl(counter) <= 5000
        finally:
            await admin.aclose()
            await store.close()


async def test_guesses_sent_at_once_get_exactly_the_failures_allowed(
    tmp_path, simulator, start_relay
):
    """The check (is the address blocked?) and the count were two round trips to Redis:
    of 2,000 guesses sent at once, 56-102 were judged against a limit of 5 (68 of 150 here).
    The key is now judged first and the block checked and counted in one step. And past
    100 calls at once, redis-py's pool raised: Redis was taken for unreachable, and each
    process counted alone."""
    async with redis_server(tmp_path) as url:
        config = relay_config(
            simulator.url,
            admission={"backend": "redis", "redis_timeout_seconds": 10.0},
            limits={"auth_failures_allowed": 4},
        )
        relay = await start_relay(config, {**ENVIRON, "RELAY_REDIS_URL": url})
        realtime = relay.make_url("/openai/v1/realtime?model=gpt-realtime")

        async def guess(http: aiohttp.ClientSession, n: int) -> int:
            async with http.get(realtime, headers={**UPGRADE, "api-key": f"rk-{n}"}) as answer:
                return answer.status

        with capture_logs() as logs:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
                answers = await asyncio.gather(*(guess(http, n) for n in range(150)))
        assert sorted(answers) == [401] * 4 + [429] * 146, sorted(answers).count(401)
        assert not [e for e in logs if e["event"] == "auth_brake_redis_unreachable"]
