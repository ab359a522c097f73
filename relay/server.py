"""Running the relay as a process: listeners, TLS, signals, orderly shutdown."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from relay.app import create_app, create_metrics_app, drain
from relay.edge.connection import RelayRunner
from relay.edge.tls import CertificateWatch, server_ssl_context
from relay.errors import ConfigError, StartupError
from relay.live import ReloadResult, reload
from relay.ops.build import frame_scans
from relay.ops.check import ConfigSource
from relay.ops.config import RelayConfig
from relay.ops.logsetup import AccessLogger
from relay.ops.watch import watch_file
from relay.ops.workers import beat
from relay.state import REGISTRY, RELOAD, STATE, RelayState

_log = structlog.get_logger("relay.server")


async def run_server(
    config: RelayConfig,
    environ: Mapping[str, str],
    *,
    source: ConfigSource | None = None,
    on_ready: Callable[[str], None] = lambda url: None,
    worker: bool = False,
) -> None:
    """Serve until SIGTERM or SIGINT, then close every session and exit. SIGHUP (and, with
    ``server.watch_config``, a change of the file) reloads the config from ``source``.

    A worker (of `relay.ops.workers.Supervisor`) shares its port and leaves /metrics, the
    pid file and the file watch to the supervisor, which passes reloads on."""
    # Signals are handled from the start: a SIGTERM during start-up stops the relay cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    app = create_app(config, environ)
    state = app[STATE]
    reloads = Reloads(state, source)
    if source is not None:
        loop.add_signal_handler(signal.SIGHUP, reloads.start)
        app[RELOAD] = reloads.forward_to_supervisor if worker else reloads.run
    runner = RelayRunner(app, **runner_options(config))
    await runner.setup()
    metrics_runner: web.AppRunner | None = None
    watcher: asyncio.Task[None] | None = None
    heartbeat: asyncio.Task[None] | None = None
    certificate_watch: asyncio.Task[None] | None = None
    try:
        tls = config.server.tls
        ssl_context = None
        if tls is not None:
            ssl_context = server_ssl_context(tls)
            # New connections get a renewed certificate; open sessions keep theirs.
            expiry = state.metrics.tls_certificate_expiry.labels(str(tls.cert_file))
            certificates = CertificateWatch(ssl_context, tls, expiry.set)
            certificate_watch = loop.create_task(certificates.run(), name="certificate watch")
        site = web.TCPSite(
            runner,
            config.server.host,
            config.server.port,
            ssl_context=ssl_context,
            reuse_port=worker or None,
            backlog=config.server.listen_backlog,
        )
        await listen(site, config.server.host, config.server.port, "server.port (--port)")
        if config.metrics.enabled and not worker:
            metrics_runner = RelayRunner(
                create_metrics_app(app[REGISTRY]), **runner_options(config, access_log=False)
            )
            await metrics_runner.setup()
            metrics = config.metrics
            await listen(
                web.TCPSite(metrics_runner, metrics.host, metrics.port),
                metrics.host,
                metrics.port,
                "metrics.port (--metrics-port)",
            )
            metrics_host, metrics_port = metrics_runner.addresses[0][:2]
            _log.info(
                "metrics_listening",
                url=f"http://{_host_for_url(metrics_host)}:{metrics_port}/metrics",
            )
        host, port = runner.addresses[0][:2]
        url = f"{'wss' if tls else 'ws'}://{_host_for_url(host)}:{port}"
        # Objects made at start-up live forever: keep them out of every future GC pass. Frames
        # are freed by reference counting; the cycle collector only has sessions' cycles to
        # find, so it may run far less often (its full passes paused the loop for tens of ms
        # at 500 sessions).
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        if source is not None and config.server.watch_config and not worker:
            watcher = loop.create_task(
                watch_file(source.path, reloads.run), name="config file watch"
            )
        if worker:  # the supervisor kills a worker whose loop stops beating
            heartbeat = loop.create_task(beat(environ), name="worker heartbeat")
        with pid_file(None if worker else config.server.pid_file):
            _log.info("relay_listening", url=url, frame_scans=frame_scans())
            on_ready(url)
            await stop.wait()
            # Readiness turns false at once; new sessions get 503 while the others finish.
            grace = state.live.config.server.drain_grace_seconds
            _log.info("relay_stopping", grace_seconds=grace)
            await drain(state, grace_seconds=grace)
    finally:
        for task in (watcher, certificate_watch, heartbeat):
            if task is not None:
                task.cancel()
        await reloads.cancel()
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
    _log.info("relay_stopped")


class Reloads:
    """Reloads asked for by signal, file watch or the admin endpoint; run one at a time."""

    def __init__(self, state: RelayState, source: ConfigSource | None) -> None:
        self.state = state
        self.source = source
        self.tasks: set[asyncio.Task[object]] = set()

    def start(self) -> None:
        """From a signal handler: reload in a task of its own."""
        task = asyncio.get_running_loop().create_task(self.run(), name="config reload")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self) -> dict[str, Any]:
        assert self.source is not None
        return (await reload(self.state, self.source)).as_json()

    async def forward_to_supervisor(self) -> dict[str, Any]:
        """In a worker: check the file here (to answer), then have the supervisor pass the
        reload to every worker, this one included."""
        assert self.source is not None
        try:
            await asyncio.to_thread(self.source.load, strict=True)
        except ConfigError as exc:
            return ReloadResult("rejected", tuple(exc.problems)).as_json()
        os.kill(os.getppid(), signal.SIGHUP)
        return {"outcome": "passed_to_every_worker", "problems": []}

    async def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def listen(site: web.TCPSite, host: str, port: int, setting: str) -> None:
    """Start listening; a port that is taken (or not ours to take) is a StartupError naming
    the port and the setting that changes it."""
    try:
        await site.start()
    except OSError as exc:
        raise StartupError.cannot_listen(host, port, exc, setting) from exc


@contextmanager
def pid_file(path: Path | None) -> Iterator[None]:
    """This process's id in ``path`` while it serves, for `relay reload`."""
    if path is None:
        yield
        return
    try:
        path.write_text(f"{os.getpid()}\n")
    except OSError as exc:
        raise StartupError(f"cannot write server.pid_file {path}: {exc.strerror}") from exc
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def runner_options(config: RelayConfig, *, access_log: bool = True) -> dict[str, Any]:
    """`RelayRunner` options from the config (also used by the tests' servers)."""
    server = config.server
    options: dict[str, Any] = {
        "access_log_class": AccessLogger,
        "shutdown_timeout": server.close_timeout_seconds,
        "max_line_size": server.max_header_bytes,
        "max_field_size": server.max_header_bytes,
        "header_timeout": server.header_timeout_seconds,
        "keepalive_timeout": server.keepalive_timeout_seconds,
    }
    if not access_log:
        options["access_log"] = None
    return options


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host
