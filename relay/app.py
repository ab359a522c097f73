"""The aiohttp application: typed state, resource lifetimes, routes, shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import aiohttp
import structlog
from aiohttp import web, web_response
from prometheus_client import CollectorRegistry
from yarl import URL

from relay.edge import handlers, playground, webrtc
from relay.edge.admission import AdmissionStore, AuthBrake, AuthThrottle, MemoryAdmission
from relay.edge.admission_redis import RedisAdmission
from relay.edge.auth_brake_redis import RedisAuthThrottle
from relay.edge.budget import Budgets, SpendBook, explain
from relay.edge.responses import error_response
from relay.edge.routes import REALTIME_PATHS
from relay.edge.spend_book import MemorySpend, RedisSpend
from relay.errors import ClientRefused, ConfigError
from relay.live import budget_gauges, build_live, build_pools, zero_series
from relay.ops.check import redis_url_problem
from relay.ops.config import RelayConfig
from relay.ops.logsetup import count_dropped_lines
from relay.ops.loop_lag import LoopLag
from relay.ops.metrics import Metrics
from relay.ops.redaction import SECRETS
from relay.session import frames
from relay.session.pump import Bridge
from relay.simulator import RunningSimulator, SimulatorOptions, start_simulator
from relay.state import METRICS_TOKEN, REGISTRY, STATE, RelayState
from relay.upstream.backends import build_credentials
from relay.upstream.handshake import Dialer

_log = structlog.get_logger("relay.app")
# No `Server: Python/3.11 aiohttp/3.x` (versions help only an attacker). aiohttp fills the
# header from this module global in every response it writes, including the 400s its HTTP
# parser sends before any application hook could run.
web_response.SERVER_SOFTWARE = "realtime-relay"  # type: ignore[attr-defined]
# Sockets whose frames the pumps can forward inside the read callback (relay.session.frames).
frames.install()
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    config: RelayConfig, environ: Mapping[str, str], *, metrics: Metrics | None = None
) -> web.Application:
    """Build the relay; raises ConfigError when a secret it needs is missing."""
    limits = config.limits
    metrics = metrics or Metrics.create()
    admission = _admission(config, environ, metrics)
    local_brake = AuthThrottle(
        limits.auth_failures_allowed,
        limits.auth_failure_window_seconds,
        limits.auth_block_seconds,
    )
    auth_throttle: AuthBrake = local_brake
    if isinstance(admission, RedisAdmission):
        # Every process and host counts an address's failures together.
        auth_throttle = RedisAuthThrottle(admission.client, config.admission, limits, local_brake)
    state = RelayState(
        live=build_live(
            config,
            build_credentials(
                config,
                environ,
                lambda c: metrics.credential_refresh_failures.labels(c.method).inc(),
            ),
        ),
        metrics=metrics,
        admission=admission,
        budgets=Budgets(
            {t.name: t.limits for t in config.teams.values()},
            _spend_book(config, admission, metrics),
        ),
        auth_throttle=auth_throttle,
    )
    state.live_gauges.track(state.metrics.ready, lambda: float(state.ready))
    budget = state.message_budget
    budget.limit = config.server.message_buffer_bytes
    if not frames.BUDGET_ENFORCED:  # pragma: no cover (the extension is built here)
        _log.warning(
            "message_buffer_not_enforced",
            detail="relay/session/_accel.c was not built: server.message_buffer_bytes does "
            "not bound client messages still arriving (install with a C compiler)",
        )
    state.live_gauges.track(state.metrics.message_buffer, lambda: float(budget.held))
    state.live_gauges.track(state.metrics.message_buffer_limit, lambda: float(budget.limit))
    for team in config.teams.values():
        state.message_budget_for(team)  # each team's series from the start
    count_dropped_lines(state.metrics.log_lines_dropped.inc)
    zero_series(state)
    budget_gauges(state)
    app = web.Application(middlewares=[json_errors])
    app[STATE] = state
    app[REGISTRY] = state.metrics.registry
    app.cleanup_ctx.append(_simulator)
    app.cleanup_ctx.append(_admission_lifetime)
    app.cleanup_ctx.append(_budget_lifetime)
    app.cleanup_ctx.append(_credentials)
    app.cleanup_ctx.append(_upstream_http)
    app.cleanup_ctx.append(_live_gauges)
    app.cleanup_ctx.append(_loop_lag)
    app.on_shutdown.append(_close_sessions)
    for path in REALTIME_PATHS:
        # The GA paths also serve WebRTC calls' sideband sockets (`?call_id=`).
        app.router.add_get(
            path, webrtc.realtime if path in webrtc.SIDEBAND_PATHS else handlers.realtime
        )
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/status", handlers.status)
    app.router.add_post("/admin/reload", handlers.admin_reload)
    webrtc.add_routes(app)
    if config.playground.enabled:
        playground.add_routes(app)
    if config.metrics.enabled and config.metrics.on_main_port:
        assert config.metrics.token_env is not None  # validated in config
        token = environ.get(config.metrics.token_env, "")
        if not token:
            raise ConfigError(
                [f"environment: metrics.token_env: {config.metrics.token_env} is not set or empty"]
            )
        SECRETS.register(token)
        app[METRICS_TOKEN] = token
        app.router.add_get("/metrics", handlers.metrics)
    return app


def create_metrics_app(registry: CollectorRegistry) -> web.Application:
    """The metrics listener's app: `/metrics` and nothing else."""
    app = web.Application(middlewares=[json_errors])
    app[REGISTRY] = registry
    app.router.add_get("/metrics", handlers.metrics)
    return app


