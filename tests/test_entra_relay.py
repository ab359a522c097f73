"""The relay with an Entra ID credential: real azure-identity against a local token endpoint."""

from __future__ import annotations

import time

import aiohttp
import pytest

from relay.state import STATE
from tests.entra_fake import IDENTITY_HEADER, PATH, FakeIdentityEndpoint
from tests.helpers import ALPHA_KEY, UPGRADE, FakeUpstream, read_until, relay_config


@pytest.fixture
async def identity(aiohttp_server, monkeypatch):
    endpoint = FakeIdentityEndpoint(time.time, lifetime=3600)
    server = await aiohttp_server(endpoint.app())
    monkeypatch.setenv("IDENTITY_ENDPOINT", str(server.make_url(PATH)))
    monkeypatch.setenv("IDENTITY_HEADER", IDENTITY_HEADER)
    return endpoint


def entra_config(endpoint: str):
    return relay_config(
        endpoint,
        deployments={
            "gpt-realtime": {
                "endpoint": endpoint,
                "credential": {"type": "entra", "method": "managed-identity"},
            }
        },
    )


async def test_token_refresh_during_a_live_session_does_not_disturb_it(
    identity, start_fake, start_relay
):
    fake = FakeUpstream()
    upstream = await start_fake(fake.app())
    relay = await start_relay(
        entra_config(str(upstream.make_url(""))), environ={"TEST_AZURE_KEY": "unused"}
    )
    url = relay.make_url("/openai/v1/realtime?model=gpt-realtime")
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url, headers={"api-key": ALPHA_KEY})
        await read_until(ws, "session.created")
        first = fake.requests[0]["headers"]["Authorization"]
        assert first == f"Bearer {identity.issued[0]}"
        assert "api-key" not in {k.lower() for k in fake.requests[0]["headers"]}

        credentials = relay.app[STATE].live.credentials.values()
        credential = next(c for c in credentials if c.describe()["type"] == "entra")
        assert await credential.refresh()  # a new token arrives mid-session
        assert len(identity.issued) == 2
        await ws.send_str('{"type":"input_audio_buffer.clear"}')
        await read_until(ws, "input_audio_buffer.clear")  # the live session is untouched

        second = await http.ws_connect(url, headers={"api-key": ALPHA_KEY})
        await read_until(second, "session.created")
        assert fake.requests[1]["headers"]["Authorization"] == f"Bearer {identity.issued[1]}"
        await second.close()
        await ws.close()
    assert len(identity.requests) == 2  # never fetched per session


async def test_no_valid_token_means_not_ready_and_503(identity, start_fake, start_relay):
    identity.failing = True
    upstream = await start_fake(FakeUpstream().app())
    relay = await start_relay(
        entra_config(str(upstream.make_url(""))), environ={"TEST_AZURE_KEY": "unused"}
    )
    async with aiohttp.ClientSession() as http:
        async with http.get(relay.make_url("/readyz")) as response:
            assert response.status == 503
        url = relay.make_url("/openai/v1/realtime?model=gpt-realtime")
        headers = {"api-key": ALPHA_KEY, **UPGRADE}
        async with http.get(url, headers=headers) as response:
            assert response.status == 503
            body = await response.json()
    assert body["error"]["code"] in ("upstream_credential_unavailable", "no_backend_available")
    registry = relay.app[STATE].metrics.registry
    assert (
        registry.get_sample_value(
            "relay_backend_up", {"deployment": "gpt-realtime", "backend": "default"}
        )
        == 0
    )
    # Each failed token fetch is counted, by the credential's method.
    failures = registry.get_sample_value(
        "relay_credential_refresh_failures_total", {"credential": "managed-identity"}
    )
    assert failures is not None and failures >= 1
