"""Reloading the config in a running relay: what changes for new sessions, what live sessions
keep, what a removed key ends, what a bad file leaves alone."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from relay.edge.auth import hash_key
from relay.live import apply_config, reload
from relay.ops.check import ConfigSource
from relay.state import RELOAD, STATE
from tests.helpers import (
    ALPHA_KEY,
    AZURE_KEY,
    BETA_KEY,
    ENVIRON,
    FakeUpstream,
    echo,
    read_until,
    relay_config,
)

NEW_KEY = "rk-alpha-new-0000"
ADMIN_KEY = "rk-admin-0000"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def url(relay, deployment="gpt-realtime") -> str:
    return f"http://127.0.0.1:{relay.port}/openai/v1/realtime?model={deployment}"


def with_alpha_keys(endpoint: str, *keys: str, **sections):
    config = relay_config(endpoint, **sections)
    alpha = dataclasses.replace(config.teams["alpha"], keys=tuple(hash_key(k) for k in keys))
    return dataclasses.replace(config, teams={**config.teams, "alpha": alpha})


def reloads(relay, outcome: str) -> float:
    registry = relay.app[STATE].metrics.registry
    value = registry.get_sample_value("relay_config_reloads_total", {"outcome": outcome})
    return value or 0.0


async def test_a_new_key_works_and_a_removed_keys_session_ends(simulator, start_relay, http):
    relay = await start_relay(relay_config(simulator.url))
    state = relay.app[STATE]
    kept = await http.ws_connect(url(relay, "other"), headers={"api-key": BETA_KEY})
    await read_until(kept, "session.created")
    doomed = await http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY})
    await read_until(doomed, "session.created")

    result = await apply_config(state, with_alpha_keys(simulator.url, NEW_KEY), ENVIRON)

    assert (result.outcome, result.sessions_revoked) == ("applied", 1)
    error = orjson.loads((await doomed.receive()).data)
    assert error["type"] == "error"
    assert error["error"]["code"] == "key_revoked"
    closed = await doomed.receive()
    assert (closed.type, closed.data, closed.extra) == (
        aiohttp.WSMsgType.CLOSE,
        1008,
        "key revoked",
    )
    # The other team's session goes on.
    await kept.send_str('{"type": "input_audio_buffer.clear"}')
    await read_until(kept, "input_audio_buffer.cleared")
    fresh = await http.ws_connect(url(relay), headers={"api-key": NEW_KEY})
    await read_until(fresh, "session.created")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY})
    assert refused.value.status == 401
    assert reloads(relay, "applied") == 1
    registry = state.metrics.registry
    ended = {"team": "alpha", "deployment": "gpt-realtime", "outcome": "key_revoked"}
    assert registry.get_sample_value("relay_sessions_total", ended) == 1
    for ws in (kept, fresh):
        await ws.close()


async def test_a_session_set_up_across_the_reload_that_removes_its_key_ends(
    start_fake, start_relay, http
):
    """The key is removed while the session is being set up (its upstream has not started
    it yet): the reload's revocation did not know it, and it went on for its whole life."""
    reloaded = asyncio.Event()
    dialled = asyncio.Event()

    async def slow_start(ws, fake: FakeUpstream) -> None:
        dialled.set()
        await reloaded.wait()  # the upstream starts the session only after the reload
        await echo(ws, fake)

    upstream = await start_fake(FakeUpstream(script=slow_start).app())
    endpoint = f"http://127.0.0.1:{upstream.port}"
    relay = await start_relay(relay_config(endpoint))
    connecting = asyncio.ensure_future(http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY}))
    await dialled.wait()
    result = await apply_config(relay.app[STATE], with_alpha_keys(endpoint, NEW_KEY), ENVIRON)
    assert (result.outcome, result.sessions_revoked) == ("applied", 0)  # not known yet
    reloaded.set()
    doomed = await connecting
    events = await asyncio.wait_for(read_until(doomed, "error"), 10)
    assert events[-1]["error"]["code"] == "key_revoked"
    closed = await doomed.receive()
    assert (closed.type, closed.data) == (aiohttp.WSMsgType.CLOSE, 1008)


