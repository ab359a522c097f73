"""Running the relay as a process: listeners, TLS, signals, orderly shutdown."""

from __future__ import annotations

import asyncio
import gc
import signal
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from aiohttp import web

from relay.app import create_app, create_metrics_app, drain
from relay.ops.config import RelayConfig, TlsConfig
from relay.ops.logsetup import AccessLogger
from relay.state import REGISTRY, STATE

_log = structlog.get_logger("relay.server")


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile=tls.cert_file, keyfile=tls.key_file)
    return context


async def run_server(
    config: RelayConfig,
    environ: Mapping[str, str],
    *,
    on_ready: Callable[[str], None] = lambda url: None,
    worker: bool = False,
) -> None:
    """Serve until SIGTERM or SIGINT, then close every session and exit.

    A worker (of `relay.ops.workers.Supervisor`) shares its port and leaves /metrics to the
    supervisor."""
    # Signals are handled from the start: a SIGTERM during start-up stops the relay cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    app = create_app(config, environ)
    runner = web.AppRunner(app, **runner_options(config))
    await runner.setup()
    metrics_runner: web.AppRunner | None = None
    try:
        tls = config.server.tls
        site = web.TCPSite(
            runner,
            config.server.host,
            config.server.port,
            ssl_context=server_ssl_context(tls) if tls else None,
            reuse_port=worker or None,
        )
        await site.start()
        if config.metrics.enabled and not worker:
            metrics_runner = web.AppRunner(create_metrics_app(app[REGISTRY]), access_log=None)
            await metrics_runner.setup()
            await web.TCPSite(metrics_runner, config.metrics.host, config.metrics.port).start()
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
        _log.info("relay_listening", url=url)
        on_ready(url)
        await stop.wait()
        # Readiness turns false at once; new sessions get 503 while the others finish.
        _log.info("relay_stopping", grace_seconds=config.server.drain_grace_seconds)
        await drain(app[STATE], grace_seconds=config.server.drain_grace_seconds)
    finally:
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
    _log.info("relay_stopped")


def runner_options(config: RelayConfig) -> dict[str, Any]:
    """aiohttp server options from the config (also used by the tests' servers)."""
    return {
        "access_log_class": AccessLogger,
        "shutdown_timeout": config.server.close_timeout_seconds,
        "max_line_size": config.server.max_header_bytes,
        "max_field_size": config.server.max_header_bytes,
    }


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host
