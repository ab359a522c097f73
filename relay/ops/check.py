"""One pass over a config: every problem at once, before anything starts or is reloaded.

Besides what `config.py` checks table by table, this checks what needs the whole config:
- session defaults as the service will judge them: each deployment's, then each team's on
  top, in the deployment's dialect, through the simulator's session validator (as strict as
  Azure and no stricter). A default the service refuses would fail every session with 502.
- secrets: the environment variables and files the config names (TLS certificates and
  keys, the upstream CA bundle included). A problem at start-up, on reload (the TLS files
  excepted: a reload does not load them) and with `check-config --strict`; a warning for a
  plain `check-config` (run where the secrets are not).
Warnings, never problems: a relay reachable beyond loopback with every Origin allowed, or
without TLS and no trusted proxy in front; spend budgets summed in the process.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.errors import ConfigError
from relay.ops.config import DeploymentConfig, RelayConfig, TeamConfig, read_config
from relay.session.policy import build_policy
from relay.session.schema import ga_path, get_path, set_path
from relay.simulator.errors import ClientEventError
from relay.simulator.schema import BETA, GA
from relay.simulator.session import apply_update, default_session

# Enough to find every wrong default of a fragment; each pass removes the one it found.
_MAX_PASSES = 32
_ANY_TEAM = TeamConfig("(none)", ("sha256:" + "0" * 64,), ())


@dataclass(frozen=True, slots=True)
class CheckedConfig:
    config: RelayConfig
    # Secrets missing where the check was not strict, and exposure warnings.
    warnings: list[str]


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """Where the config comes from: its file and the environment (with the command line's
    overrides), read again on each reload."""

    path: str | Path
    environ: Mapping[str, str]

    def load(self, *, strict: bool) -> RelayConfig:
        """The config a reload applies (`reloading`: see `check_config`)."""
        return check_config(self.path, self.environ, strict=strict, reloading=True).config


def check_config(
    path: str | Path, environ: Mapping[str, str], *, strict: bool, reloading: bool = False
) -> CheckedConfig:
    """Raise ConfigError listing every problem found, or return the config and warnings.
    ``reloading``: the TLS files are warnings, not problems, since a reload does not load
    them (the certificate watcher loads a changed pair itself, `upstream.ca_file` needs a
    restart): a certificate half-written by a rotation refused every reload, one that
    revokes a leaked key included."""
    reading = read_config(path, environ)
    source = str(path)
    problems = list(reading.problems)
    problems += session_default_problems(reading.deployments, reading.teams, source)
    problems += policy_path_problems(reading.deployments, reading.teams, source)
    if reading.config is None or problems:
        raise ConfigError(problems)
    config = reading.config
    secrets = secret_problems(config, environ)
    files = tls_file_problems(config)
    if strict and (secrets or (files and not reloading)):
        raise ConfigError([*secrets, *([] if reloading else files)])
    warnings = [*secrets, *files, *exposure_warnings(config), *budget_warnings(config)]
    return CheckedConfig(config, warnings)


def session_default_problems(
    deployments: Mapping[str, DeploymentConfig], teams: Mapping[str, TeamConfig], source: str
) -> list[str]:
    """Each session default the service would refuse, named where the file sets it."""
    problems = []
    refused: dict[str, set[tuple[str, str]]] = {}
    for name, deployment in deployments.items():
        found = refused[name] = set(_refused_defaults(deployment, _ANY_TEAM))
        for path, message in sorted(found):
            problems.append(f"{source}: deployments.{name}.session.{path}: {message}")
    for team in teams.values():
        for name in team.deployments:
            if name not in deployments:
                continue  # reported as an unknown deployment
            found = set(_refused_defaults(deployments[name], team)) - refused[name]
            for path, message in sorted(found):
                problems.append(
                    f"{source}: teams.{team.name}.session.{path} (on deployment {name}): {message}"
                )
    return problems


def _refused_defaults(deployment: DeploymentConfig, team: TeamConfig) -> list[tuple[str, str]]:
    """(GA path, the service's message) for each default it would refuse: the fragment is
    judged, the refused field taken out, and judged again, until it passes."""
    if deployment.kind != "realtime":
        return []  # a transcription session's shape is judged by the service at start
    fragment = _plain(build_policy(deployment, team).defaults)
    if not fragment:
        return []
    dialect = GA if deployment.protocol == "ga" else BETA
    session = default_session(
        dialect, session_id="sess_check", model=deployment.azure_deployment, expires_at=0
    )
    found = []
    for _ in range(_MAX_PASSES):
        try:
            apply_update(dialect, session, fragment)
            break
        except ClientEventError as exc:
            param = (exc.param or "").removeprefix("session.")
            path = param if dialect is GA else ga_path(param)
            found.append((path or "(session)", f"the service refuses this default: {exc.message}"))
            if not param or not _remove(fragment, param):
                break
    return found


def policy_path_problems(
    deployments: Mapping[str, DeploymentConfig], teams: Mapping[str, TeamConfig], source: str
) -> list[str]:
    """Each path of a `locked`, `allowed_values` or `max_values` rule that names no session
    field: a typo there (`audio.output.voise`) held nothing, and the client set the field."""
    owners = [
        (f"deployments.{name}.policy", d.policy)
        for name, d in deployments.items()
        if d.kind == "realtime"  # a transcription session's paths are checked with its config
    ]
    owners += [(f"teams.{name}.policy", team.policy) for name, team in teams.items()]
    problems = []
    for where, policy in owners:
        rules: dict[str, Mapping[str, Any]] = {
            "locked": dict.fromkeys(policy.locked or ()),
            "allowed_values": {
                p: (v or [None])[0] for p, v in (policy.allowed_values or {}).items()
            },
            "max_values": dict(policy.max_values or {}),
        }
        for rule, values in rules.items():
            for path, value in values.items():
                if _names_no_field(path, value):
                    problems.append(
                        f"{source}: {where}.{rule}: {path!r} is not a session field "
                        "(the rule would hold nothing)"
                    )
    return problems


# A turn detection table's fields depend on its type: a path is a field under either.
_TURN_DETECTION = "audio.input.turn_detection"
_TURN_DETECTION_TYPES = ("server_vad", "semantic_vad")


def _names_no_field(path: str, value: Any) -> bool:
    """Whether the service refuses ``path`` (set to ``value``, or its default's value) as
    an unknown parameter, however its tables are typed."""
    base = default_session(GA, session_id="sess_check", model="check", expires_at=0)
    present, default = get_path(base, path)
    probe = value if value is not None else (default if present else "x")
    variants: tuple[str | None, ...] = (None,)
    if path.startswith(_TURN_DETECTION + "."):
        variants = _TURN_DETECTION_TYPES
    for kind in variants:
        fragment: dict[str, Any] = {"type": "realtime"}
        set_path(fragment, path, _plain(probe))
        if kind is not None:
            set_path(fragment, _TURN_DETECTION + ".type", kind)
        try:
            apply_update(GA, base, fragment)
        except ClientEventError as exc:
            param = exc.param or ""
            if exc.code == "unknown_parameter" and f"session.{path}.".startswith(param + "."):
                continue  # unknown under this type: perhaps known under another
        return False
    return True


def _plain(value: Any) -> Any:
    """A mutable deep copy (policy defaults may hold tuples from the config)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _remove(fragment: dict[str, Any], param: str) -> bool:
    """Take the deepest existing table entry on ``param``'s path out of ``fragment``."""
    parts = param.split(".")
    for length in range(len(parts), 0, -1):
        *parents, leaf = parts[:length]
        node: Any = fragment
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            del node[leaf]
            return True
    return False


def redis_url_problem(env: str, environ: Mapping[str, str]) -> str | None:
    """What is wrong with the Redis URL in ``env``, if anything (never the URL itself: it
    may hold a password)."""
    from redis.asyncio.connection import parse_url

    url = environ.get(env, "").strip()
    if not url:
        return f"environment: admission.redis_url_env: {env} is not set or empty"
    try:
        parse_url(url)
    except ValueError:
        return (
            f"environment: admission.redis_url_env: {env} is not a Redis URL "
            "(redis://, rediss:// or unix://, with a numeric port)"
        )
    return None


def secret_problems(config: RelayConfig, environ: Mapping[str, str]) -> list[str]:
    """Every secret the config names that the environment lacks."""
    from relay.upstream.backends import build_credentials

    problems = []
    try:
        build_credentials(config, environ)
    except ConfigError as exc:
        problems += exc.problems
    if config.admission.backend == "redis":
        problem = redis_url_problem(config.admission.redis_url_env, environ)
        if problem is not None:
            problems.append(problem)
    metrics = config.metrics
    if metrics.enabled and metrics.on_main_port and metrics.token_env:
        if not environ.get(metrics.token_env, ""):
            problems.append(
                f"environment: metrics.token_env: {metrics.token_env} is not set or empty"
            )
    return problems


def tls_file_problems(config: RelayConfig) -> list[str]:
    """The TLS files the config names that cannot be loaded where the check runs (a wrong
    mount crashed the relay at start with a traceback naming no file)."""
    problems = []
    tls = config.server.tls
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_password)
        except (OSError, ssl.SSLError, ValueError) as exc:
            problems.append(
                f"server.tls: cert_file {tls.cert_file} and key_file {tls.key_file} cannot be "
                f"loaded ({_tls_error(exc, 'PEM certificates and an unencrypted key that match')})"
            )
    ca_file = config.upstream.ca_file
    if ca_file is not None:
        try:
            ssl.create_default_context().load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            problems.append(
                f"upstream.ca_file: {ca_file} cannot be loaded "
                f"({_tls_error(exc, 'PEM CA certificates')})"
            )
    return problems


def _no_password() -> bytes:
    """An encrypted key is refused (OpenSSL would otherwise ask on the terminal)."""
    raise ValueError("the key file is encrypted")


def _tls_error(exc: BaseException, wanted: str) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"not {wanted}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) if isinstance(exc, ValueError) else type(exc).__name__


def exposure_warnings(config: RelayConfig) -> list[str]:
    """What a relay listening beyond loopback should not be without."""
    server = config.server
    if _is_loopback(server.host):
        return []
    warnings = []
    if "*" in server.allowed_origins:
        warnings.append(
            f"server.host = {server.host!r} listens beyond loopback with every Origin allowed: "
            "any web page can use a key it holds; list your apps in server.allowed_origins"
        )
    if server.tls is None and not server.trusted_proxies:
        warnings.append(
            f"server.host = {server.host!r} listens beyond loopback without TLS and without a "
            "trusted proxy in front: keys cross the network in clear; set [server.tls], or "
            "terminate TLS in a proxy and list it in server.trusted_proxies"
        )
    return warnings


def budget_warnings(config: RelayConfig) -> list[str]:
    """Budgets summed in the process: each process holds its own, forgotten at a restart."""
    if config.admission.backend == "redis":
        return []
    teams = sorted(name for name, team in config.teams.items() if team.limits.has_budget)
    if not teams:
        return []
    return [
        f"teams {', '.join(teams)} have spend budgets summed in the process "
        '(admission.backend = "memory"): each relay process (every worker, every replica) '
        "holds its own, and a restart starts it again at 0; set admission.backend = "
        '"redis" for budgets that hold across processes and restarts'
    ]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost: it may resolve anywhere
