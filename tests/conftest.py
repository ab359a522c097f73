from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from relay.app import create_app
from relay.edge.connection import RelayRunner
from relay.ops.config import RelayConfig, load_config
from relay.server import runner_options
from relay.simulator import RunningSimulator, SimulatorOptions, start_simulator
from tests.helpers import AZURE_KEY, ENVIRON

RelayFactory = Callable[..., Awaitable[TestServer]]
ROOT = Path(__file__).parent.parent


@pytest.fixture
async def simulator() -> AsyncIterator[RunningSimulator]:
    running = await start_simulator(SimulatorOptions(api_keys=frozenset({AZURE_KEY}), speed=0))
    yield running
    await running.close()


class RelayTestServer(TestServer):
    """aiohttp's TestServer on the relay's own runner (`RelayRunner`), as `relay serve`."""

    async def _make_runner(self, **kwargs: Any) -> RelayRunner:
        # aiohttp's TestServer cancels a handler when its client's connection is lost;
        # `relay serve` does not (aiohttp's default): the pumps see the loss themselves.
        kwargs.pop("handler_cancellation", None)
        return RelayRunner(self.app, **kwargs)


@pytest.fixture
async def start_relay() -> AsyncIterator[RelayFactory]:
    """Start a relay for a config on 127.0.0.1:0; stopped (sessions closed) at teardown."""
    servers: list[TestServer] = []

    async def start(
        config: RelayConfig, environ: dict[str, str] = ENVIRON, **server_kwargs: Any
    ) -> TestServer:
        server = RelayTestServer(create_app(config, environ), host="127.0.0.1")
        await server.start_server(**{**runner_options(config), **server_kwargs})
        servers.append(server)
        return server

    yield start
    while servers:
        await servers.pop().close()


@pytest.fixture
def start_fake(aiohttp_server: Any) -> Callable[[web.Application], Awaitable[TestServer]]:
    async def start(app: web.Application) -> TestServer:
        return await aiohttp_server(app)

    return start


@pytest.fixture
async def local_relay(start_relay: RelayFactory) -> TestServer:
    """config/local.toml as `make run` serves it (playground on), the simulator unpaced."""
    config = load_config(ROOT / "config" / "local.toml", {"RELAY_SIMULATOR__SPEED": "0"})
    return await start_relay(config, environ={"RELAY_SIMULATOR_KEY": "local-simulator-key"})
