"""Upstream pools: which Azure backend a new session goes to, and failover between them.

Rules:
- A session goes to the lowest `priority` number that has an available backend, spread by
  `weight` among the backends of that priority. The others are tried next, in the same
  order, if the handshake fails: connect failure, timeout, 401/403, 429 or 5xx.
- A backend that fails `eject_after_failures` handshakes in a row is ejected for
  `eject_seconds`; the first session after that probes it (one more failure ejects it
  again at once, a success makes it healthy). A 429 is no failure: its Retry-After keeps
  new sessions away from that backend for that long, and it is never ejected for it (a
  quota event was answered 503 "no backend", paging as an outage, and kept the backend out
  for eject_seconds rather than Azure's time). A backend whose credential has no valid
  token is skipped.
- The state is per process: each relay process learns its backends' health for itself.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import structlog
from yarl import URL

from relay.errors import ConfigError, UpstreamRefused
from relay.ops.config import (
    SIMULATOR_ENDPOINT,
    BackendConfig,
    CredentialConfig,
    DeploymentConfig,
    RelayConfig,
)
from relay.upstream.credentials import UpstreamCredential, build_credential
from relay.upstream.handshake import UpstreamTarget

_log = structlog.get_logger("relay.upstream.backends")


@dataclass(slots=True)
class Backend:
    config: BackendConfig
    url: URL
    credential: UpstreamCredential
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    retry_after_until: float = 0.0
    # The URL's address and request head, built once rather than per session.
    target: UpstreamTarget = field(init=False)

    def __post_init__(self) -> None:
        self.target = UpstreamTarget.of(self.url)

    @property
    def name(self) -> str:
        return self.config.name

    def state(self, now: float) -> str:
        if now < self.ejected_until:
            return "ejected"
        if now < self.retry_after_until:
            return "rate_limited"
        if not self.credential.usable:
            return "no_credential"
        return "healthy" if self.consecutive_failures == 0 else "failing"

    def available(self, now: float) -> bool:
        return self.state(now) in ("healthy", "failing")


@dataclass(slots=True)
class BackendPool:
    deployment: DeploymentConfig
    backends: list[Backend]
    eject_after_failures: int
    eject_seconds: float
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    on_eject: Callable[[Backend], None] = lambda backend: None

    def candidates(self) -> list[Backend]:
        """Available backends in the order to try them (priority, then weighted draw)."""
        now = self.clock()
        available = [b for b in self.backends if b.available(now)]
        # Efraimidis-Spirakis: sorting by u**(1/w) is a weighted draw without replacement.
        keyed = [
            (b.config.priority, -(self.rng.random() ** (1 / b.config.weight)), b) for b in available
        ]
        return [b for _, _, b in sorted(keyed, key=lambda k: (k[0], k[1]))]

    def unavailable_refusal(self) -> UpstreamRefused:
        """What a client gets when no backend may be tried now: 429 while they are all
        rate limited, else 503; Retry-After says when the first one is back."""
        now = self.clock()
        waits = [
            max(b.ejected_until, b.retry_after_until) - now
            for b in self.backends
            if max(b.ejected_until, b.retry_after_until) > now
        ]
        retry = str(max(1, math.ceil(min(waits)))) if waits else "5"
        if all(b.state(now) == "rate_limited" for b in self.backends):
            return UpstreamRefused(
                429,
                "upstream_rate_limited",
                "The upstream service is rate limiting; retry later.",
                retry_after=retry,
            )
        return UpstreamRefused(
            503,
            "no_backend_available",
            "No upstream backend is available for this deployment; retry later.",
            retry_after=retry,
        )

    def succeeded(self, backend: Backend) -> None:
        if backend.consecutive_failures:
            _log.info("backend_recovered", deployment=self.deployment.name, backend=backend.name)
        backend.consecutive_failures = 0
        backend.ejected_until = 0.0

    def failed(self, backend: Backend, refusal: UpstreamRefused) -> None:
        now = self.clock()
        if refusal.status == 429:
            # Whole seconds, 1 to 300 (`dial.retry_after_seconds`); 1 without one.
            backend.retry_after_until = now + float(refusal.retry_after or "1")
            return
        backend.consecutive_failures += 1
        if backend.consecutive_failures >= self.eject_after_failures:
            backend.ejected_until = now + self.eject_seconds
            _log.warning(
                "backend_ejected",
                deployment=self.deployment.name,
                backend=backend.name,
                failures=backend.consecutive_failures,
                eject_seconds=self.eject_seconds,
                reason=refusal.code,
            )
            self.on_eject(backend)

    @property
    def usable(self) -> bool:
        """Whether any backend could authenticate now (ejection aside: every relay process
        shares the same backends, so taking this one out of rotation would not help)."""
        return any(b.credential.usable for b in self.backends)

    def describe(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [
            {
                "name": b.name,
                "state": b.state(now),
                "endpoint": str(b.url.with_query(None)),
                "priority": b.config.priority,
                "weight": b.config.weight,
                "consecutive_failures": b.consecutive_failures,
                "ejected_for_seconds": round(max(0.0, b.ejected_until - now), 3),
                "rate_limited_for_seconds": round(max(0.0, b.retry_after_until - now), 3),
                "credential": b.credential.describe(),
            }
            for b in self.backends
        ]


def build_credentials(
    config: RelayConfig,
    environ: Mapping[str, str],
    on_refresh_failure: Callable[[CredentialConfig], None] = lambda config: None,
) -> dict[CredentialConfig, UpstreamCredential]:
    """One credential per distinct credential config; every missing secret reported at once.
    ``on_refresh_failure`` hears of each failed Entra token fetch. A simulator backend needs
    none: the relay gives its in-process simulator a key of its own."""
    built: dict[CredentialConfig, UpstreamCredential] = {}
    problems: list[str] = []
    for deployment in config.deployments.values():
        for backend in deployment.backends:
            if backend.credential in built or backend.endpoint == SIMULATOR_ENDPOINT:
                continue
            try:
                credential = backend.credential
                built[credential] = build_credential(
                    credential, environ, partial(on_refresh_failure, credential)
                )
            except ValueError as exc:
                problems.append(f"environment: {credential_key(deployment, backend)}: {exc}")
    if problems:
        raise ConfigError(sorted(set(problems)))
    return built


def credential_key(deployment: DeploymentConfig, backend: BackendConfig) -> str:
    """Where the file sets a backend's credential (an inline backend has no name there)."""
    if deployment.endpoint:
        return f"deployments.{deployment.name}.credential"
    index = deployment.backends.index(backend)
    return f"deployments.{deployment.name}.backends[{index}].credential"
