"""Typed, validated configuration: a TOML file plus ``RELAY_*`` environment overrides.

The file never holds secrets: it names the environment variable that holds each upstream key,
and stores team keys as hashes (``relay hash-key``). Every problem found is reported at once,
each naming where it came from (file or env var), the key and what is wrong.

Environment overrides: ``RELAY_<SECTION>__<KEY>`` sets ``section.key``; ``__`` separates
levels, matching is case-insensitive and ``-`` in names matches ``_``. So
``RELAY_SERVER__PORT=9000`` sets ``server.port`` and
``RELAY_DEPLOYMENTS__GPT_REALTIME__ENDPOINT=...`` sets ``deployments.gpt-realtime.endpoint``.
Values are read as TOML values when they parse (``9000``, ``true``, ``["a", "b"]``) and as
plain strings otherwise.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

from relay.errors import ConfigError

ENV_PREFIX = "RELAY_"
SIMULATOR_ENDPOINT = "simulator"
GA_API_VERSION = "2025-08-28"
DEFAULT_PREVIEW_API_VERSION = "2025-04-01-preview"
KEY_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Invalid(ValueError):
    """Every problem one table has, found in one pass (raised by ``__post_init__``)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _report(problems: list[str]) -> None:
    if problems:
        raise Invalid(problems)


