"""Continuity end to end: real sockets, the simulator with sessions of a few seconds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from structlog.testing import capture_logs

from relay.simulator import SimulatorOptions, start_simulator
from relay.state import STATE
from tests.helpers import ALPHA_KEY, AZURE_KEY, relay_config

SESSION_SECONDS = 4.0
CONTINUITY = {"enabled": True, "renew_before_seconds": 1.5, "max_replay_tokens": 8000}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def ws_url(relay: Any) -> str:
    return f"http://127.0.0.1:{relay.port}/openai/v1/realtime?model=gpt-realtime"


def continuity_config(endpoint: str, **continuity: Any) -> Any:
    deployment = {
        "endpoint": endpoint,
        "credential": {"env": "TEST_AZURE_KEY"},
        "continuity": {**CONTINUITY, **continuity},
    }
    return relay_config(endpoint, deployments={"gpt-realtime": deployment})


async def next_event(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive()
    assert msg.type == aiohttp.WSMsgType.TEXT, f"expected a text frame, got {msg!r}"
    event: dict[str, Any] = orjson.loads(msg.data)
    assert event["type"] != "error", event
    return event


async def turn(ws: aiohttp.ClientWebSocketResponse, text: str, n: int) -> tuple[str, int]:
    """One user turn and the answer: (the user item's id, audio deltas heard)."""
    item_id = f"item_user_{n:04d}"
    item = {"id": item_id, "type": "message", "role": "user"}
    item["content"] = [{"type": "input_text", "text": text}]
    await ws.send_str(orjson.dumps({"type": "conversation.item.create", "item": item}).decode())
    await ws.send_str('{"type":"response.create"}')
    audio = 0
    while True:
        event = await next_event(ws)
        if event["type"] == "response.output_audio.delta":
            audio += 1
        elif event["type"] == "response.done":
            assert event["response"]["status"] == "completed", event
            return item_id, audio


def elapsed(since: float) -> float:
    return asyncio.get_running_loop().time() - since


def renewals(relay: Any, outcome: str = "renewed", reason: str = "expiry") -> float:
    metric = relay.app[STATE].metrics.session_renewals
    return metric.labels("gpt-realtime", reason, outcome)._value.get()


async def test_a_conversation_outlives_four_upstream_sessions(start_relay, http):
    simulator = await start_simulator(
        SimulatorOptions(
            api_keys=frozenset({AZURE_KEY}),
            speed=4.0,
            reply_text="Sure, noted.",
            max_session_seconds=SESSION_SECONDS,
        )
    )
    try:
        relay = await start_relay(continuity_config(simulator.url))
        with capture_logs() as logs:
            async with http.ws_connect(ws_url(relay), headers={"api-key": ALPHA_KEY}) as ws:
                created = await next_event(ws)
                assert created["type"] == "session.created"
                ids, n = [], 0
                began = asyncio.get_running_loop().time()
                # Longer than three upstream sessions, across at least four renewals.
                while renewals(relay) < 4 or elapsed(began) < 3 * SESSION_SECONDS:
                    item_id, audio = await turn(ws, f"Remember the number {n}.", n)
                    assert audio > 0
                    ids.append(item_id)
                    n += 1
                for item_id in ids:
                    await ws.send_str(
                        orjson.dumps(
                            {"type": "conversation.item.retrieve", "item_id": item_id}
                        ).decode()
                    )
                    retrieved = await next_event(ws)
                    while retrieved["type"] != "conversation.item.retrieved":
                        retrieved = await next_event(ws)
                    assert retrieved["item"]["id"] == item_id
                assert not ws.closed
        renewed = [e for e in logs if e["event"] == "session_renewed"]
        assert len(renewed) >= 4
        assert all(e["old_upstream_session_id"] != e["new_upstream_session_id"] for e in renewed)
    finally:
        await simulator.close()
