"""What the handlers share: built once at start-up, read per request."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from relay.edge.admission import AdmissionStore, AuthThrottle
from relay.edge.auth import KeyRing, client_address
from relay.edge.budget import Budgets
from relay.ops.config import CredentialConfig, RelayConfig, TeamConfig
from relay.ops.metrics import LiveGauges, Metrics
from relay.session.policy import SessionPolicy
from relay.session.pump import Bridge
from relay.upstream.backends import BackendPool
from relay.upstream.credentials import UpstreamCredential


@dataclass(slots=True)
class RelayState:
    """What the handlers share: built once at start-up, read per request."""

    config: RelayConfig
    keyring: KeyRing[TeamConfig]
    admin_keys: KeyRing[str]
    # One per distinct credential config, shared by every backend using it.
    credentials: Mapping[CredentialConfig, UpstreamCredential]
    # (team, deployment) -> the effective session policy, built once.
    policies: Mapping[tuple[str, str], SessionPolicy]
    metrics: Metrics
    admission: AdmissionStore
    auth_throttle: AuthThrottle
    budgets: Budgets
    # deployment -> its backends; built once the simulator (if any) has an address.
    pools: dict[str, BackendPool] = field(default_factory=dict)
    live_gauges: LiveGauges = field(default_factory=LiveGauges)
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    http: aiohttp.ClientSession | None = None
    bridges: set[Bridge] = field(default_factory=set)
    # Set while no session is open: what a drain waits for.
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    draining: bool = False
    simulator_url: str | None = None

    def __post_init__(self) -> None:
        self.idle.set()
        self.trusted_proxies = tuple(
            ipaddress.ip_network(p, strict=False) for p in self.config.server.trusted_proxies
        )

    def track(self, bridge: Bridge) -> None:
        self.bridges.add(bridge)
        self.idle.clear()

    def forget(self, bridge: Bridge) -> None:
        self.bridges.discard(bridge)
        if not self.bridges:
            self.idle.set()

    def origin_allowed(self, origin: str, host: str | None = None) -> bool:
        """Whether a page from ``origin`` may connect. With the playground on, the relay's own
        pages (``origin`` naming the ``host`` the request came to) may, whatever the list."""
        allowed = self.config.server.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        return bool(self.config.playground.enabled and host and urlsplit(origin).netloc == host)

    def client_address(self, request: web.BaseRequest) -> str:
        return client_address(
            request.remote, request.headers.get("X-Forwarded-For", ""), self.trusted_proxies
        )

    @property
    def ready(self) -> bool:
        return (
            not self.draining
            and bool(self.pools)
            and all(pool.usable for pool in self.pools.values())
        )


STATE = web.AppKey("state", RelayState)
REGISTRY = web.AppKey("registry", CollectorRegistry)
# The bearer token /metrics requires, where it requires one.
METRICS_TOKEN = web.AppKey("metrics_token", str)
