"""Prometheus metrics, and the per-session meter that feeds them cheaply.

Label sets are bounded: team, deployment, direction, event type (from the known set, else
`other`), codes and outcomes from fixed lists. Never a session id, a key or a client-chosen
string. Each app gets its own registry, so tests and several apps in one process don't mix.

Cost per frame is kept low: counters are summed in plain attributes of a `SessionMeter` and
flushed to Prometheus once a second and at session end; label children are bound once per
session; only the histograms that need each value (added delay, audio chunk size, latency)
observe per event. Audio is measured from base64 lengths, never decoded.
"""

from __future__ import annotations

import asyncio
import os
import time
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    disable_created_metrics,
)

from relay.ops.build import build_commit, build_version, frame_scans
from relay.ops.config import PriceTable, RelayConfig
from relay.ops.loop_lag import LAG_BUCKETS as LOOP_LAG_BUCKETS
from relay.ops.process_collector import ProcessStats
from relay.ops.usage import (
    cost_usd,
    implausible,
    response_tokens,
    transcription_usage,
    unsplit_tokens,
)
from relay.session.codec import delta_size
from relay.session.event_types import AUDIO_DELTA_TYPES, KNOWN_EVENT_TYPES
from relay.session.lane import Lane
from relay.session.schema import audio_bytes_per_second

_log = structlog.get_logger("relay.metrics")


def configured_series(config: RelayConfig) -> dict[str, tuple[tuple[str, ...], frozenset[Any]]]:
    """The gauges that follow the config, by metric family: their label names and the label
    values the config has. A series outside them belongs to a backend or team a reload
    removed (under --workers its value stays in a worker's metric file: the supervisor's
    scrape leaves it out)."""
    budgets = frozenset(
        (team.name, window)
        for team in config.teams.values()
        for window, limit in (
            ("day", team.limits.max_usd_per_day),
            ("month", team.limits.max_usd_per_month),
        )
        if limit is not None
    )
    backends = frozenset(
        (deployment.name, backend.name)
        for deployment in config.deployments.values()
        for backend in deployment.backends
    )
    return {
        "relay_backend_up": (("deployment", "backend"), backends),
        "relay_backend_rate_limited": (("deployment", "backend"), backends),
        "relay_budget_usd": (("team", "window"), budgets),
        "relay_budget_spent_usd": (("team", "window"), budgets),
        "relay_message_buffer_team_bytes": (("team",), frozenset((t,) for t in config.teams)),
    }


