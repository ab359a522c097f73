"""What the handlers share: the process's state, and the config in force (replaced whole on
reload, so a request that took it once sees one config from start to end)."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from relay.edge.admission import AdmissionStore, AuthBrake
from relay.edge.auth import KeyRing, client_address
from relay.edge.budget import Budgets
from relay.edge.pass_gate import PassGate
from relay.errors import RelayUnavailable
from relay.ops.config import CredentialConfig, RelayConfig, TeamConfig
from relay.ops.descriptors import DescriptorWatch
from relay.ops.logsetup import CLIENT_ADDRESS
from relay.ops.metrics import LiveGauges, Metrics
from relay.session.continuity import ContinuitySettings
from relay.session.frames import MessageBudget
from relay.session.policy import SessionPolicy
from relay.session.pump import Bridge
from relay.upstream.backends import BackendPool
from relay.upstream.credentials import ApiKeyCredential, UpstreamCredential
from relay.upstream.handshake import Dialer


@dataclass(frozen=True, slots=True)
class LiveConfig:
    """The config in force and everything built from it. Replaced as one object on reload:
    a handler reads ``state.live`` once and uses that for the whole request."""

    config: RelayConfig
    keyring: KeyRing[TeamConfig]
    admin_keys: KeyRing[str]
    # One per distinct credential config, shared by every backend using it.
    credentials: Mapping[CredentialConfig, UpstreamCredential]
    # (team, deployment) -> the effective session policy.
    policies: Mapping[tuple[str, str], SessionPolicy]
    # (team, deployment) -> continuity settings, where it is on.
    continuity: Mapping[tuple[str, str], ContinuitySettings] = field(default_factory=dict)
    # deployment -> its backends; empty until the simulator (if any) has an address.
    pools: Mapping[str, BackendPool] = field(default_factory=dict)
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def origin_allowed(self, origin: str, host: str | None = None) -> bool:
        """Whether a page from ``origin`` may connect. With the playground on, the relay's own
        pages (``origin`` naming the ``host`` the request came to) may, whatever the list."""
        allowed = self.config.server.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        return bool(self.config.playground.enabled and host and urlsplit(origin).netloc == host)

    def client_address(self, request: web.BaseRequest) -> str:
        """The client's address (`auth.client_address`), kept on the request for its access line."""
        address = client_address(
            request.remote, request.headers.getall("X-Forwarded-For", ()), self.trusted_proxies
        )
        request[CLIENT_ADDRESS] = address
        return address


@dataclass(frozen=True, slots=True)
class SessionKey:
    """Which key opened a live session: a reload that removes the key ends the session."""

    key_hash: bytes
    team: str


@dataclass(slots=True)
class RelayState:
    """What the handlers share for the life of the process."""

    live: LiveConfig
    metrics: Metrics
    admission: AdmissionStore
    auth_throttle: AuthBrake
    budgets: Budgets
    live_gauges: LiveGauges = field(default_factory=LiveGauges)
    # The upstream's HTTP requests (WebRTC), and its WebSockets.
    http: aiohttp.ClientSession | None = None
    dialer: Dialer | None = None
    # Every open session, and the key that opened it.
    bridges: dict[Bridge, SessionKey | None] = field(default_factory=dict)
    # Set while no session is open: what a drain waits for.
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    draining: bool = False
    # Whether the process has descriptors to spare for another session.
    descriptors: DescriptorWatch = field(default_factory=DescriptorWatch)
    # The bytes of client messages still arriving, on every connection (its limit follows
    # the config's server.message_buffer_bytes).
    message_budget: MessageBudget = field(default_factory=lambda: MessageBudget(0))
    # Each team's part of it (teams.X.limits.message_buffer_bytes; 0: none), made on first use.
    team_message_budgets: dict[str, MessageBudget] = field(default_factory=dict)
    # At most so many set-ups take their first step in one pass of the event loop.
    set_up_gate: PassGate = field(default_factory=PassGate)
    simulator_url: str | None = None
    # What the relay presents to its in-process simulator: a key of this process alone, so
    # a simulator endpoint needs no secret in the environment.
    simulator_credential: UpstreamCredential = field(
        default_factory=lambda: ApiKeyCredential(secrets.token_urlsafe(24), "(in-process)")
    )
    reloading: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.idle.set()

    def track(self, bridge: Bridge, key: SessionKey | None) -> None:
        self.bridges[bridge] = key
        self.idle.clear()

    def forget(self, bridge: Bridge) -> None:
        self.bridges.pop(bridge, None)
        if not self.bridges:
            self.idle.set()

    def message_budget_for(self, team: TeamConfig) -> MessageBudget:
        """What a session of ``team`` counts its client messages still arriving in."""
        budget = self.team_message_budgets.get(team.name)
        if budget is None:
            limit = team.limits.message_buffer_bytes or 0
            budget = self.team_message_budgets[team.name] = MessageBudget(
                limit, parent=self.message_budget
            )
            held = self.metrics.message_buffer_team.labels(team.name)
            self.live_gauges.track(held, lambda: float(budget.held))
        return budget

    def check_open(self) -> None:
        """Refuse a new session or call (503) while this process takes none."""
        if self.draining:
            raise RelayUnavailable(503, "relay_draining", "The relay is restarting; retry shortly.")
        if self.descriptors.exhausted():
            raise RelayUnavailable(
                503,
                "relay_out_of_file_descriptors",
                "The relay has as many connections open as it can hold; retry later.",
                retry_after="1",
            )

    @property
    def ready(self) -> bool:
        return self.unready_reason is None

    @property
    def unready_reason(self) -> str | None:
        """Why the relay takes no new sessions now (/readyz), or None."""
        if self.draining:
            return "draining"
        pools = self.live.pools
        if not pools or not all(pool.usable for pool in pools.values()):
            return "no usable upstream credential"
        if self.descriptors.exhausted():
            return "out of file descriptors"
        return None


STATE = web.AppKey("state", RelayState)
REGISTRY = web.AppKey("registry", CollectorRegistry)
# Reloads the config and answers what happened (POST /admin/reload); set by the server.
Reload = Callable[[], Awaitable[dict[str, Any]]]
RELOAD: web.AppKey[Reload] = web.AppKey("reload")
# The bearer token /metrics requires, where it requires one.
METRICS_TOKEN = web.AppKey("metrics_token", str)