async def _simulator(app: web.Application) -> AsyncIterator[None]:
    """Start the built-in simulated upstream when a deployment uses it."""
    state = app[STATE]
    running: RunningSimulator | None = None
    if state.live.config.uses_simulator:
        # The simulator accepts exactly the key the relay presents to it.
        key = (await state.simulator_credential.headers())["api-key"]
        simulator = state.live.config.simulator
        running = await start_simulator(
            SimulatorOptions(
                api_keys=frozenset([key]),
                speed=simulator.speed,
                max_session_seconds=simulator.max_session_seconds,
                tool_trigger=simulator.tool_trigger,
            )
        )
        state.simulator_url = running.url
        _log.info("simulator_started", url=running.url)
    try:
        yield
    finally:
        if running is not None:
            await running.close()


async def _upstream_http(app: web.Application) -> AsyncIterator[None]:
    """One client session for the upstream's HTTP requests, without aiohttp's 100-connection
    cap, and one dialer for its WebSockets; both with the same TLS context."""
    state = app[STATE]
    live = state.live
    upstream = live.config.upstream
    ssl_context = ssl.create_default_context()
    if upstream.ca_file is not None:
        ssl_context.load_verify_locations(cafile=upstream.ca_file)
    connector = aiohttp.TCPConnector(limit=0, ssl=ssl_context)
    # The connect deadline is also applied per dial, from the config in force.
    timeout = aiohttp.ClientTimeout(total=None)
    state.http = aiohttp.ClientSession(connector=connector, timeout=timeout)
    state.dialer = Dialer(ssl_context)
    state.live = dataclasses.replace(live, pools=build_pools(state, live.config, live.credentials))
    try:
        yield
    finally:
        state.live = dataclasses.replace(state.live, pools={})
        await state.http.close()


def _admission(config: RelayConfig, environ: Mapping[str, str], metrics: Metrics) -> AdmissionStore:
    team_limits = {t.name: t.limits for t in config.teams.values()}
    if config.admission.backend == "memory":
        return MemoryAdmission(config.limits, team_limits)
    problem = redis_url_problem(config.admission.redis_url_env, environ)
    if problem is not None:
        raise ConfigError([problem])
    url = environ[config.admission.redis_url_env].strip()
    SECRETS.register(URL(url).password)
    return RedisAdmission.connect(
        config.admission,
        config.limits,
        team_limits,
        url,
        on_redis_error=lambda team: metrics.admission_errors.labels(team).inc(),
    )


def _spend_book(config: RelayConfig, admission: AdmissionStore, metrics: Metrics) -> SpendBook:
    """Spend is shared where admission is: in Redis (one client for both), or this process."""
    if isinstance(admission, RedisAdmission):
        return RedisSpend(
            admission.client,
            config.admission.key_prefix,
            config.admission.redis_timeout_seconds,
            tuple(config.teams),
            on_redis_error=metrics.budget_sync_failures.inc,
        )
    return MemorySpend()