async def test_a_bad_file_changes_nothing(simulator, start_relay, http, tmp_path: Path):
    relay = await start_relay(relay_config(simulator.url))
    state = relay.app[STATE]
    before = state.live
    path = tmp_path / "relay.toml"
    path.write_text("[server]\nport = 'eighty'\n")

    result = await reload(state, ConfigSource(path, ENVIRON))

    assert result.outcome == "rejected"
    assert f"{path}: server.port: must be an integer, got str 'eighty'" in result.problems
    assert state.live is before
    assert reloads(relay, "rejected") == 1
    ws = await http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY})
    await read_until(ws, "session.created")
    await ws.close()


async def test_settings_bound_at_start_are_reported_and_kept(simulator, start_relay):
    relay = await start_relay(relay_config(simulator.url))
    state = relay.app[STATE]
    moved = relay_config(
        simulator.url,
        server={
            "port": 9999, "close_timeout_seconds": 2.0, "stall_timeout_seconds": 3.0,
            "message_buffer_bytes": 64 * 1024 * 1024,
        },
        metrics={"port": 9998},
    )  # fmt: skip
    assert state.message_budget.limit == 256 * 1024 * 1024
    result = await apply_config(state, moved, ENVIRON)
    assert result.outcome == "applied"
    assert result.restart_needed == ("server.port", "metrics")
    assert state.live.config.server.port == 8080  # as the process listens
    assert state.live.config.metrics.port == 9464
    assert state.live.config.server.stall_timeout_seconds == 3.0  # live settings apply
    assert state.message_budget.limit == 64 * 1024 * 1024
    sample = state.metrics.registry.get_sample_value("relay_message_buffer_limit_bytes")
    assert sample == 64 * 1024 * 1024
    again = await apply_config(state, moved, ENVIRON)
    assert (again.outcome, again.restart_needed) == ("unchanged", ("server.port", "metrics"))


async def test_a_teams_message_buffer_follows_a_reload(simulator, start_relay):
    relay = await start_relay(relay_config(simulator.url))
    state = relay.app[STATE]
    alpha = state.message_budget_for(state.live.config.teams["alpha"])
    assert (alpha.limit, alpha.parent) == (0, state.message_budget)
    config = relay_config(simulator.url)
    limits = dataclasses.replace(config.teams["alpha"].limits, message_buffer_bytes=1 << 26)
    team = dataclasses.replace(config.teams["alpha"], limits=limits)
    assert (
        await apply_config(state, dataclasses.replace(config, teams={"alpha": team}), ENVIRON)
    ).outcome == "applied"
    assert alpha.limit == 1 << 26  # the same budget: sessions open now count in it
    assert (await apply_config(state, config, ENVIRON)).outcome == "applied"
    assert alpha.limit == 0


async def test_policies_change_for_new_sessions_and_backends_keep_their_health(
    simulator, start_relay, http
):
    relay = await start_relay(relay_config(simulator.url))
    state = relay.app[STATE]
    backend = state.live.pools["gpt-realtime"].backends[0]
    backend.consecutive_failures = 2
    old = await http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY})
    await read_until(old, "session.created")
    strict = relay_config(
        simulator.url,
        deployments={
            "gpt-realtime": {
                "endpoint": simulator.url,
                "azure_deployment": "az-gpt-realtime",
                "credential": {"env": "TEST_AZURE_KEY"},
                "policy": {"allowed_events": ["session.update"]},
            },
            "other": {"endpoint": simulator.url, "credential": {"env": "TEST_AZURE_KEY"}},
        },
    )
    await apply_config(state, strict, ENVIRON)
    assert state.live.pools["gpt-realtime"].backends[0] is backend
    clear = '{"type": "input_audio_buffer.clear"}'
    await old.send_str(clear)  # the live session keeps the rules it started with
    await read_until(old, "input_audio_buffer.cleared")
    new = await http.ws_connect(url(relay), headers={"api-key": ALPHA_KEY})
    await read_until(new, "session.created")
    await new.send_str(clear)
    refused = await read_until(new, "error")
    assert refused[-1]["error"]["code"] == "policy_violation"
    for ws in (old, new):
        await ws.close()