def _not_positive(table: object, names: Iterable[str]) -> list[str]:
    """A problem for each of ``names`` set to 0 or less (None is unset, and fine)."""
    return [
        f"{name} must be greater than 0"
        for name in names
        if (value := getattr(table, name)) is not None and value <= 0
    ]


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert_file: Path
    key_file: Path


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # Largest WebSocket message accepted from either side. One append may carry 15 MiB of
    # audio (about 20 MiB of JSON) and `conversation.item.retrieved` returns a whole audio
    # item in base64: 32 MiB admits both (an item of up to ~8 minutes of 24 kHz PCM16).
    max_message_bytes: int = 32 * 1024 * 1024
    # Bytes of client messages a process holds while they arrive, across its connections: a
    # message counts from its first frame's header until it is whole. Without a bound, a
    # few clients sending most of a large message and then nothing hold memory enough to
    # have the process killed. A frame past it closes its client with 1013 (try again
    # later), unless its message is 64 KiB or less (live audio goes on, up to twice the
    # bound). 0: no bound; else at least max_message_bytes.
    message_buffer_bytes: int = 256 * 1024 * 1024
    heartbeat_seconds: float = 20.0
    # Pings a client may send per second (burst twice that); a ping flood closes with 1008.
    max_pings_per_second: float = 5.0
    close_timeout_seconds: float = 5.0
    # A peer that takes no data for this long while the relay has some for it is closed.
    stall_timeout_seconds: float = 10.0
    # Kernel send buffer per client socket: bounds what queues for a slow client before the
    # relay stops reading its upstream. 0 leaves the OS default (which can reach megabytes).
    client_send_buffer_bytes: int = 262144
    # Browser Origins allowed to connect; ["*"] allows any (keys, not cookies, authenticate).
    allowed_origins: tuple[str, ...] = ("*",)
    # Proxies (addresses or CIDR networks) whose X-Forwarded-For is believed: behind a load
    # balancer, the client's own address is what the auth brake and the logs need.
    trusted_proxies: tuple[str, ...] = ()
    # Longest request line and header field accepted (the relay answers 400 beyond).
    max_header_bytes: int = 16384
    # Connections the kernel queues for the relay to accept (capped by net.core.somaxconn).
    # aiohttp's 128 overflowed in a reconnect storm (the clients of a restarted replica
    # arriving at once): each dropped handshake costs its client a 1 s, then 3 s, retry.
    listen_backlog: int = 2048
    # A connection must complete its request line and headers within this many seconds of
    # opening (or of a later request's first byte); else it is closed (408 if it sent some).
    header_timeout_seconds: float = 10.0
    # An open connection between requests is closed after this many idle seconds. Above the
    # 60 s for which load balancers and ingress-nginx keep idle upstream connections, so the
    # relay never closes one they are about to reuse.
    keepalive_timeout_seconds: float = 75.0
    # On SIGTERM: how long sessions may finish the response in progress before 1001.
    drain_grace_seconds: float = 25.0
    # Under --workers: a worker whose event loop has not beaten for this long (frozen,
    # stopped, deadlocked) is killed and started again.
    worker_unresponsive_seconds: float = 30.0
    tls: TlsConfig | None = None
    # Reload when the config file changes on disk (a Kubernetes ConfigMap update).
    watch_config: bool = False
    # Where `relay serve` writes its process id, for `relay reload` to find it.
    pid_file: Path | None = None

    def __post_init__(self) -> None:
        problems = _not_positive(
            self,
            (
                "max_message_bytes", "heartbeat_seconds", "close_timeout_seconds",
                "stall_timeout_seconds", "max_header_bytes", "max_pings_per_second",
                "header_timeout_seconds", "keepalive_timeout_seconds", "listen_backlog",
                "worker_unresponsive_seconds",
            ),
        )  # fmt: skip
        if not 0 <= self.port <= 65535:
            problems.append("port must be between 0 and 65535")
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError as exc:
                problems.append(f"trusted_proxies: {exc}")
        for name in ("client_send_buffer_bytes", "drain_grace_seconds"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be 0 or more")
        if self.message_buffer_bytes != 0 and self.message_buffer_bytes < self.max_message_bytes:
            # Else a message the relay accepts could never be taken: 1013 on every retry.
            problems.append(
                "message_buffer_bytes must be 0 (no bound) or at least max_message_bytes "
                f"({self.max_message_bytes})"
            )
        _report(problems)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    connect_timeout_seconds: float = 10.0
    heartbeat_seconds: float = 20.0
    # While a response is in progress, an upstream silent this long is stalled: the client
    # gets `upstream_stalled` and 1011 rather than waiting for ever.
    response_timeout_seconds: float = 60.0
    # Extra CA bundle for upstream TLS (private endpoints, test fakes); system CAs otherwise.
    ca_file: Path | None = None
    # A backend failing this many handshakes in a row is ejected for eject_seconds, then
    # probed by the next session.
    eject_after_failures: int = 3
    eject_seconds: float = 30.0

    def __post_init__(self) -> None:
        names = (
            "connect_timeout_seconds", "heartbeat_seconds", "eject_after_failures",
            "eject_seconds", "response_timeout_seconds",
        )  # fmt: skip
        _report(_not_positive(self, names))


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Relay-wide admission limits and the brake on failed authentication."""

    max_sessions: int | None = None
    max_new_sessions_per_second: float | None = None
    # An address with this many failed authentications within the window is refused
    # (429) for block_seconds, without its keys being checked.
    auth_failures_allowed: int = 10
    auth_failure_window_seconds: float = 60.0
    auth_block_seconds: float = 60.0

    def __post_init__(self) -> None:
        names = (
            "max_sessions", "max_new_sessions_per_second", "auth_failures_allowed",
            "auth_failure_window_seconds", "auth_block_seconds",
        )  # fmt: skip
        _report(_not_positive(self, names))


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    """Where admission state lives: this process ("memory") or Redis, shared by every relay
    process and host."""

    backend: Literal["memory", "redis"] = "memory"
    # Environment variable holding the Redis URL (redis://, rediss://, unix://).
    redis_url_env: str = "RELAY_REDIS_URL"
    # A session's slot expires this long after its process last refreshed it (a crashed
    # process's slots come back after at most this long).
    slot_ttl_seconds: float = 30.0
    # Each Redis call's deadline; beyond it the team's `on_redis_error` applies.
    redis_timeout_seconds: float = 0.5
    key_prefix: str = "relay"

    def __post_init__(self) -> None:
        problems = _not_positive(self, ("slot_ttl_seconds", "redis_timeout_seconds"))
        if not _ENV_NAME_RE.match(self.redis_url_env):
            problems.append("redis_url_env must be an environment variable name")
        _report(problems)


@dataclass(frozen=True, slots=True)
class TeamLimits:
    max_sessions: int | None = None
    max_new_sessions_per_second: float | None = None
    # With admission in Redis and Redis unreachable: "open" admits the team's sessions
    # (unlimited meanwhile), "closed" refuses them with 503.
    on_redis_error: Literal["open", "closed"] = "open"
    # Client secrets the team may mint through the relay per minute (WebRTC), bursts of as many.
    max_client_secrets_per_minute: float | None = None
    # Estimated spend (the deployments' `prices`) allowed per UTC day and UTC month. Over it,
    # new sessions, client secrets and calls get 429 budget_exceeded until the window resets.
    max_usd_per_day: float | None = None
    max_usd_per_month: float | None = None
    # What live sessions do when the team goes over budget: "end" them once their response in
    # progress is done (error event budget_exceeded, close 1008), or let them "finish".
    live_sessions_over_budget: Literal["end", "finish"] = "end"
    # Bytes of the team's client messages still arriving that a process holds, within
    # server.message_buffer_bytes: so that one team's clients cannot fill the buffer the
    # others' large messages need. Unset: the process's bound alone.
    message_buffer_bytes: int | None = None

    def __post_init__(self) -> None:
        names = (
            "max_sessions", "max_new_sessions_per_second", "max_client_secrets_per_minute",
            "max_usd_per_day", "max_usd_per_month", "message_buffer_bytes",
        )  # fmt: skip
        _report(_not_positive(self, names))

    @property
    def has_budget(self) -> bool:
        return self.max_usd_per_day is not None or self.max_usd_per_month is not None


@dataclass(frozen=True, slots=True)
class WebRtcConfig:
    # Longest lifetime of a client secret minted through the relay; longer requests are cut
    # to it (the service allows 10 to 7200 seconds, 600 by default).
    max_secret_seconds: int = 600

    def __post_init__(self) -> None:
        if not 10 <= self.max_secret_seconds <= 7200:
            raise ValueError("max_secret_seconds must be between 10 and 7200")


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = True
    # A listener of its own, so metrics are never exposed with the public port by accident.
    host: str = "127.0.0.1"
    port: int = 9464
    # Also serve /metrics on the main port; then it requires the bearer token held in the
    # environment variable `token_env` names.
    on_main_port: bool = False
    token_env: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append("port must be between 0 and 65535")
        if self.on_main_port and not self.token_env:
            problems.append(
                "on_main_port needs token_env: /metrics on the public port is "
                "never served without a credential"
            )
        _report(problems)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    # Hashes (`relay hash-key`) of the keys that may read GET /status. None: no status page.
    keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if any(not KEY_HASH_RE.match(k) for k in self.keys):
            raise ValueError("keys must hold hashes made by `relay hash-key`, never the keys")


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    # Audio pacing of the built-in simulator: 1.0 is real time, 0 as fast as possible.
    speed: float = 1.0
    # A key for local use only, printed by `relay serve` so a new user can connect at once.
    # It must match one of the teams' key hashes. Never set it in production.
    demo_key: str | None = None
    # A simulated session's lifetime: then `session_expired` and close 1001, as Azure's.
    max_session_seconds: float = 3600.0
    # A phrase that, said or written by the user, makes the simulated model call a tool.
    tool_trigger: str | None = None

    def __post_init__(self) -> None:
        if self.speed < 0:
            raise ValueError("speed must be 0 or more")
        _report(_not_positive(self, ("max_session_seconds",)))


@dataclass(frozen=True, slots=True)
class PlaygroundConfig:
    # GET /playground: a page to talk to the relay from a browser (docs/talk.md). For
    # local use: it is a convenience page, not something to expose to the internet.
    enabled: bool = False


COGNITIVE_SERVICES_SCOPE = "https://cognitiveservices.azure.com/.default"
# Where an api-key credential's key is read from when neither `env` nor `file` is given.
DEFAULT_KEY_ENV = "AZURE_OPENAI_API_KEY"


@dataclass(frozen=True, slots=True)
class CredentialConfig:
    """How the relay authenticates to one Azure resource. Equal configs share one instance
    (one token cache) however many backends use them."""

    type: Literal["api-key", "entra"] = "api-key"
    # api-key: the environment variable that holds the Azure key (unset: `DEFAULT_KEY_ENV`)...
    env: str | None = None
    # ...or a file that does (a mounted Secret), read again when it changes; instead of env.
    file: Path | None = None
    # entra: which azure-identity credential gets the tokens.
    method: Literal["default", "managed-identity", "workload-identity", "client-secret"] = "default"
    client_id: str | None = None  # user-assigned identity, app registration
    tenant_id: str | None = None  # client-secret, workload-identity
    client_secret_env: str | None = None  # client-secret: env var holding the secret...
    # ...or a file that does (a mounted Secret), read again when it changes.
    client_secret_file: Path | None = None
    scope: str = COGNITIVE_SERVICES_SCOPE
    # Refresh a token this long before it expires, in the background.
    refresh_before_seconds: float = 300.0

    def __post_init__(self) -> None:
        problems = _not_positive(self, ("refresh_before_seconds",))
        for name in ("env", "client_secret_env"):
            value = getattr(self, name)
            if value is not None and not _ENV_NAME_RE.match(value):
                problems.append(f"{name} must be an environment variable name, got {value!r}")
        if self.type == "entra" and self.file is not None:
            problems.append("file holds an api-key: type entra takes none")
        if self.env is not None and self.file is not None:
            # Both given, the file won and the variable was shown as if in use.
            problems.append("env and file are two places for one key: give one")
        if self.type == "entra" and self.method == "client-secret":
            if not (self.client_id and self.tenant_id):
                problems.append("method client-secret needs client_id and tenant_id")
            if (self.client_secret_env is None) == (self.client_secret_file is None):
                problems.append(
                    "method client-secret needs client_secret_env or client_secret_file (one)"
                )
        elif self.client_secret_file is not None:
            problems.append("client_secret_file is for type entra, method client-secret only")
        _report(problems)


# Top-level fields of a GA `session` object (RealtimeSessionCreateRequest).
GA_SESSION_FIELDS = frozenset(
    {
        "type", "audio", "include", "instructions", "max_output_tokens", "model",
        "output_modalities", "parallel_tool_calls", "prompt", "reasoning", "tool_choice",
        "tools", "tracing", "truncation",
    }
)  # fmt: skip


def _session_field_problems(fragment: Mapping[str, Any], what: str) -> list[str]:
    unknown = sorted(set(fragment) - GA_SESSION_FIELDS)
    if not unknown:
        return []
    return [
        f"{what} names {', '.join(unknown)}, not GA session fields "
        "(write defaults and rules in GA names; preview deployments get them translated)"
    ]


def _session_path_problems(paths: Iterable[str], what: str) -> list[str]:
    return _session_field_problems({path.split(".")[0]: None for path in paths}, what)


# Top-level fields of a GA transcription session (RealtimeTranscriptionSessionCreateRequest).
TRANSCRIPTION_SESSION_FIELDS = frozenset({"type", "audio", "include"})


def _transcription_field_problems(fragment: Mapping[str, Any], what: str) -> list[str]:
    unknown = sorted(set(fragment) - TRANSCRIPTION_SESSION_FIELDS)
    output = fragment.get("audio", {})
    if isinstance(output, Mapping) and "output" in output:
        unknown.append("audio.output")
    if not unknown:
        return []
    return [
        f"{what} names {', '.join(unknown)}, not fields of a transcription session "
        "(audio.input.*, include)"
    ]


def _transcription_path_problems(paths: Iterable[str], what: str) -> list[str]:
    bad = sorted(p for p in paths if not (p.startswith("audio.input") or p == "include"))
    if not bad:
        return []
    return [
        f"{what} names {', '.join(bad)}: a transcription session has audio.input.* and include only"
    ]


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Session rules. Unset fields inherit: team over deployment over built-in defaults."""

    # GA dotted paths the client may not change, e.g. "instructions", "audio.output.voice".
    locked: tuple[str, ...] | None = None
    # GA dotted path -> the values a client may set, e.g. {"audio.output.voice" = [...]}.
    allowed_values: Mapping[str, tuple[str, ...]] | None = None
    # GA dotted path -> the largest number a client may set, e.g. {max_output_tokens = 1024}.
    max_values: Mapping[str, float] | None = None
    # What an event that breaks one of the three rules above gets: "rewrite" corrects it and
    # forwards it (the default), "refuse" answers it with an `error` event.
    on_violation: Literal["rewrite", "refuse"] | None = None
    # Always kept in front of whatever instructions the client sets.
    instructions_prefix: str | None = None
    # The roles a client's conversation items may have (`conversation.item.create`, and a
    # `response.create`'s own `input`); others are refused. A "system" item speaks with the
    # instructions' voice: leaving it out keeps locked instructions the only ones.
    allowed_item_roles: tuple[str, ...] | None = None
    # Client event types let through; the default is every documented client event.
    allowed_events: tuple[str, ...] | None = None
    max_frame_bytes: int | None = None
    # Decoded audio bytes per `input_audio_buffer.append` (the API's limit is 15 MiB).
    max_append_audio_bytes: int | None = None
    max_session_seconds: float | None = None
    # Seconds without a client event before the session is closed.
    idle_timeout_seconds: float | None = None
    # Refused client events tolerated before the session is closed (rewrites don't count).
    max_violations: int | None = None
    # Client events per second a session may send on average, and how many at once above
    # that (a token bucket); events over it are refused. Fairness: one flooding client must
    # not slow the others.
    max_events_per_second: float | None = None
    event_burst: int | None = None
    # Over the rate: "throttle" stops reading the client until the bucket refills (nothing
    # is lost, the excess costs nothing); "refuse" drops each event with an `error` event,
    # counted toward max_violations.
    on_rate_exceeded: Literal["throttle", "refuse"] | None = None

    def __post_init__(self) -> None:
        problems = [
            *_session_path_problems(self.locked or (), "locked"),
            *_session_path_problems(self.allowed_values or {}, "allowed_values"),
            *_session_path_problems(self.max_values or {}, "max_values"),
            *_not_positive(
                self,
                (
                    "max_frame_bytes", "max_append_audio_bytes", "max_session_seconds",
                    "idle_timeout_seconds", "max_events_per_second", "event_burst",
                ),
            ),
        ]  # fmt: skip
        if self.max_violations is not None and self.max_violations < 0:
            problems.append("max_violations must be 0 or more")
        unknown_roles = sorted(set(self.allowed_item_roles or ()) - ITEM_ROLES)
        if unknown_roles:
            problems.append(
                f"allowed_item_roles: unknown roles {unknown_roles} "
                f"(items have {', '.join(sorted(ITEM_ROLES))})"
            )
        _report(problems)


# The roles of a conversation message item (GA and preview).
ITEM_ROLES = frozenset({"user", "assistant", "system"})


@dataclass(frozen=True, slots=True)
class ContinuityConfig:
    """Conversations that outlive the upstream session (docs/continuity.md). Unset fields
    inherit: team over deployment over built-in defaults (off)."""

    enabled: bool | None = None
    # Renew the upstream session from this long before its `expires_at`, at a quiet point.
    renew_before_seconds: float | None = None
    # How user audio turns are replayed: as their transcripts ("text"), or as the user's own
    # audio, which the relay then keeps ("audio").
    replay: Literal["text", "audio"] | None = None
    # Estimated tokens of history replayed at most; the oldest items are dropped first.
    max_replay_tokens: int | None = None
    # A lost upstream: "resume" on a new upstream session, or "close" the client (1011).
    on_upstream_loss: Literal["resume", "close"] | None = None
    # With replay = "audio": seconds of user audio kept per session at most (memory); the
    # oldest item's audio is dropped first, and that item is replayed as its transcript.
    max_replay_audio_seconds: float | None = None

    def __post_init__(self) -> None:
        _report(
            _not_positive(
                self, ("renew_before_seconds", "max_replay_tokens", "max_replay_audio_seconds")
            )
        )


# Paths Azure's docs and portal write after the resource (`…azure.com/openai/v1/`); the relay
# adds the API's own path, so a pasted one would be doubled.
_API_PATH_RE = re.compile(r"/openai(/v1)?(/realtime)?/*$")


def _endpoint_problems(endpoint: str) -> list[str]:
    if endpoint == SIMULATOR_ENDPOINT:
        return []
    if not re.match(r"^(https?|wss?)://[^/?#]+", endpoint) or re.search(r"[?#]", endpoint):
        return [
            f"endpoint must be an http(s):// or ws(s):// URL without a query, or "
            f"{SIMULATOR_ENDPOINT!r}, got {endpoint!r}"
        ]
    return []


def normalise_endpoint(endpoint: str) -> str:
    """The base URL the relay adds the API's path to (``endpoint`` has no problems).

    ``https://r.openai.azure.com/openai/v1/`` -> ``https://r.openai.azure.com``; a path of
    another kind (a gateway's prefix) is kept, without its trailing slash.
    """
    if endpoint == SIMULATOR_ENDPOINT:
        return endpoint
    return _API_PATH_RE.sub("", endpoint).rstrip("/")


# What a simulator backend's credential is when none is written: never used, since the relay
# gives its in-process simulator a key of its own.
NO_CREDENTIAL = CredentialConfig()


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One Azure resource serving a deployment (a pool may list several)."""

    name: str
    # `https://<resource>.openai.azure.com` (or any base URL; Azure's `…/openai/v1/` form is
    # taken too), or "simulator" for the built-in simulated upstream in the same process.
    endpoint: str
    credential: CredentialConfig = NO_CREDENTIAL
    # Deployment name on this Azure resource; defaults to the deployment's.
    azure_deployment: str = ""
    # Lower is preferred: sessions go to the lowest priority with a healthy backend...
    priority: int = 1
    # ...spread by weight among the backends of that priority.
    weight: float = 1.0

    def __post_init__(self) -> None:
        problems = [*_endpoint_problems(self.endpoint), *_not_positive(self, ("weight",))]
        if not _NAME_RE.match(self.name):
            problems.append(f"backend name {self.name!r} must match {_NAME_RE.pattern}")
        if self.credential is NO_CREDENTIAL and self.endpoint != SIMULATOR_ENDPOINT:
            problems.append("credential is required (only a simulator endpoint needs none)")
        _report(problems)
        object.__setattr__(self, "endpoint", normalise_endpoint(self.endpoint))


@dataclass(frozen=True, slots=True)
class PriceTable:
    """What a deployment costs, in USD: tokens per million by kind, duration-billed
    transcription per minute. For estimates only (Azure bills from its own meters). The
    per-modality input counts include the cached ones, which are priced at the cached rate."""

    input_text: float = 0.0
    input_cached_text: float = 0.0
    input_audio: float = 0.0
    input_cached_audio: float = 0.0
    input_image: float = 0.0
    input_cached_image: float = 0.0
    output_text: float = 0.0
    output_audio: float = 0.0
    # The input audio transcription model's prices (sessions with `audio.input.transcription`).
    transcription_input_text: float = 0.0
    transcription_input_audio: float = 0.0
    transcription_output_text: float = 0.0
    transcription_per_minute: float = 0.0

    def __post_init__(self) -> None:
        _report([f"{f.name} must be 0 or more" for f in fields(self) if getattr(self, f.name) < 0])


@dataclass(frozen=True, slots=True)
class DeploymentWebRtcConfig:
    # The relay watches every call it places on this deployment over its own sideband
    # socket: the team's defaults in force, its rules re-applied, the call metered, counted
    # against max_sessions and hung up at max_session_seconds.
    observe: bool = False


@dataclass(frozen=True, slots=True)
class DeploymentConfig:
    """A deployment clients ask for by name, and the Azure backends behind it.

    One backend can be given inline (`endpoint`, `credential`), or several as
    `[[deployments.NAME.backends]]` tables.
    """

    name: str
    endpoint: str = ""
    credential: CredentialConfig | None = None
    # Deployment name on the Azure resource(s); defaults to the relay-side name.
    azure_deployment: str = ""
    protocol: Literal["ga", "preview"] = "ga"
    # "transcription": transcription-only sessions (clients connect with
    # intent=transcription); the Azure deployment is the session's transcription model.
    kind: Literal["realtime", "transcription"] = "realtime"
    # Only for protocol = "preview"; the GA endpoint takes no api-version.
    api_version: str = DEFAULT_PREVIEW_API_VERSION
    # Session defaults (a GA `session` fragment) and rules for every team on this deployment.
    session: dict[str, Any] = field(default_factory=dict)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    backends: tuple[BackendConfig, ...] = ()
    # USD per million tokens by kind: cost estimates (relay_cost_usd_total) and team budgets.
    prices: PriceTable | None = None
    webrtc: DeploymentWebRtcConfig = field(default_factory=DeploymentWebRtcConfig)
    continuity: ContinuityConfig = field(default_factory=ContinuityConfig)

    def __post_init__(self) -> None:
        problems = _session_field_problems(self.session, "session")
        if self.kind == "transcription":
            problems += _transcription_field_problems(self.session, "session")
            problems += _transcription_path_problems(
                [*(self.policy.locked or ()), *(self.policy.allowed_values or {})],
                "policy",
            )
        if not _NAME_RE.match(self.name):
            problems.append(f"deployment name {self.name!r} must match {_NAME_RE.pattern}")
        if not self.azure_deployment:
            object.__setattr__(self, "azure_deployment", self.name)
        if self.endpoint and not _endpoint_problems(self.endpoint):
            object.__setattr__(self, "endpoint", normalise_endpoint(self.endpoint))
        backends = self.backends
        if self.backends:
            if self.endpoint or self.credential:
                problems.append("give either endpoint and credential, or backends, not both")
            names = [b.name for b in self.backends]
            if len(set(names)) != len(names):
                problems.append("backend names must be unique")
            backends = tuple(
                b if b.azure_deployment else _with_deployment(b, self.azure_deployment)
                for b in self.backends
            )
        elif not self.endpoint:
            problems.append("needs endpoint and credential (or a backends list)")
        elif self.credential is None and self.endpoint != SIMULATOR_ENDPOINT:
            problems.append("needs a credential for its endpoint")
        else:
            credential = self.credential or NO_CREDENTIAL
            backends = (BackendConfig("default", self.endpoint, credential, self.azure_deployment),)
        _report(problems)
        object.__setattr__(self, "backends", backends)

    @property
    def uses_simulator(self) -> bool:
        return any(b.endpoint == SIMULATOR_ENDPOINT for b in self.backends)


def _with_deployment(backend: BackendConfig, azure_deployment: str) -> BackendConfig:
    return BackendConfig(
        backend.name,
        backend.endpoint,
        backend.credential,
        azure_deployment,
        backend.priority,
        backend.weight,
    )


@dataclass(frozen=True, slots=True)
class TeamConfig:
    name: str
    # Hashes of the team's relay keys, as printed by `relay hash-key`.
    keys: tuple[str, ...]
    deployments: tuple[str, ...]
    # Session defaults and rules of this team, over the deployment's.
    session: dict[str, Any] = field(default_factory=dict)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    limits: TeamLimits = field(default_factory=TeamLimits)
    continuity: ContinuityConfig = field(default_factory=ContinuityConfig)

    def __post_init__(self) -> None:
        problems = _session_field_problems(self.session, "session")
        if not self.keys:
            problems.append("keys must list at least one key hash")
        if any(not KEY_HASH_RE.match(key) for key in self.keys):
            problems.append(
                "keys must hold hashes made by `relay hash-key` or `relay keys new` "
                "(sha256:<64 hex>), never the keys themselves"
            )
        _report(problems)


@dataclass(frozen=True, slots=True)
class RelayConfig:
    deployments: Mapping[str, DeploymentConfig]
    teams: Mapping[str, TeamConfig]
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    webrtc: WebRtcConfig = field(default_factory=WebRtcConfig)
    playground: PlaygroundConfig = field(default_factory=PlaygroundConfig)

    @property
    def uses_simulator(self) -> bool:
        return any(d.uses_simulator for d in self.deployments.values())


# --- loading -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigReading:
    """What one pass over a config found: the config if it is valid, every problem, and
    the deployments and teams that are valid on their own (for checks across them)."""

    config: RelayConfig | None
    problems: list[str]
    deployments: Mapping[str, DeploymentConfig]
    teams: Mapping[str, TeamConfig]


def load_config(path: str | Path, environ: Mapping[str, str]) -> RelayConfig:
    """Read, override from ``environ`` and validate; raise ConfigError listing every problem."""
    return _valid(read_config(path, environ))


def read_config(path: str | Path, environ: Mapping[str, str]) -> ConfigReading:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        where = path if path.is_absolute() else f"{path} (from {Path.cwd()})"
        return ConfigReading(None, [f"{where}: cannot read: {exc.strerror}"], {}, {})
    except tomllib.TOMLDecodeError as exc:
        return ConfigReading(None, [f"{path}: not valid TOML: {exc}"], {}, {})
    overridden = apply_env_overrides(data, environ)
    return parse_data(data, source=str(path), overridden=overridden)


def parse_config(
    data: dict[str, Any], *, source: str, overridden: Mapping[str, str] | None = None
) -> RelayConfig:
    return _valid(parse_data(data, source=source, overridden=overridden))


def parse_data(
    data: dict[str, Any], *, source: str, overridden: Mapping[str, str] | None = None
) -> ConfigReading:
    builder = _Builder(source, overridden or {})
    config = builder.build(RelayConfig, data, "")
    builder.check_references(data)
    return ConfigReading(
        config if not builder.problems else None,
        builder.problems,
        builder.valid.get("deployments", {}),
        builder.valid.get("teams", {}),
    )


def _valid(reading: ConfigReading) -> RelayConfig:
    if reading.config is None:
        raise ConfigError(reading.problems)
    return reading.config


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Apply ``RELAY_A__B=value`` to ``data`` in place; return {dotted key: env var name}."""
    applied: dict[str, str] = {}
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or "__" not in var:
            continue
        segments = var[len(ENV_PREFIX) :].split("__")
        if not all(segments):
            continue
        table = data
        keys: list[str] = []
        for segment in segments[:-1]:
            key = _match_key(table, segment)
            child = table.setdefault(key, {})
            if not isinstance(child, dict):
                break
            table = child
            keys.append(key)
        else:
            key = _match_key(table, segments[-1])
            table[key] = _env_value(environ[var])
            applied[".".join([*keys, key])] = var
    return applied


def _match_key(table: Mapping[str, Any], segment: str) -> str:
    wanted = segment.lower()
    for key in table:
        if key.lower().replace("-", "_") == wanted:
            return key
    return wanted


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


class _Builder:
    """Builds frozen dataclasses from TOML tables by their type hints, collecting problems."""

    def __init__(self, source: str, overridden: Mapping[str, str]) -> None:
        self.source = source
        self.overridden = overridden
        self.problems: list[str] = []
        # key of a table of tables -> the entries that built, even when others did not.
        self.valid: dict[str, dict[str, Any]] = {}

    def problem(self, key: str, message: str) -> None:
        variable = self.overridden.get(key)
        if variable is None and message == "unknown key":
            # An unknown table or key the environment made: name the variable, not the file.
            made = [v for k, v in self.overridden.items() if k.startswith(f"{key}.")]
            if made:
                for variable in made:
                    self.problems.append(
                        f"environment: {variable}: unknown variable (there is no setting {key!r})"
                    )
                return
        where = f"environment: {variable}" if variable else self.source
        self.problems.append(f"{where}: {key or '(top level)'}: {message}")

    def build(self, cls: type[Any], data: Any, key: str, name: str | None = None) -> Any:
        if not isinstance(data, dict):
            self.problem(key, f"must be a table, got {_describe(data)}")
            return None
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        for unknown in sorted(set(data) - known - {"name"}):
            self.problem(_join(key, unknown), "unknown key")
        kwargs: dict[str, Any] = {}
        failed: list[str] = []
        for f in fields(cls):
            sub = _join(key, f.name)
            if f.name == "name" and name is not None:
                kwargs["name"] = name
            elif f.name in data:
                value = self.convert(hints[f.name], data[f.name], sub)
                if value is _INVALID:
                    failed.append(f.name)
                else:
                    kwargs[f.name] = value
            elif f.default is MISSING and f.default_factory is MISSING:
                self.problem(sub, "is required")
                failed.append(f.name)
        try:
            built = cls(**kwargs)
        except Invalid as exc:
            problems = exc.problems
        except (ValueError, TypeError) as exc:
            problems = [str(exc)]
        else:
            return None if failed else built
        # With some field invalid, the table was checked with that field's default: only
        # what does not concern those fields is news (the rest is reported at the field).
        for message in problems:
            if not any(name in message for name in failed):
                self.problem(key, message)
        return None

    def convert(self, hint: Any, value: Any, key: str) -> Any:
        if hint is Any:
            return value
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (types.UnionType, typing.Union):
            inner = [a for a in args if a is not type(None)]
            return self.convert(inner[0], value, key)
        if origin is Literal:
            if value in args:
                return value
            if isinstance(value, str) and value.lower() in args:
                return value.lower()  # `DEBUG` is `debug`
            return self._bad(key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        if origin is tuple:
            item = args[0]
            if is_dataclass(item):
                if not isinstance(value, list):
                    return self._bad(key, f"must be a list of tables, got {_describe(value)}")
                cls = typing.cast(type[Any], item)
                items = [self.build(cls, v, f"{key}[{i}]") for i, v in enumerate(value)]
                return tuple(items) if None not in items else _INVALID
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                return self._bad(key, f"must be a list of strings, got {_describe(value)}")
            return tuple(value)
        if origin in (Mapping, dict):
            if not isinstance(value, dict):
                return self._bad(key, f"must be a table, got {_describe(value)}")
            item = args[1]
            if not is_dataclass(item):
                converted = {n: self.convert(item, v, _join(key, n)) for n, v in value.items()}
                return converted if _INVALID not in converted.values() else _INVALID
            cls = typing.cast(type[Any], item)
            built = {n: self.build(cls, v, _join(key, n), name=n) for n, v in value.items()}
            self.valid[key] = {n: v for n, v in built.items() if v is not None}
            return built if None not in built.values() else _INVALID
        if is_dataclass(hint):
            built = self.build(typing.cast(type[Any], hint), value, key)
            return _INVALID if built is None else built
        if hint is bool:
            return value if isinstance(value, bool) else self._bad(key, "must be true or false")
        if hint is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            return self._bad(key, f"must be an integer, got {_describe(value)}")
        if hint is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            return self._bad(key, f"must be a number, got {_describe(value)}")
        if hint is str:
            return value if isinstance(value, str) else self._bad(key, "must be a string")
        if hint is Path:
            return Path(value) if isinstance(value, str) else self._bad(key, "must be a path")
        raise TypeError(f"unsupported config type {hint!r}")  # a bug in this module, not config

    def _bad(self, key: str, message: str) -> object:
        self.problem(key, message)
        return _INVALID

    def check_references(self, data: Mapping[str, Any]) -> None:
        """Across tables, on the data as written: found even when some table is invalid."""
        deployments, teams = data.get("deployments", {}), data.get("teams", {})
        if not isinstance(deployments, dict) or not isinstance(teams, dict):
            return  # reported as not a table
        if not deployments:
            self.problem("deployments", "define at least one deployment")
        if not teams:
            self.problem("teams", "define at least one team")
        for name, team in teams.items():
            wanted = team.get("deployments") if isinstance(team, dict) else None
            for deployment in wanted if isinstance(wanted, list) else ():
                if isinstance(deployment, str) and deployment not in deployments:
                    self.problem(
                        f"teams.{name}.deployments", f"names unknown deployment {deployment!r}"
                    )
        self.check_budgets()
        self.check_message_buffers(data)

    def check_message_buffers(self, data: Mapping[str, Any]) -> None:
        """A team's message buffer holds at least one whole message (else one could never
        be taken: 1013 on every retry)."""
        server = data.get("server", {})
        largest = server.get("max_message_bytes") if isinstance(server, dict) else None
        if not isinstance(largest, int):
            largest = ServerConfig().max_message_bytes
        for team in self.valid.get("teams", {}).values():
            bound = team.limits.message_buffer_bytes
            if bound is not None and bound < largest:
                self.problem(
                    f"teams.{team.name}.limits",
                    f"message_buffer_bytes must be at least max_message_bytes ({largest})",
                )

    def check_budgets(self) -> None:
        """A team with a budget needs prices on each of its deployments (those valid)."""
        built = self.valid.get("deployments", {})
        for team in self.valid.get("teams", {}).values():
            for deployment in team.deployments:
                if team.limits.has_budget and deployment in built:
                    if built[deployment].prices is None:
                        self.problem(
                            f"teams.{team.name}.limits",
                            f"a budget needs prices: deployment {deployment!r} has no "
                            f"[deployments.{deployment}.prices]",
                        )


_INVALID = object()


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, dict) else "a table"


def masked_config(config: RelayConfig) -> dict[str, Any]:
    """The effective config as plain data, with secret values masked, for `check-config`."""
    data = _plain(config)
    if config.simulator.demo_key:
        data["simulator"]["demo_key"] = "***"
    return typing.cast(dict[str, Any], data)


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
