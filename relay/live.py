"""The config in force: built at start-up, rebuilt and swapped whole on reload.

How a reload works:
- The file is read and checked as at start-up (every problem at once, secrets included). A
  bad one changes nothing; the reason is logged and counted.
- What can change live is rebuilt: key rings, policies, credentials (an unchanged credential
  keeps its instance and token cache), pools (an unchanged backend keeps its health),
  admission limits, the auth brake and the log level. Then ``state.live`` is replaced by one
  assignment: a request holds the object it started with, so it never sees half of two.
- Live sessions keep their sockets and policy. One whose key is gone is ended with an
  `error` event `key_revoked` and close 1008: a leaked key is cut at once.
- Settings bound at start (listen address, TLS, metrics listener, admission store...) keep
  their old values and are reported as needing a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from relay.edge.auth import KeyRing
from relay.edge.budget import SpendBook
from relay.edge.spend_book import RedisSpend
from relay.errors import ConfigError
from relay.ops.check import ConfigSource
from relay.ops.config import SIMULATOR_ENDPOINT, CredentialConfig, DeploymentConfig, RelayConfig
from relay.ops.logsetup import configure_logging
from relay.ops.metrics import WATCHED_OUTCOMES, configured_series
from relay.session.continuity import ContinuitySettings, build_continuity
from relay.session.policy import SessionPolicy, build_policy
from relay.state import LiveConfig, RelayState
from relay.upstream.backends import Backend, BackendPool
from relay.upstream.credentials import UpstreamCredential, build_credential
from relay.upstream.dial import realtime_url

_log = structlog.get_logger("relay.reload")

# Settings bound when the process starts: (section, field), None for the whole section.
RESTART_ONLY: tuple[tuple[str, str | None], ...] = (
    ("server", "host"),
    ("server", "port"),
    ("server", "tls"),
    ("server", "max_header_bytes"),
    ("server", "listen_backlog"),
    ("server", "watch_config"),
    ("server", "pid_file"),
    ("metrics", None),
    ("admission", None),
    ("upstream", "ca_file"),
    ("simulator", "speed"),
    ("playground", "enabled"),
)


def build_policies(config: RelayConfig) -> dict[tuple[str, str], SessionPolicy]:
    return {
        (team.name, name): build_policy(config.deployments[name], team)
        for team in config.teams.values()
        for name in team.deployments
    }


def build_continuities(config: RelayConfig) -> dict[tuple[str, str], ContinuitySettings]:
    """(team, deployment) -> continuity settings, where continuity is on."""
    built = {
        (team.name, name): build_continuity(config.deployments[name], team)
        for team in config.teams.values()
        for name in team.deployments
    }
    return {key: settings for key, settings in built.items() if settings is not None}


def build_live(
    config: RelayConfig,
    credentials: Mapping[CredentialConfig, UpstreamCredential],
    pools: Mapping[str, BackendPool] | None = None,
) -> LiveConfig:
    return LiveConfig(
        config=config,
        keyring=KeyRing.from_teams(config.teams.values()),
        admin_keys=KeyRing.of(config.admin.keys, "admin"),
        credentials=credentials,
        policies=build_policies(config),
        continuity=build_continuities(config),
        pools=pools or {},
        trusted_proxies=tuple(
            ipaddress.ip_network(p, strict=False) for p in config.server.trusted_proxies
        ),
    )


def build_pools(
    state: RelayState,
    config: RelayConfig,
    credentials: Mapping[CredentialConfig, UpstreamCredential],
) -> dict[str, BackendPool]:
    """A pool per deployment. A backend whose config and URL did not change is the same
    object as before, health and ejection included."""
    known = {
        (name, b.config, b.url): b for name, pool in state.live.pools.items() for b in pool.backends
    }
    pools = {}
    for name, deployment in config.deployments.items():
        backends = []
        for backend_config in deployment.backends:
            endpoint = backend_config.endpoint
            if endpoint == SIMULATOR_ENDPOINT:
                assert state.simulator_url is not None
                endpoint = state.simulator_url
                credential = state.simulator_credential
            else:
                credential = credentials[backend_config.credential]
            url = realtime_url(endpoint, deployment, backend_config.azure_deployment)
            backend = known.get((name, backend_config, url))
            backends.append(backend or Backend(backend_config, url, credential))
        pools[name] = _pool(state, config, deployment, backends)
    return pools


def _pool(
    state: RelayState, config: RelayConfig, deployment: DeploymentConfig, backends: list[Backend]
) -> BackendPool:
    metrics = state.metrics
    pool = BackendPool(
        deployment,
        backends,
        eject_after_failures=config.upstream.eject_after_failures,
        eject_seconds=config.upstream.eject_seconds,
        on_eject=lambda b: metrics.backend_ejections.labels(deployment.name, b.name).inc(),
    )
    for backend in backends:
        up = metrics.backend_up.labels(deployment.name, backend.name)
        state.live_gauges.track(up, _availability(pool, backend))
        limited = metrics.backend_rate_limited.labels(deployment.name, backend.name)
        state.live_gauges.track(limited, _rate_limited(pool, backend))
    return pool


def _availability(pool: BackendPool, backend: Backend) -> Callable[[], float]:
    # Ejected backends stay down once their ejection ends, until a handshake succeeds: the
    # next session only probes them. As "takes sessions", the gauge went back to 1 with the
    # upstream still dead, and its alerts resolved as soon as traffic paused.
    threshold = pool.eject_after_failures
    return lambda: float(
        backend.available(pool.clock()) and backend.consecutive_failures < threshold
    )


def _rate_limited(pool: BackendPool, backend: Backend) -> Callable[[], float]:
    return lambda: float(pool.clock() < backend.retry_after_until)


def zero_series(state: RelayState) -> None:
    """Export at 0 from the start the counters alerts and graphs take increase() of: a series
    born at 1 shows no increase. Again after a reload, for what it added."""
    metrics, live = state.metrics, state.live
    config = live.config
    for team, deployment_name in live.policies:
        for outcome in WATCHED_OUTCOMES:
            metrics.sessions.labels(team, deployment_name, outcome)
    for credential in live.credentials:
        if credential.type == "entra":
            metrics.credential_refresh_failures.labels(credential.method)
    if config.admission.backend == "redis":
        for team in config.teams:
            metrics.admission_errors.labels(team)
    for deployment in config.deployments.values():
        for backend in deployment.backends:
            metrics.backend_ejections.labels(deployment.name, backend.name)


def budget_gauges(state: RelayState, old: RelayConfig | None = None) -> None:
    """Each team's budgets and spend as gauges; a reload drops those ``old`` had and the
    config in force has not."""
    metrics, budgets = state.metrics, state.budgets
    wanted = {
        (team.name, window): limit
        for team in state.live.config.teams.values()
        for window, limit in (
            ("day", team.limits.max_usd_per_day),
            ("month", team.limits.max_usd_per_month),
        )
        if limit is not None
    }
    for (team, window), limit in wanted.items():
        metrics.budget.labels(team, window).set(limit)
        spent = metrics.budget_spent.labels(team, window)
        state.live_gauges.forget(spent)
        state.live_gauges.track(spent, _spent_in(budgets.book, team, window))
    # Only the series ``old`` had: asking for any other would create it (at 0, for good in
    # a worker's metric file).
    had = configured_series(old)["relay_budget_usd"][1] if old else frozenset()
    for team, window in had - wanted.keys():
        state.live_gauges.forget(metrics.budget_spent.labels(team, window))
        for gauge in (metrics.budget, metrics.budget_spent):
            with contextlib.suppress(KeyError):
                gauge.remove(team, window)


def _spent_in(book: SpendBook, team: str, window: str) -> Callable[[], float]:
    return lambda: float(getattr(book.spent(team), window))


@dataclass(frozen=True, slots=True)
class ReloadResult:
    outcome: Literal["applied", "unchanged", "rejected"]
    problems: tuple[str, ...] = ()
    # Dotted names of changed settings that keep their old value until a restart.
    restart_needed: tuple[str, ...] = ()
    sessions_revoked: int = 0

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def keep_bound_settings(old: RelayConfig, new: RelayConfig) -> tuple[RelayConfig, list[str]]:
    """``new`` with the settings bound at start put back to their ``old`` values, and the
    names of those that differed."""
    changed: list[str] = []
    sections: dict[str, Any] = {}
    for section, name in RESTART_ONLY:
        before, after = getattr(old, section), sections.get(section, getattr(new, section))
        if name is None:
            if before != after:
                changed.append(section)
                sections[section] = before
        elif getattr(before, name) != getattr(after, name):
            changed.append(f"{section}.{name}")
            sections[section] = dataclasses.replace(after, **{name: getattr(before, name)})
    return dataclasses.replace(new, **sections), changed


async def reload(state: RelayState, source: ConfigSource) -> ReloadResult:
    """Read and check the config file again and put it in force; one reload at a time."""
    async with state.reloading:
        try:
            # Reading and judging a file takes tens of milliseconds of CPU: in a thread, so
            # live sessions' frames keep flowing meanwhile (the GIL is handed over every 5 ms).
            config = await asyncio.to_thread(source.load, strict=True)
        except ConfigError as exc:
            return _reject(state, exc.problems)
        return await apply_config(state, config, source.environ)


async def apply_config(
    state: RelayState, new: RelayConfig, environ: Mapping[str, str]
) -> ReloadResult:
    """Put a checked config in force (see the module docstring)."""
    old = state.live
    config, restart_needed = keep_bound_settings(old.config, new)
    if config == old.config:
        result = ReloadResult("unchanged", restart_needed=tuple(restart_needed))
        _report(state, result)
        return result
    if config.uses_simulator and state.simulator_url is None:
        return _reject(
            state,
            ["a deployment now uses the built-in simulator: restart the relay to start it"],
        )
    try:
        credentials = await _credentials(state, old.credentials, config, environ)
    except ConfigError as exc:
        return _reject(state, exc.problems)
    live = build_live(config, credentials, build_pools(state, config, credentials))
    team_limits = {t.name: t.limits for t in config.teams.values()}
    state.admission.update_limits(config.limits, team_limits)
    state.budgets.limits = team_limits
    if isinstance(state.budgets.book, RedisSpend):
        state.budgets.book.teams = tuple(config.teams)  # whose shared spend it reads back
    # A lowered budget (or `live_sessions_over_budget = "end"`) may put a team over now: its
    # live sessions are judged at once, not when it next spends.
    state.budgets.book.changed.set()
    state.auth_throttle.update(config.limits)
    state.message_budget.limit = config.server.message_buffer_bytes
    for new_team in config.teams.values():
        state.message_budget_for(new_team)  # a team added: its budget and series
    for name, budget in list(state.team_message_budgets.items()):
        team = config.teams.get(name)
        budget.limit = (team.limits.message_buffer_bytes or 0) if team is not None else 0
        if team is None:  # gone: its series too (sessions that hold the budget keep it)
            del state.team_message_budgets[name]
            state.live_gauges.forget(state.metrics.message_buffer_team.labels(name))
            state.metrics.message_buffer_team.remove(name)
    if config.logging != old.config.logging:
        configure_logging(config.logging.level, config.logging.format)
    _forget_backends(state, old, live)
    state.live = live  # the swap: every request from here on sees the new config
    zero_series(state)
    budget_gauges(state, old.config)
    retired = [c for k, c in old.credentials.items() if k not in credentials]
    await asyncio.gather(*(c.close() for c in retired), return_exceptions=True)
    revoked = await revoke_sessions(state, live)
    result = ReloadResult("applied", (), tuple(restart_needed), revoked)
    _report(state, result, changed=_changed_sections(old.config, config))
    return result


async def _credentials(
    state: RelayState,
    current: Mapping[CredentialConfig, UpstreamCredential],
    config: RelayConfig,
    environ: Mapping[str, str],
) -> dict[CredentialConfig, UpstreamCredential]:
    """The new config's credentials: the current instance where the config is unchanged,
    new (and started) ones otherwise."""
    wanted = {
        b.credential
        for d in config.deployments.values()
        for b in d.backends
        if b.endpoint != SIMULATOR_ENDPOINT
    }
    built: dict[CredentialConfig, UpstreamCredential] = {}
    problems = []
    for credential_config in wanted:
        if credential_config in current:
            built[credential_config] = current[credential_config]
            continue
        try:
            failures = state.metrics.credential_refresh_failures.labels(credential_config.method)
            built[credential_config] = build_credential(credential_config, environ, failures.inc)
        except ValueError as exc:
            problems.append(f"environment: {exc}")
    if problems:
        raise ConfigError(sorted(problems))
    fresh = [c for k, c in built.items() if k not in current]
    await asyncio.gather(*(c.start() for c in fresh))
    return built


def _forget_backends(state: RelayState, old: LiveConfig, new: LiveConfig) -> None:
    """Remove the health gauges of backends the new config dropped."""
    kept = {(name, b.name) for name, pool in new.pools.items() for b in pool.backends}
    for name, pool in old.pools.items():
        for backend in pool.backends:
            if (name, backend.name) not in kept:
                for metric in (state.metrics.backend_up, state.metrics.backend_rate_limited):
                    state.live_gauges.forget(metric.labels(name, backend.name))
                    metric.remove(name, backend.name)


async def revoke_sessions(state: RelayState, live: LiveConfig) -> int:
    """End every session whose key no longer opens a session for its team."""
    revoked = []
    for bridge, key in list(state.bridges.items()):
        if key is None:
            continue
        team = live.keyring.identify_hash(key.key_hash)
        if team is None or team.name != key.team:
            revoked.append(bridge)
    if revoked:
        _log.warning("sessions_revoked", sessions=len(revoked), reason="key_removed")
        await asyncio.gather(
            *(
                bridge.stop(
                    1008,
                    "key revoked",
                    cause="key_revoked",
                    message="The relay key of this session was revoked; the session is closed.",
                    error_type="invalid_request_error",
                )
                for bridge in revoked
            )
        )
    return len(revoked)


def _changed_sections(old: RelayConfig, new: RelayConfig) -> list[str]:
    names = [f.name for f in dataclasses.fields(RelayConfig)]
    return [n for n in names if getattr(old, n) != getattr(new, n)]


def _reject(state: RelayState, problems: list[str]) -> ReloadResult:
    result = ReloadResult("rejected", tuple(problems))
    _report(state, result)
    return result


def _report(state: RelayState, result: ReloadResult, changed: list[str] | None = None) -> None:
    state.metrics.config_reloads.labels(result.outcome).inc()
    if result.outcome == "rejected":
        _log.error("config_reload_rejected", problems=list(result.problems))
        return
    _log.info(
        "config_reloaded",
        outcome=result.outcome,
        changed=changed or [],
        sessions_revoked=result.sessions_revoked,
    )
    if result.restart_needed:
        _log.warning("config_needs_restart", settings=list(result.restart_needed))