async def _budget_lifetime(app: web.Application) -> AsyncIterator[None]:
    """The spend book's sync (Redis) and the watch that ends live sessions over budget."""
    state = app[STATE]
    await state.budgets.book.start()
    watch = asyncio.get_running_loop().create_task(_end_over_budget(state), name="budget watch")
    try:
        yield
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await state.budgets.book.close()


async def _end_over_budget(state: RelayState) -> None:
    """Whenever spend grows: each live session of a team now over budget (whose limits say
    "end") finishes its response in progress, then gets budget_exceeded and 1008."""
    budgets, changed = state.budgets, state.budgets.book.changed
    ending: set[Bridge] = set()
    async with asyncio.TaskGroup() as tasks:
        while True:
            await changed.wait()
            changed.clear()
            for bridge in list(state.bridges):
                team = bridge.meter.team
                if bridge in ending or not budgets.ends_live_sessions(team):
                    continue
                over = budgets.over(team)
                if over is None:
                    continue
                ending.add(bridge)
                tasks.create_task(
                    end_after_response(
                        bridge,
                        state.live.config.server.drain_grace_seconds,
                        code=1008,
                        reason="budget exceeded",
                        cause="budget_exceeded",
                        message=explain(over, live=True),
                        error_type="invalid_request_error",
                    ),
                    name="end over budget",
                )
            ending &= state.bridges.keys()


async def _admission_lifetime(app: web.Application) -> AsyncIterator[None]:
    admission = app[STATE].admission
    await admission.start()
    try:
        yield
    finally:
        await admission.close()


async def _live_gauges(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.get_running_loop().create_task(
        app[STATE].live_gauges.refresh_forever(), name="live gauges"
    )
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _loop_lag(app: web.Application) -> AsyncIterator[None]:
    lag = LoopLag(app[STATE].metrics.loop_lag)
    lag.start()
    try:
        yield
    finally:
        lag.stop()


async def _credentials(app: web.Application) -> AsyncIterator[None]:
    """Start every upstream credential (first Entra tokens, refresh tasks); close at the end."""
    state = app[STATE]
    await asyncio.gather(*(c.start() for c in state.live.credentials.values()))
    try:
        yield
    finally:
        # Those in force at the end: a reload closes the ones it retires.
        await asyncio.gather(*(c.close() for c in state.live.credentials.values()))


async def _close_sessions(app: web.Application) -> None:
    """aiohttp's shutdown hook: whatever a drain left open closes now."""
    await drain(app[STATE], grace_seconds=0)


async def drain(state: RelayState, *, grace_seconds: float) -> None:
    """Stop taking sessions; give each open one until its turn in progress is over (a
    response; a tool the client runs, then the answer it asks for: at most
    ``grace_seconds``), then close it with an `error` event and 1001."""
    state.draining = True
    if state.bridges:
        _log.info("draining", sessions=len(state.bridges), grace_seconds=grace_seconds)
        await asyncio.gather(
            *(
                end_after_response(
                    bridge,
                    grace_seconds,
                    code=1001,
                    reason="relay shutting down",
                    cause="relay_shutting_down",
                    message="The relay is restarting; reconnect to continue.",
                    whole_turn=True,
                )
                for bridge in list(state.bridges)
            )
        )


async def end_after_response(
    bridge: Bridge,
    grace_seconds: float,
    *,
    code: int,
    reason: str,
    cause: str,
    message: str,
    error_type: str = "server_error",
    whole_turn: bool = False,
) -> None:
    """Let the session finish its response in progress (with ``whole_turn``, its turn: a
    tool's output and its answer too; at most ``grace_seconds``), then end it from the
    relay's side with an `error` event ``cause`` and ``code``."""
    try:
        async with asyncio.timeout(grace_seconds):
            if whole_turn:
                await bridge.turn_over.wait()
            else:
                await bridge.between_responses.wait()
    except TimeoutError:
        pass
    await bridge.stop(code, reason, cause=cause, message=message, error_type=error_type)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown paths and methods get the service's JSON error, like every other refusal."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        refusal = ClientRefused(405, "method_not_allowed", f"{request.method} is not allowed here.")
        response = error_response(refusal)
        response.headers["Allow"] = ",".join(sorted(exc.allowed_methods))
        return response
    except web.HTTPNotFound:
        return error_response(ClientRefused(404, "not_found", "There is nothing at this path."))
