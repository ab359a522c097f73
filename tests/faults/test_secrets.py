"""No secret ever appears in logs, metrics or responses."""

from __future__ import annotations

import logging

import aiohttp
import pytest
import structlog
from aiohttp import WSMsgType

from relay.app import create_metrics_app
from relay.state import STATE
from tests.helpers import ALPHA_KEY, AZURE_KEY, BETA_KEY, ENVIRON, UPGRADE, relay_config

METRICS_TOKEN = "metrics-bearer-t0ken-s3cret"
WRONG_KEY = "rk-wrong-but-secret-looking-key"


async def test_no_secret_leaks_anywhere(simulator, start_relay, aiohttp_server, caplog):
    caplog.set_level(logging.DEBUG)
    config = relay_config(
        simulator.url,
        metrics={"on_main_port": True, "token_env": "METRICS_TOKEN"},
        limits={"auth_failures_allowed": 100},
    )
    relay = await start_relay(config, environ={**ENVIRON, "METRICS_TOKEN": METRICS_TOKEN})
    seen: list[str] = []
    base = relay.make_url("/openai/v1/realtime")

    async def get(url, **headers) -> None:
        async with http.get(url, headers=headers) as response:
            seen.append(f"{response.status} {dict(response.headers)} {await response.text()}")

    with structlog.testing.capture_logs() as logs:
        async with aiohttp.ClientSession() as http:
            # Good sessions, the key in every accepted place.
            for kwargs in (
                {"headers": {"api-key": ALPHA_KEY}},
                {"headers": {"Authorization": f"Bearer {ALPHA_KEY}"}},
                {"protocols": ("realtime", f"openai-insecure-api-key.{ALPHA_KEY}")},
                {"params": {"api-key": ALPHA_KEY}},
            ):
                async with http.ws_connect(f"{base}?model=gpt-realtime", **kwargs) as ws:
                    await ws.send_str('{"type":"not.allowed"}')
                    await ws.send_bytes(b"binary")
                    await ws.send_str('{"type":"response.create"}')
                    async for msg in ws:
                        seen.append(str(msg.data))
                        if msg.type == WSMsgType.TEXT and '"response.done"' in msg.data:
                            break
            # Refusals: wrong keys everywhere, a forbidden deployment, bad metrics tokens.
            upgrade = UPGRADE
            await get(f"{base}?model=gpt-realtime&api-key={WRONG_KEY}", **upgrade)
            await get(f"{base}?model=gpt-realtime", **upgrade, Authorization=f"Bearer {WRONG_KEY}")
            await get(f"{base}?model=gpt-realtime", **upgrade, **{"api-key": BETA_KEY})
            await get(relay.make_url("/metrics"), Authorization=f"Bearer {WRONG_KEY}")
            await get(relay.make_url("/metrics"), Authorization=f"Bearer {METRICS_TOKEN}")
            await get(relay.make_url("/readyz"))
        await relay.app[STATE].idle.wait()

    listener = await aiohttp_server(create_metrics_app(relay.app[STATE].metrics.registry))
    async with aiohttp.ClientSession() as http:
        async with http.get(listener.make_url("/metrics")) as response:
            seen.append(await response.text())

    everything = "\n".join([*seen, repr(logs), caplog.text])
    assert "session_ended" in repr(logs) and "session_refused" in repr(logs)
    for secret in (AZURE_KEY, ALPHA_KEY, BETA_KEY, WRONG_KEY, METRICS_TOKEN):
        assert secret not in everything, f"a secret leaked: {secret[:6]}…"


def test_config_and_credential_reprs_hide_secrets():
    from relay.upstream.backends import build_credentials

    config = relay_config("http://127.0.0.1:1")
    credentials = build_credentials(config, ENVIRON)
    assert AZURE_KEY not in repr(credentials)
    with pytest.raises(Exception) as info:
        build_credentials(config, {})
    assert AZURE_KEY not in str(info.value)
