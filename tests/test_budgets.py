"""Team budgets end to end: a session's usage is costed, and over budget new sessions,
client secrets and calls get 429 while live sessions end after their response (or finish);
shared across two relay processes through a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from relay.edge.auth import hash_key
from relay.state import STATE
from tests.helpers import ALPHA_KEY, FakeUpstream, read_until, relay_config
from tests.processes import needs_redis, redis_server, relay_process
from tests.test_webrtc import CALLS, OFFER, SDP, SECRETS, post

ADMIN_KEY = "rk-admin-budgets"
# Expensive on purpose: one short response costs more than the budget.
PRICES = {"input_text": 1_000_000, "output_text": 1_000_000, "output_audio": 1_000_000}
URL = "/openai/v1/realtime?model=gpt-realtime"


def budget_config(endpoint: str, **limits: Any):
    return relay_config(
        endpoint,
        deployments={
            "gpt-realtime": {
                "endpoint": endpoint,
                "credential": {"env": "TEST_AZURE_KEY"},
                "prices": PRICES,
            }
        },
        teams={
            "alpha": {
                "keys": [hash_key(ALPHA_KEY)],
                "deployments": ["gpt-realtime"],
                "limits": {"max_usd_per_day": 1.0, **limits},
            },
            "beta": {"keys": [hash_key("rk-beta-unused")], "deployments": ["gpt-realtime"]},
        },
        admin={"keys": [hash_key(ADMIN_KEY)]},
    )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def respond(ws) -> list[dict[str, Any]]:
    """Ask for a text response; the events up to its response.done."""
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}
    await ws.send_str(orjson.dumps({"type": "conversation.item.create", "item": item}).decode())
    await ws.send_str('{"type": "response.create"}')
    return await read_until(ws, "response.done")


async def test_over_budget_the_live_session_ends_after_its_response_and_new_ones_get_429(
    simulator, start_relay, http
):
    relay = await start_relay(budget_config(simulator.url))
    headers = {"api-key": ALPHA_KEY}
    with capture_logs(processors=[merge_contextvars]) as logs:
        async with http.ws_connect(relay.make_url(URL), headers=headers) as ws:
            await read_until(ws, "session.created")
            events = await respond(ws)
            usage = events[-1]["response"]["usage"]
            assert usage["output_tokens"] > 0  # at a dollar a token: over the $1 budget
            error = await ws.receive_json()
            assert error["type"] == "error"
            assert error["error"]["code"] == "budget_exceeded"
            assert "daily budget of $1" in error["error"]["message"]
            closing = await ws.receive()
            assert closing.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1008
        await relay.app[STATE].idle.wait()
    ended = next(e for e in logs if e["event"] == "session_ended")
    assert ended["outcome"] == "budget_exceeded"
    assert ended["cost_usd"] > 1.0 and ended["frames_in"] == 2 and ended["frames_out"] >= 3
    assert ended["session_id"].startswith("rs_") and ended["upstream_session_id"].startswith(
        "sess_"
    )

    # New sessions, client secrets and calls: 429 until the UTC day ends.
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(relay.make_url(URL), headers=headers)
    assert info.value.status == 429
    retry_after = int(info.value.headers["Retry-After"])
    assert 1 <= retry_after <= 86400
    body = {"session": {"type": "realtime", "model": "gpt-realtime"}}
    status, response_headers, refused = await post(http, relay.make_url(SECRETS), json=body)
    assert (status, refused["error"]["code"]) == (429, "budget_exceeded")
    assert response_headers["Retry-After"]
    call = relay.make_url(CALLS).with_query(model="gpt-realtime")
    status, _, refused = await post(http, call, data=OFFER, headers=SDP)
    assert (status, refused["error"]["code"]) == (429, "budget_exceeded")

    registry = relay.app[STATE].metrics.registry
    refusals = {"team": "alpha", "status": "429", "code": "budget_exceeded"}
    assert registry.get_sample_value("relay_session_refusals_total", refusals) == 1
    cost = registry.get_sample_value(
        "relay_cost_usd_total", {"team": "alpha", "deployment": "gpt-realtime"}
    )
    assert cost == pytest.approx(ended["cost_usd"])
    spent = {"team": "alpha", "window": "day"}
    assert registry.get_sample_value("relay_budget_spent_usd", spent) == pytest.approx(cost)
    assert registry.get_sample_value("relay_budget_usd", spent) == 1.0

    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with http.get(relay.make_url("/status"), headers=admin) as response:
        teams = (await response.json())["teams"]
    assert teams["alpha"]["over_budget"] is True
    assert teams["alpha"]["spent_usd"]["day"] == pytest.approx(cost)
    assert teams["alpha"]["budget_usd"] == {"day": 1.0, "month": None}
    assert teams["beta"] == {
        "spent_usd": {"day": 0.0, "month": 0.0},
        "budget_usd": {"day": None, "month": None},
        "over_budget": False,
    }


async def test_a_team_may_let_live_sessions_finish(simulator, start_relay, http):
    relay = await start_relay(budget_config(simulator.url, live_sessions_over_budget="finish"))
    async with http.ws_connect(relay.make_url(URL), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        await respond(ws)
        # Over budget now, and the session goes on: a second response, no error.
        events = await respond(ws)
        assert [e for e in events if e["type"] == "error"] == []
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(relay.make_url(URL), headers={"api-key": ALPHA_KEY})
        assert info.value.status == 429


PROCESS_CONFIG = """
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
[admin]
keys = ["{admin}"]
[deployments.gpt-realtime]
endpoint = "simulator"
credential = {{ env = "RELAY_SIMULATOR_KEY" }}
prices = {{ output_text = 1000000, output_audio = 1000000 }}
[teams.alpha]
keys = ["{key}"]
deployments = ["gpt-realtime"]
limits = {{ max_usd_per_month = 1.0 }}
"""


@needs_redis
async def test_spend_is_shared_by_two_relay_processes_through_redis(tmp_path, http):
    config = tmp_path / "relay.toml"
    config.write_text(PROCESS_CONFIG.format(admin=hash_key(ADMIN_KEY), key=hash_key(ALPHA_KEY)))
    async with redis_server(tmp_path) as url:
        env = {"RELAY_SIMULATOR_KEY": "sim", "RELAY_REDIS_URL": url}
        async with (
            relay_process(config, env) as (_, first),
            relay_process(config, env) as (_, second),
        ):
            headers = {"api-key": ALPHA_KEY}
            # Both admit before anything is spent.
            waiting = await http.ws_connect(f"{second}{URL}", headers=headers)
            await read_until(waiting, "session.created")
            async with http.ws_connect(f"{first}{URL}", headers=headers) as ws:
                await read_until(ws, "session.created")
                await respond(ws)
                assert (await ws.receive_json())["error"]["code"] == "budget_exceeded"
            # The second process learns of the first's spend within its sync interval: its
            # live session is ended, and new sessions are refused.
            error = await waiting.receive_json()
            assert error["error"]["code"] == "budget_exceeded"
            await waiting.receive()
            assert waiting.close_code == 1008
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await http.ws_connect(f"{second}{URL}", headers=headers)
            assert info.value.status == 429
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            spent = []
            for base in (first, second):
                async with http.get(f"{base}/status", headers=admin) as response:
                    alpha = (await response.json())["teams"]["alpha"]
                spent.append(alpha["spent_usd"]["month"])
                assert alpha["over_budget"] is True
            assert spent[0] == pytest.approx(spent[1]) and spent[0] > 1.0


@needs_redis
async def test_concurrent_spend_from_two_books_adds_up_atomically(tmp_path):
    import redis.asyncio as aioredis

    from relay.edge.spend_book import RedisSpend

    async with redis_server(tmp_path) as url:
        books = [
            RedisSpend(aioredis.Redis.from_url(url), "relay", 1.0, ("a", "b")) for _ in range(2)
        ]

        async def spend(book: RedisSpend) -> None:
            for _ in range(200):
                book.add("a", 0.001)
                await book.sync()

        await asyncio.gather(*(spend(book) for book in books))
        for book in books:
            await book.sync()
            assert book.spent("a").day == pytest.approx(0.4)
            assert book.spent("a").month == pytest.approx(0.4)
            assert book.spent("b").day == 0
            await book.client.aclose()


@needs_redis
async def test_redis_down_keeps_the_spend_for_later(tmp_path):
    import redis.asyncio as aioredis

    from relay.edge.spend_book import RedisSpend

    failures = []
    async with redis_server(tmp_path) as url:
        book = RedisSpend(
            aioredis.Redis.from_url(url),
            "relay",
            0.3,
            ("a",),
            on_redis_error=lambda: failures.append(1),
        )
        book.add("a", 0.5)
        await book.sync()
    # Redis is gone: the spend stays counted here and pending.
    book.add("a", 0.25)
    with capture_logs() as logs:
        await book.sync()
    assert failures == [1]
    assert [e["event"] for e in logs] == ["spend_sync_failed"]
    assert book.spent("a").day == pytest.approx(0.75)
    await book.client.aclose()


@pytest.mark.parametrize("leaving", ["close", "vanish", "invalid_utf8", "before_created"])
async def test_a_client_that_hangs_up_mid_response_is_billed_for_it(start_relay, http, leaving):
    """The upstream bills a response cut short by the client's leaving. The relay cancels it
    and reads on to its `response.done` (nothing sent on), so the usage reaches the meter,
    the team's spend and its budget; before, a client that hung up during every answer
    spent without a trace."""
    from relay.simulator import SimulatorOptions, start_simulator
    from tests.helpers import AZURE_KEY

    options = SimulatorOptions(
        api_keys=frozenset({AZURE_KEY}),
        speed=1.0,
        reply_text="Here is a long answer that takes a few seconds to say out loud, slowly.",
    )
    simulator = await start_simulator(options)
    try:
        relay = await start_relay(budget_config(simulator.url, max_usd_per_day=1e9))
        state = relay.app[STATE]
        with capture_logs(processors=[merge_contextvars]) as logs:
            ws = await http.ws_connect(relay.make_url(URL), headers={"api-key": ALPHA_KEY})
            await read_until(ws, "session.created")
            item = {"type": "message", "role": "user", "content": [{"type": "input_text",
                                                                    "text": "Talk."}]}  # fmt: skip
            await ws.send_str(
                orjson.dumps({"type": "conversation.item.create", "item": item}).decode()
            )
            await ws.send_str('{"type": "response.create"}')
            if leaving == "before_created":  # the response is asked for, not yet started
                await ws.close()
            else:
                await read_until(ws, "response.output_audio.delta")
            if leaving == "close":
                await ws.close()
            elif leaving == "vanish":
                ws._response.connection.transport.abort()  # gone without a close frame
            elif leaving == "invalid_utf8":  # closed by the relay (1007) for its own fault
                await ws._writer.send_frame(b'{"type":"x","y":"\xff"}', aiohttp.WSMsgType.TEXT)
            await state.idle.wait()
        (ended,) = [e for e in logs if e["event"] == "session_ended"]
        # Billed: what it generated before the cancel (before_created: its input alone).
        assert ended["responses"] == 1 and ended["cost_usd"] > 0
        assert not [e for e in logs if e["event"] == "response_unsettled"]
    finally:
        await simulator.close()


@needs_redis
async def test_the_shared_spend_counts_a_push_once_and_survives_redis_losing_it(tmp_path):
    """Found by probing with a slow Redis: a push whose answer timed out after Redis had run
    it was added again (INCRBY), so $668 of spend read as $1,002; and a FLUSHALL forgave
    every team's budget. Each replica now sets its cumulative spend (idempotent), and puts
    it back at its next push."""
    import redis.asyncio as aioredis

    from relay.edge.spend_book import RedisSpend

    async with redis_server(tmp_path) as url:
        client = aioredis.Redis.from_url(url)
        book = RedisSpend(client, "relay", 1.0, ("alpha",))
        try:
            book.add("alpha", 2.5)
            real_eval = client.eval

            async def ran_then_timed_out(*args):
                await real_eval(*args)
                raise TimeoutError

            client.eval = ran_then_timed_out  # type: ignore[method-assign]
            await book.sync()  # Redis has it; the relay does not know
            client.eval = real_eval  # type: ignore[method-assign]
            await book.sync()
            assert book.spent("alpha").day == pytest.approx(2.5)
            await client.flushall()
            await book.sync()
            assert book.spent("alpha").day == pytest.approx(2.5)
            other = RedisSpend(client, "relay", 1.0, ("alpha",))
            await other.sync()
            assert other.spent("alpha").day == pytest.approx(2.5)
        finally:
            await client.aclose()


def _usage(text_tokens: int) -> dict[str, Any]:
    return {
        "total_tokens": text_tokens, "input_tokens": 0, "output_tokens": text_tokens,
        "input_token_details": {"text_tokens": 0, "audio_tokens": 0, "cached_tokens": 0},
        "output_token_details": {"text_tokens": text_tokens, "audio_tokens": 0},
    }  # fmt: skip


async def two_out_of_band_responses(ws: Any, fake: FakeUpstream) -> None:
    """Starts two responses side by side on the second `response.create`, ends the second
    ($1), and the first ($5) only when it is cancelled by its id."""

    async def send(**event: Any) -> None:
        await ws.send_str(orjson.dumps(event).decode())

    await send(type="session.created", event_id="e0", session={})
    creates = 0
    async for msg in ws:
        fake.received.append(msg.data.encode())
        event = orjson.loads(msg.data)
        if event["type"] == "response.create":
            creates += 1
            if creates == 2:
                for response_id in ("r1", "r2"):
                    response = {"id": response_id, "status": "in_progress", "conversation_id": None}
                    await send(type="response.created", response=response)
                done = {"id": "r2", "status": "completed", "usage": _usage(1)}
                await send(type="response.done", response=done)
        elif event["type"] == "response.cancel" and event.get("response_id") == "r1":
            done = {"id": "r1", "status": "cancelled", "usage": _usage(5)}
            await send(type="response.done", response=done)


async def test_a_client_that_hangs_up_during_side_by_side_responses_is_billed_for_both(
    start_fake, start_relay, http
):
    """Out-of-band responses (`conversation: "none"`) run side by side: one flag for "a
    response is in progress" was cleared by the first `response.done`, so the other one,
    still running when the client left, was neither cancelled nor metered."""
    fake = FakeUpstream(script=two_out_of_band_responses)
    upstream = await start_fake(fake.app())
    relay = await start_relay(budget_config(str(upstream.make_url("")), max_usd_per_day=1e9))
    with capture_logs(processors=[merge_contextvars]) as logs:
        ws = await http.ws_connect(relay.make_url(URL), headers={"api-key": ALPHA_KEY})
        await read_until(ws, "session.created")
        create = '{"type": "response.create", "response": {"conversation": "none"}}'
        await ws.send_str(create)
        await ws.send_str(create)
        await read_until(ws, "response.done")
        await ws.close()
        await relay.app[STATE].idle.wait()
    (ended,) = [e for e in logs if e["event"] == "session_ended"]
    assert ended["responses"] == 2 and ended["cost_usd"] == pytest.approx(6.0)
    cancels = [orjson.loads(f) for f in fake.received if b"response.cancel" in f]
    assert [c.get("response_id") for c in cancels] == ["r1"]


async def test_a_reload_that_lowers_a_budget_ends_the_teams_idle_sessions(
    simulator, start_relay, http
):
    """A session idle after spending stayed open past a reload that put its team over, and
    could start one more whole response before it was judged."""
    from relay.live import apply_config
    from tests.helpers import ENVIRON

    relay = await start_relay(budget_config(simulator.url, max_usd_per_day=1e9))
    async with http.ws_connect(relay.make_url(URL), headers={"api-key": ALPHA_KEY}) as ws:
        await read_until(ws, "session.created")
        await respond(ws)  # some dollars, under the budget
        lowered = budget_config(simulator.url, max_usd_per_day=0.5)
        assert (await apply_config(relay.app[STATE], lowered, ENVIRON)).outcome == "applied"
        error = await ws.receive_json()
        assert error["error"]["code"] == "budget_exceeded"
        closing = await ws.receive()
        assert closing.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1008