async def test_admin_endpoint_reloads_with_an_admin_key(simulator, start_relay, http):
    config = relay_config(simulator.url, admin={"keys": [hash_key(ADMIN_KEY)]})
    relay = await start_relay(config)
    endpoint = f"http://127.0.0.1:{relay.port}/admin/reload"
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with http.post(endpoint, headers=admin) as response:
        assert response.status == 503  # not started from a file (no reloader)
        assert (await response.json())["error"]["code"] == "reload_unavailable"

    async def reloader() -> dict[str, object]:
        return {"outcome": "unchanged", "problems": []}

    relay.app._state[RELOAD] = reloader  # what `relay serve` sets
    async with http.post(endpoint, headers={"Authorization": f"Bearer {ALPHA_KEY}"}) as response:
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "invalid_admin_key"
    async with http.post(endpoint, headers=admin) as response:
        assert response.status == 200
        assert (await response.json())["outcome"] == "unchanged"

    async def rejecting() -> dict[str, object]:
        # A secret pasted where a variable's name goes: the relay holds it, its log line
        # cleans it, and the answer showed it.
        problem = f"environment variable {AZURE_KEY} is not set or empty"
        return {"outcome": "rejected", "problems": [problem]}

    relay.app._state[RELOAD] = rejecting
    async with http.post(endpoint, headers=admin) as response:
        assert response.status == 422
        body = await response.json()
    assert body["problems"] == ["environment variable [REDACTED] is not set or empty"]


async def test_unknown_paths_and_methods_get_json_and_no_version(simulator, start_relay, http):
    relay = await start_relay(relay_config(simulator.url))
    base = f"http://127.0.0.1:{relay.port}"
    async with http.get(f"{base}/nothing/here") as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "not_found"
        assert response.headers["Server"] == "realtime-relay"
    async with http.delete(f"{base}/healthz") as response:
        assert response.status == 405
        assert (await response.json())["error"]["code"] == "method_not_allowed"
        assert "GET" in response.headers["Allow"]
    async with http.get(f"{base}/healthz") as response:
        assert response.headers["Server"] == "realtime-relay"
    # Also on the 400s aiohttp's HTTP parser answers before the application sees anything.
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    head = await reader.read()
    writer.close()
    assert head.startswith(b"HTTP/1.0 400")
    assert b"Server: realtime-relay\r\n" in head and b"aiohttp" not in head


async def test_budgets_and_prices_follow_a_reload(simulator, start_relay):
    config = relay_config(simulator.url)
    relay = await start_relay(config)
    state = relay.app[STATE]
    priced = {
        "endpoint": simulator.url,
        "azure_deployment": "az-gpt-realtime",
        "credential": {"env": "TEST_AZURE_KEY"},
        "prices": {"input_text": 4.0, "output_audio": 80.0},
    }
    budgeted = relay_config(
        simulator.url,
        deployments={"gpt-realtime": priced},
        teams={
            "alpha": {
                "keys": [hash_key(ALPHA_KEY)],
                "deployments": ["gpt-realtime"],
                "limits": {"max_usd_per_day": 5},
            }
        },
    )
    await apply_config(state, budgeted, ENVIRON)
    budget = {"team": "alpha", "window": "day"}
    registry = state.metrics.registry
    assert registry.get_sample_value("relay_budget_usd", budget) == 5
    assert state.budgets.limits["alpha"].max_usd_per_day == 5
    assert state.live.config.deployments["gpt-realtime"].prices is not None
    await apply_config(state, config, ENVIRON)
    assert registry.get_sample_value("relay_budget_usd", budget) is None
    assert not state.budgets.limits["alpha"].has_budget


@pytest.mark.parametrize(("outcome", "exit_code"), [("applied", 0), ("rejected", 2)])
async def test_relay_reload_by_url_prints_the_answer(simulator, start_relay, outcome, exit_code):
    config = relay_config(simulator.url, admin={"keys": [hash_key(ADMIN_KEY)]})
    relay = await start_relay(config)

    async def reloader() -> dict[str, object]:
        return {"outcome": outcome, "problems": ["x"] if outcome == "rejected" else []}

    relay.app._state[RELOAD] = reloader
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "reload", "--url", f"http://127.0.0.1:{relay.port}",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "RELAY_ADMIN_KEY": ADMIN_KEY},
    )  # fmt: skip
    out, _ = await process.communicate()
    assert process.returncode == exit_code
    assert orjson.loads(out)["outcome"] == outcome