# Voice latencies: from a few ms (relay overhead) to seconds (a model's first audio).
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
    10.0,
)  # fmt: skip
# Added delay per frame: microseconds to tens of milliseconds.
DELAY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
)  # fmt: skip
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600)
RESPONSE_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120)
# 20 ms of 24 kHz PCM16 is 960 bytes; 250 ms is 12,000.
CHUNK_BUCKETS = (160, 480, 960, 1920, 4800, 9600, 12000, 24000, 48000, 96000, 480000)
FLUSH_INTERVAL_SECONDS = 1.0
# `*_created` series double the scrape for no use on a long-running service.
disable_created_metrics()  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class Metrics:
    registry: CollectorRegistry
    ready: Gauge
    sessions_active: Gauge
    sessions: Counter
    session_refusals: Counter
    session_duration: Histogram
    upstream_handshake: Histogram
    session_setup: Histogram
    time_to_first_audio: Histogram
    response_duration: Histogram
    relay_delay: Histogram
    audio_chunk: Histogram
    audio_seconds: Counter
    events: Counter
    frame_bytes: Counter
    tokens: Counter
    responses: Counter
    upstream_errors: Counter
    client_violations: Counter
    client_rewrites: Counter
    upstream_connect_failures: Counter
    backend_up: Gauge
    backend_rate_limited: Gauge
    backend_ejections: Counter
    credential_refresh_failures: Counter
    admission_errors: Counter
    backpressure: Counter
    client_secrets: Counter
    webrtc_calls: Counter
    webrtc_upstream: Histogram
    webrtc_refusals: Counter
    build_info: Gauge
    transcription_seconds: Counter
    cost: Counter
    budget: Gauge
    budget_spent: Gauge
    budget_sync_failures: Counter
    config_reloads: Counter
    log_lines_dropped: Counter
    session_renewals: Counter
    switch_pause: Histogram
    replayed_items: Counter
    replayed_tokens: Counter
    loop_lag: Histogram
    tls_certificate_expiry: Gauge
    message_buffer: Gauge
    message_buffer_limit: Gauge
    message_buffer_team: Gauge
    _series: dict[tuple[str, str, str], SessionSeries] = field(default_factory=dict)

    def series(self, team: str, deployment: str, backend: str) -> SessionSeries:
        """The label children a session of ``team`` on ``deployment`` through ``backend``
        feeds, looked up once per such triple rather than once per session."""
        key = (team, deployment, backend)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = SessionSeries.of(self, *key)
        return found

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> Metrics:
        r = registry or CollectorRegistry()
        if not MULTIPROCESS:
            # process_* and python_* of this process. Under --workers the supervisor adds
            # each worker's process_* to its scrape (relay.ops.workers).
            ProcessStats(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        td = ("team", "deployment")
        metrics = cls(
            registry=r,
            ready=Gauge(
                "relay_ready",
                "1 while the relay takes new sessions.",
                registry=r,
                multiprocess_mode="liveall",
            ),
            sessions_active=Gauge(
                "relay_sessions_active",
                "Sessions open now.",
                td,
                registry=r,
                multiprocess_mode="livesum",
            ),
            sessions=Counter(
                "relay_sessions",
                "Sessions ended, by how they ended.",
                (*td, "outcome"),
                registry=r,
            ),
            session_refusals=Counter(
                "relay_session_refusals",
                "Connections refused before the upgrade (team: known teams, else unknown).",
                ("team", "status", "code"),
                registry=r,
            ),
            session_duration=Histogram(
                "relay_session_duration_seconds",
                "Session length.",
                td,
                buckets=DURATION_BUCKETS,
                registry=r,
            ),
            upstream_handshake=Histogram(
                "relay_upstream_handshake_seconds",
                "Upstream WebSocket handshake time, failover included, by the backend reached.",
                ("deployment", "backend"),
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            session_setup=Histogram(
                "relay_session_setup_seconds",
                "From the client's upgrade request to the effective session.",
                td,
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            time_to_first_audio=Histogram(
                "relay_time_to_first_audio_seconds",
                "From the end of the user's turn to the first audio delta.",
                (*td, "backend"),
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            response_duration=Histogram(
                "relay_response_duration_seconds",
                "From response.created to response.done.",
                td,
                buckets=RESPONSE_BUCKETS,
                registry=r,
            ),
            relay_delay=Histogram(
                "relay_forward_delay_seconds",
                "Time from a frame's arrival to its write on the other side.",
                ("direction",),
                buckets=DELAY_BUCKETS,
                registry=r,
            ),
            audio_chunk=Histogram(
                "relay_audio_chunk_bytes",
                "Decoded audio bytes per audio event.",
                ("direction",),
                buckets=CHUNK_BUCKETS,
                registry=r,
            ),
            audio_seconds=Counter(
                "relay_audio_seconds",
                "Seconds of audio relayed.",
                ("direction", *td),
                registry=r,
            ),
            events=Counter(
                "relay_events", "Events relayed, by type.", ("direction", "type"), registry=r
            ),
            frame_bytes=Counter(
                "relay_frame_bytes",
                "WebSocket payload bytes relayed.",
                ("direction",),
                registry=r,
            ),
            tokens=Counter(
                "relay_tokens",
                "Tokens from the upstream's usage blocks.",
                (*td, "kind"),
                registry=r,
            ),
            responses=Counter(
                "relay_responses", "Responses finished, by status.", (*td, "status"), registry=r
            ),
            upstream_errors=Counter(
                "relay_upstream_error_events",
                "Upstream `error` events, by code.",
                ("deployment", "code"),
                registry=r,
            ),
            client_violations=Counter(
                "relay_client_violations",
                "Client events refused by the policy.",
                (*td, "code"),
                registry=r,
            ),
            client_rewrites=Counter(
                "relay_client_events_rewritten",
                "Client events the policy corrected before forwarding, by the param it set.",
                (*td, "param"),
                registry=r,
            ),
            upstream_connect_failures=Counter(
                "relay_upstream_connect_failures",
                "Upstream handshakes that failed (each failover attempt counts).",
                ("deployment", "backend", "reason"),
                registry=r,
            ),
            backend_rate_limited=Gauge(
                "relay_backend_rate_limited",
                "1 while a backend's 429 Retry-After keeps new sessions away (quota spent).",
                ("deployment", "backend"),
                registry=r,
                multiprocess_mode="liveall",
            ),
            backend_up=Gauge(
                "relay_backend_up",
                "1 while a backend takes new sessions (not ejected or rate limited, credential "
                "usable); 0 from its ejection until a handshake succeeds again.",
                ("deployment", "backend"),
                registry=r,
                multiprocess_mode="liveall",
            ),
            backend_ejections=Counter(
                "relay_backend_ejections",
                "Backends ejected after repeated failures.",
                ("deployment", "backend"),
                registry=r,
            ),
            credential_refresh_failures=Counter(
                "relay_credential_refresh_failures",
                "Entra token refreshes that failed.",
                ("credential",),
                registry=r,
            ),
            admission_errors=Counter(
                "relay_admission_redis_errors",
                "Admission checks that could not reach Redis (the team's on_redis_error applied).",
                ("team",),
                registry=r,
            ),
            backpressure=Counter(
                "relay_backpressure_seconds",
                "Time spent waiting for a slow peer to take data.",
                ("direction",),
                registry=r,
            ),
            client_secrets=Counter(
                "relay_client_secrets",
                "WebRTC client secrets minted through the relay.",
                td,
                registry=r,
            ),
            webrtc_calls=Counter(
                "relay_webrtc_calls",
                "WebRTC calls placed through the relay, by how the caller authenticated.",
                (*td, "auth"),
                registry=r,
            ),
            webrtc_upstream=Histogram(
                "relay_webrtc_upstream_seconds",
                "Upstream client_secrets and calls requests, until the answer.",
                ("deployment", "endpoint"),
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            webrtc_refusals=Counter(
                "relay_webrtc_refusals",
                "WebRTC requests refused or failed, by endpoint, status and code.",
                ("team", "endpoint", "status", "code"),
                registry=r,
            ),
            build_info=Gauge(
                "relay_build_info",
                "Always 1: the relay's version, the commit it was built from, and whether its "
                "per-frame scans run in C or, without the C build, in Python.",
                ("version", "commit", "frame_scans"),
                registry=r,
                multiprocess_mode="max",
            ),
            transcription_seconds=Counter(
                "relay_transcription_seconds",
                "Input audio transcribed by duration-billed models (whisper-1).",
                td,
                registry=r,
            ),
            cost=Counter(
                "relay_cost_usd",
                "Estimated cost from usage and the deployment's prices (an estimate: Azure "
                "bills from its own meters).",
                td,
                registry=r,
            ),
            budget=Gauge(
                "relay_budget_usd",
                "A team's budget per window (day, month, in UTC).",
                ("team", "window"),
                registry=r,
                multiprocess_mode="max",
            ),
            budget_spent=Gauge(
                "relay_budget_spent_usd",
                "A team's estimated spend in the current window, as this process sees it (with "
                "admission in Redis: every replica's).",
                ("team", "window"),
                registry=r,
                multiprocess_mode="max",
            ),
            budget_sync_failures=Counter(
                "relay_budget_sync_failures",
                "Spend pushes to Redis that failed (the spend is kept and pushed later).",
                registry=r,
            ),
            config_reloads=Counter(
                "relay_config_reloads",
                "Config reloads, by outcome: applied, unchanged or rejected (the old config "
                "stays in force).",
                ("outcome",),
                registry=r,
            ),
            log_lines_dropped=Counter(
                "relay_log_lines_dropped",
                "Log lines dropped because the log output (stdout) was not read: past 8 MiB "
                "waiting, the relay drops lines rather than stop.",
                registry=r,
            ),
            session_renewals=Counter(
                "relay_session_renewals",
                "Upstream sessions replaced under a live client session (continuity), by why "
                "(expiry, upstream_lost) and outcome.",
                ("deployment", "reason", "outcome"),
                registry=r,
            ),
            switch_pause=Histogram(
                "relay_session_switch_pause_seconds",
                "How long client events were held while the upstream was switched.",
                ("deployment",),
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            replayed_items=Counter(
                "relay_session_replayed_items",
                "Conversation items replayed onto new upstream sessions.",
                ("deployment",),
                registry=r,
            ),
            replayed_tokens=Counter(
                "relay_session_replayed_tokens",
                "Estimated input tokens of history replayed (billed again by the service).",
                ("deployment",),
                registry=r,
            ),
            loop_lag=Histogram(
                "relay_event_loop_lag_seconds",
                "How late the event loop ran a timer due every 100 ms: every frame waits that.",
                buckets=LOOP_LAG_BUCKETS,
                registry=r,
            ),
            tls_certificate_expiry=Gauge(
                "relay_tls_certificate_expiry_timestamp_seconds",
                "When the certificate the relay's TLS listener serves expires (its notAfter, "
                "Unix time), by its file; absent without [server.tls]. Under --workers, the "
                "soonest.",
                ("cert_file",),
                registry=r,
                multiprocess_mode="livemin",
            ),
            message_buffer=Gauge(
                "relay_message_buffer_bytes",
                "Bytes of client messages still arriving, announced by their frames' headers "
                "(a process's total: see relay_message_buffer_limit_bytes).",
                registry=r,
                multiprocess_mode="liveall",
            ),
            message_buffer_limit=Gauge(
                "relay_message_buffer_limit_bytes",
                "server.message_buffer_bytes: past it, a client's frame is refused (1013). "
                "0: no bound.",
                registry=r,
                multiprocess_mode="liveall",
            ),
            message_buffer_team=Gauge(
                "relay_message_buffer_team_bytes",
                "Bytes of client messages still arriving, by team (summed over processes): "
                "whose clients hold the message buffer.",
                ("team",),
                registry=r,
                multiprocess_mode="livesum",
            ),
        )
        metrics.build_info.labels(build_version(), build_commit(), frame_scans()).set(1)
        for outcome in ("applied", "unchanged", "rejected"):  # at 0: `increase()` sees the first
            metrics.config_reloads.labels(outcome)
        return metrics


@dataclass(frozen=True, slots=True)
class SessionSeries:
    """Label children of the series every session feeds. `labels()` builds, locks and hashes
    a key each call; a session start made eighteen such calls. The names are the config's,
    so the cache is as bounded as the series themselves."""

    session_setup: Any
    sessions_active: Any
    session_duration: Any
    time_to_first_audio: Any
    response_duration: Any
    # By direction ("in", "out").
    relay_delay: Mapping[str, Any]
    audio_chunk: Mapping[str, Any]
    backpressure: Mapping[str, Any]
    audio_seconds: Mapping[str, Any]
    frame_bytes: Mapping[str, Any]

    @classmethod
    def of(cls, metrics: Metrics, team: str, deployment: str, backend: str) -> SessionSeries:
        td = (team, deployment)
        both = ("in", "out")
        return cls(
            session_setup=metrics.session_setup.labels(*td),
            sessions_active=metrics.sessions_active.labels(*td),
            session_duration=metrics.session_duration.labels(*td),
            time_to_first_audio=metrics.time_to_first_audio.labels(*td, backend),
            response_duration=metrics.response_duration.labels(*td),
            relay_delay={d: metrics.relay_delay.labels(d) for d in both},
            audio_chunk={d: metrics.audio_chunk.labels(d) for d in both},
            backpressure={d: metrics.backpressure.labels(d) for d in both},
            audio_seconds={d: metrics.audio_seconds.labels(d, *td) for d in both},
            frame_bytes={d: metrics.frame_bytes.labels(d) for d in both},
        )


# Upstream error codes are the service's; keep the label set bounded all the same.
_KNOWN_ERROR_CODES = frozenset(
    {
        "invalid_value", "missing_required_parameter", "invalid_json", "unknown_event",
        "input_audio_buffer_commit_empty", "conversation_already_has_active_response",
        "response_cancel_not_active", "session_expired", "rate_limit_exceeded",
        "invalid_api_key", "server_error", "invalid_request_error", "decimal_above_max_value",
        "decimal_below_min_value", "integer_above_max_value", "integer_below_min_value",
        "string_above_max_length", "item_not_found", "invalid_type", "unknown_parameter",
        "invalid_value_error", "response_create_failed",
    }
)  # fmt: skip
# The client event that marks the end of the user's turn, and the upstream ones.
_TURN_END_UPSTREAM = frozenset(
    {"input_audio_buffer.committed", "input_audio_buffer.speech_stopped"}
)


# Session outcomes the alert rules watch (deploy/prometheus/alerts.yml): exported at 0 from the
# start, so that increase() and rate() see the first one (a series born at 1 shows no increase).
WATCHED_OUTCOMES = (
    "upstream_lost", "upstream_protocol_error", "upstream_message_too_big", "upstream_stalled",
    "relay_internal_error", "client_stalled", "budget_exceeded", "message_buffer_full",
)  # fmt: skip


# Several worker processes share one scrape through prometheus-client's multiprocess mode.
MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ


@dataclass(slots=True)
class LiveGauges:
    """Gauges whose value is computed (readiness, backend health). One process: read at
    scrape time. Several: written every second, since the scrape reads the workers' files."""

    computed: list[tuple[Any, Callable[[], float]]] = field(default_factory=list)

    def track(self, gauge: Any, compute: Callable[[], float]) -> None:
        if MULTIPROCESS:
            self.computed.append((gauge, compute))
        else:
            gauge.set_function(compute)

    def forget(self, gauge: Any) -> None:
        """Stop computing ``gauge`` (its labels are being removed)."""
        self.computed = [(g, c) for g, c in self.computed if g is not gauge]

    async def refresh_forever(self) -> None:
        while self.computed:
            for gauge, compute in self.computed:
                gauge.set(compute())
            await asyncio.sleep(FLUSH_INTERVAL_SECONDS)


class BatchedHistogram:
    """Observations of one histogram child, counted locally and added at flush.

    prometheus-client has no bulk observe, and a per-frame `observe` (lock, loop over
    buckets) was the relay's largest metering cost under load. This counts into the same
    buckets with one bisect and adds them to the child's bucket and sum values in one go.
    `tests/unit/test_metrics.py` checks the result equals plain observes.
    """

    __slots__ = ("_child", "_bounds", "_first", "_counts", "_sum")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._bounds: list[float] = child._upper_bounds  # shared by every session: not copied
        self._first = self._bounds[0]
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        # Most values fall in the first bucket (a callback's delay is tens of microseconds):
        # a comparison instead of the bisect's call.
        if value <= self._first:
            self._counts[0] += 1
        else:
            self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    @property
    def bounds(self) -> list[float]:
        return self._bounds

    def add(self, counts: list[int], total: float) -> None:
        """Observations counted elsewhere into the same buckets (a lane's), and their sum."""
        mine = self._counts
        for i, count in enumerate(counts):
            if count:
                mine[i] += count
        self._sum += total

    def flush(self) -> None:
        if not self._sum and not any(self._counts):
            return
        buckets = self._child._buckets
        for i, count in enumerate(self._counts):
            if count:
                buckets[i].inc(count)
                self._counts[i] = 0
        self._child._sum.inc(self._sum)
        self._sum = 0.0


class CountedHistogram:
    """Whole-number observations of one histogram child (audio chunk sizes), counted by value.

    A session's chunks are nearly all one size (20 or 100 ms of its format), so observing
    one is a dict increment, with no call; each distinct value finds its bucket once, at
    flush. `tests/unit/test_metrics.py` checks the result equals plain observes."""

    __slots__ = ("_child", "_bounds", "values")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._bounds: list[float] = child._upper_bounds
        # value -> observations since the last flush. A plain dict, not a Counter: the
        # interpreter's fast path for `d[k]` is for dicts alone (a Counter's costs 2.5x).
        self.values: dict[int, int] = {}

    def flush(self) -> int:
        """Add the observations to the child; their sum (a direction's audio bytes)."""
        if not self.values:
            return 0
        buckets = self._child._buckets
        total = 0
        for value, count in self.values.items():
            buckets[bisect_left(self._bounds, value)].inc(count)
            total += value * count
        self._child._sum.inc(total)
        self.values.clear()
        return total


def label_for_type(kind: str) -> str:
    return kind if kind in KNOWN_EVENT_TYPES else "other"


class _Flow:
    """One direction of a session: sums since the last flush, and the series they go to. Two
    slotted objects instead of a dict per sum keyed by direction (each dict 184 bytes)."""

    __slots__ = (
        "events", "bytes", "waited", "rate", "delay", "chunk", "backpressure",
        "audio_seconds", "frame_bytes", "lane",
    )  # fmt: skip

    def __init__(self, series: SessionSeries, direction: str) -> None:
        self.events: dict[str, int] = {}  # a plain dict: see CountedHistogram.values
        self.bytes = 0
        self.waited = 0.0
        self.rate = 48000  # audio bytes per second until the session says otherwise
        self.delay = BatchedHistogram(series.relay_delay[direction])
        self.chunk = CountedHistogram(series.audio_chunk[direction])
        self.backpressure = series.backpressure[direction]
        self.audio_seconds = series.audio_seconds[direction]
        self.frame_bytes = series.frame_bytes[direction]
        # The direction's fast path, when the pump has one (relay/session/lane.py): it counts
        # into `events` and the chunk sizes itself; its bytes and delays come at flush.
        self.lane: Lane | None = None


class SessionMeter:
    """Everything measured about one session. Call `flush` now and then, and at the end."""

    __slots__ = (
        "metrics", "team", "deployment", "clock", "_ttfa", "_response_duration", "_in", "_out",
        "_flows", "audio_bytes_total", "audio_seconds_total", "tokens", "responses",
        "_turn_ended_at", "_response_started_at", "frames_total", "transcription_seconds",
        "cost_usd", "_prices", "_on_cost", "_cost",
    )  # fmt: skip

    def __init__(
        self,
        metrics: Metrics,
        team: str,
        deployment: str,
        backend: str = "default",
        *,
        prices: PriceTable | None = None,
        on_cost: Callable[[float], None] = lambda usd: None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.metrics = metrics
        self.team = team
        self.deployment = deployment
        self.clock = clock
        td = (team, deployment)
        series = metrics.series(team, deployment, backend)
        self._ttfa = series.time_to_first_audio
        self._response_duration = series.response_duration
        # Sums since the last flush, by direction.
        self._in = _Flow(series, "in")
        self._out = _Flow(series, "out")
        self._flows = {"in": self._in, "out": self._out}
        # Session totals, for the end-of-session log line.
        self.audio_bytes_total = {"in": 0, "out": 0}
        self.audio_seconds_total = {"in": 0.0, "out": 0.0}
        self.tokens: Tally[str] = Tally()
        self.frames_total = {"in": 0, "out": 0}
        self.transcription_seconds = 0.0
        self.cost_usd = 0.0
        self.responses = 0
        # Without prices nothing is costed (and no budget can apply: config checks).
        self._prices = prices
        self._on_cost = on_cost
        # No series for a deployment without prices: a $0 would read as free.
        self._cost = metrics.cost.labels(*td) if prices is not None else None
        self._turn_ended_at: float | None = None
        self._response_started_at: float | None = None

    def lane(self, direction: str, max_frame: int = -1, max_audio: int = -1) -> Lane:
        """A fast path for the direction's callback, counting into this meter (see
        relay/session/lane.py for what it takes; ``max_frame`` and ``max_audio`` are the
        policy's limits, -1 for none and for no append)."""
        flow = self._flows[direction]
        lane = Lane(flow.events, flow.chunk.values, flow.delay.bounds, max_frame, max_audio)
        lane.turn_pending = direction == "out" and self._turn_ended_at is not None
        flow.lane = lane
        return lane

    def _turn_ended(self, at: float | None) -> None:
        """The client's turn ended at ``at`` (None: its first audio came, or none will):
        until the first audio delta, the lane leaves deltas to `upstream_event`, which
        times it."""
        self._turn_ended_at = at
        lane = self._out.lane
        if lane is not None:
            lane.turn_pending = at is not None

    # --- per frame ---------------------------------------------------------------------

    def client_event(self, kind: str, frame: bytes, audio_bytes: int = 0) -> None:
        """A client frame (direction "in") that will be forwarded; ``audio_bytes`` is the
        decoded size of an append's audio (the pump measures it once, for the policy too)."""
        flow = self._in
        events = flow.events
        events[kind] = events.get(kind, 0) + 1
        flow.bytes += len(frame)
        if kind == "input_audio_buffer.append":  # its audio bytes are its chunk sizes' sum
            chunks = flow.chunk.values
            chunks[audio_bytes] = chunks.get(audio_bytes, 0) + 1
        elif kind == "response.create" and self._turn_ended_at is None:
            self._turn_ended(self.clock())

    def upstream_event(self, kind: str, frame: bytes) -> None:
        """An upstream frame (direction "out")."""
        flow = self._out
        events = flow.events
        events[kind] = events.get(kind, 0) + 1
        flow.bytes += len(frame)
        if kind in AUDIO_DELTA_TYPES:
            decoded = delta_size(frame)
            chunks = flow.chunk.values
            chunks[decoded] = chunks.get(decoded, 0) + 1
            if self._turn_ended_at is not None:
                self._ttfa.observe(self.clock() - self._turn_ended_at)
                self._turn_ended(None)
        elif kind in _TURN_END_UPSTREAM:
            if self._turn_ended_at is None:
                self._turn_ended(self.clock())
        elif kind == "response.created":
            self._response_started_at = self.clock()
        elif kind == "response.done":
            self._response_done(frame)
        elif kind == "conversation.item.input_audio_transcription.completed":
            self._transcription_usage(frame)

    def delay_observer(self, direction: str) -> Callable[[float], None]:
        """`forwarded(direction, delay, 0.0)` in one call, for frames written at once (in
        their read callback: nothing waited)."""
        return self._flows[direction].delay.observe

    def forwarded(self, direction: str, delay: float, waited: float) -> None:
        """A frame written ``delay`` seconds after it arrived, ``waited`` of them in the write."""
        flow = self._flows[direction]
        flow.delay.observe(delay)
        flow.waited += waited

    # --- rare events, parsed ---------------------------------------------------------------

    def session_changed(self, session: Any) -> None:
        """Track the audio formats in force, to turn bytes into seconds."""
        if not isinstance(session, Mapping):
            return
        for flow, name in ((self._in, "input"), (self._out, "output")):
            rate = audio_bytes_per_second(session, name)
            if rate is not None:
                flow.rate = rate

    def _response_done(self, frame: bytes) -> None:
        response = orjson.loads(frame).get("response")
        if not isinstance(response, Mapping):
            return
        self.responses += 1
        status = str(response.get("status"))
        status = status if status in ("completed", "cancelled", "failed", "incomplete") else "other"
        self.metrics.responses.labels(self.team, self.deployment, status).inc()
        if self._response_started_at is not None:
            self._response_duration.observe(self.clock() - self._response_started_at)
            self._response_started_at = None
        self._turn_ended(None)  # a response without audio ends the turn too
        usage = response.get("usage")
        if isinstance(usage, Mapping):
            if implausible(usage):
                _log.warning("upstream_usage_implausible", event_type="response.done")
            elif unsplit := unsplit_tokens(usage):
                _log.warning("upstream_usage_unsplit", tokens=unsplit, counted_as="text")
            self._count_usage(response_tokens(usage))

    def _transcription_usage(self, frame: bytes) -> None:
        usage = orjson.loads(frame).get("usage")
        if isinstance(usage, Mapping):
            if implausible(usage):
                _log.warning("upstream_usage_implausible", event_type="transcription")
            self._count_usage(*transcription_usage(usage))

    def _count_usage(self, counts: Mapping[str, int], seconds: float = 0.0) -> None:
        for kind, count in counts.items():
            if count:
                self.tokens[kind] += count
                self.metrics.tokens.labels(self.team, self.deployment, kind).inc(count)
        if seconds:
            self.transcription_seconds += seconds
            self.metrics.transcription_seconds.labels(self.team, self.deployment).inc(seconds)
        if self._prices is not None and self._cost is not None:
            usd = cost_usd(self._prices, counts, seconds)
            if usd > 0:
                self.cost_usd += usd
                self._cost.inc(usd)
                self._on_cost(usd)

    def upstream_error(self, code: Any, error_type: Any) -> None:
        """An upstream `error` event (the pump parses it), counted by its code; a null code
        counts as its type (`server_error`); unknown codes as "other"."""
        label = code if code is not None else error_type
        label = label if isinstance(label, str) and label in _KNOWN_ERROR_CODES else "other"
        self.metrics.upstream_errors.labels(self.deployment, label).inc()

    def violation(self, code: str) -> None:
        self.metrics.client_violations.labels(self.team, self.deployment, code).inc()

    def rewritten(self, params: tuple[str, ...]) -> None:
        """A client event corrected by the policy; params are rule paths from the config."""
        for param in params:
            self.metrics.client_rewrites.labels(self.team, self.deployment, param).inc()

    # --- flushing ----------------------------------------------------------------------------

    def flush(self) -> None:
        events = self.metrics.events
        for direction, flow in self._flows.items():
            tally = flow.events
            for kind, count in tally.items():
                events.labels(direction, label_for_type(kind)).inc(count)
                self.frames_total[direction] += count
            tally.clear()
            lane = flow.lane
            if lane is not None:
                taken, delays, delay_sum = lane.drain()
                flow.bytes += taken
                flow.delay.add(delays, delay_sum)
            flow.delay.flush()
            audio = flow.chunk.flush()
            if flow.bytes:
                flow.frame_bytes.inc(flow.bytes)
                flow.bytes = 0
            if flow.waited:
                flow.backpressure.inc(flow.waited)
                flow.waited = 0.0
            if audio:
                seconds = audio / flow.rate
                flow.audio_seconds.inc(seconds)
                self.audio_bytes_total[direction] += audio
                self.audio_seconds_total[direction] += seconds
