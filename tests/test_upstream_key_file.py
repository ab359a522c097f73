"""The upstream key read from a file, and read again when the file changes (a rotated key in
a mounted Secret), against the simulator, which checks the key as Azure does."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import pytest

from relay.errors import ConfigError
from relay.ops.config import parse_config
from relay.state import STATE
from relay.upstream.credentials import ApiKeyFileCredential
from tests.helpers import ALPHA_KEY, AZURE_KEY, UPGRADE, read_until, relay_config


def _rotate(path: Path, key: str) -> None:
    staged = path.with_name(".key.new")
    staged.write_text(key + "\n")
    os.replace(staged, path)  # as a Secret volume swaps it: a new file in its place


async def test_a_rotated_key_is_used_by_the_next_session_without_a_restart(
    simulator, start_relay, tmp_path
):
    key_file = tmp_path / "azure-key"
    _rotate(key_file, "an-old-key-azure-no-longer-takes")
    relay = await start_relay(
        relay_config(
            simulator.url,
            deployments={
                "gpt-realtime": {
                    "endpoint": simulator.url,
                    "azure_deployment": "az-gpt-realtime",
                    "credential": {"file": str(key_file)},
                },
            },
        )
    )
    [credential] = [
        c for c in relay.app[STATE].live.credentials.values() if isinstance(c, ApiKeyFileCredential)
    ]
    url = relay.make_url("/openai/v1/realtime?model=gpt-realtime")
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers={"api-key": ALPHA_KEY, **UPGRADE}) as refused:
            assert refused.status == 502
            assert (await refused.json())["error"]["code"] == "upstream_auth_failed"

        _rotate(key_file, AZURE_KEY)
        assert await credential.reload()  # what its watch does when the file changes
        async with http.ws_connect(url, headers={"api-key": ALPHA_KEY}) as ws:
            await read_until(ws, "session.created")

        # Emptied mid-update: the key in use stays.
        _rotate(key_file, "")
        assert not await credential.reload()
        async with http.ws_connect(url, headers={"api-key": ALPHA_KEY}) as ws:
            await read_until(ws, "session.created")


def test_a_missing_or_empty_key_file_is_a_start_up_problem(tmp_path):
    from relay.errors import ConfigError
    from relay.upstream.backends import build_credentials

    for content in (None, "  \n"):
        key_file = tmp_path / "azure-key"
        if content is not None:
            key_file.write_text(content)
        config = relay_config(
            "https://res.openai.azure.com",
            deployments={
                "other": {
                    "endpoint": "https://res.openai.azure.com",
                    "credential": {"file": str(key_file)},
                }
            },
        )
        with pytest.raises(ConfigError) as info:
            build_credentials(config, {"TEST_AZURE_KEY": AZURE_KEY})
        [problem] = info.value.problems
        assert problem.startswith(f"environment: deployments.other.credential: key file {key_file}")


def test_a_key_from_the_environment_and_a_file_is_refused():
    """Both given, the file won, and `check-config` showed the variable as if in use."""
    data = {
        "deployments": {
            "d": {
                "endpoint": "https://x.openai.azure.com",
                "credential": {"env": "GOOD_KEY", "file": "/run/secrets/azure-key"},
            }
        },
        "teams": {"t": {"keys": [f"sha256:{'0' * 64}"], "deployments": ["d"]}},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="relay.toml")
    assert info.value.problems == [
        "relay.toml: deployments.d.credential: env and file are two places for one key: give one"
    ]
