"""Several relay processes on one host: a supervisor and N workers sharing one port.

How it works:
- Each worker is a full relay (`relay serve --worker N`) listening with SO_REUSEPORT, so
  the kernel spreads new connections across them. The supervisor holds the port bound (not
  listening) for its lifetime, which also lets `port = 0` pick one port for all.
- Workers write their metrics to files (prometheus-client's multiprocess mode); the
  supervisor alone serves `/metrics`, one scrape that adds up every worker.
- A worker that exits unexpectedly is restarted (with a growing delay if it keeps crashing
  at start). SIGTERM/SIGINT go to every worker, each drains its sessions, and the
  supervisor exits 0 when all have exited cleanly.
- SIGHUP (and, with `server.watch_config`, a change of the file) is passed to every worker;
  each reloads on its own, as a single relay does. A worker started later reads the file
  as it is then. The supervisor keeps the pid file and watches the file.
- Workers' log lines pass through the supervisor's stdout unchanged.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import orjson
import structlog
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay.errors import ConfigError, StartupError
from relay.ops.build import frame_scans
from relay.ops.check import ConfigSource
from relay.ops.config import RelayConfig
from relay.ops.logsetup import count_dropped_lines, write_log_line
from relay.ops.metrics import configured_series
from relay.ops.watch import watch_file

_log = structlog.get_logger("relay.ops.workers")
# The longest log line a worker's output may carry (the relay's own are far shorter).
# A worker's event loop writes a byte down a pipe to the supervisor this often.
HEARTBEAT_SECONDS = 1.0
HEARTBEAT_FD_ENV = "RELAY_HEARTBEAT_FD"
# The least time a worker has to start listening before it is taken for hung.
START_SECONDS = 10.0
MAX_WORKER_LINE_BYTES = 1024 * 1024
_CRASH_WINDOW_SECONDS = 10.0
_MAX_RESTART_DELAY_SECONDS = 30.0


def worker_count(value: str) -> int:
    """`--workers`: a positive number, or "auto" for one per CPU."""
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    count = int(value)
    if count < 1:
        raise ValueError("--workers must be 1 or more, or auto")
    return count


@dataclass(slots=True)
class Worker:
    index: int
    process: asyncio.subprocess.Process
    started_at: float
    restarts: int = 0
    # It said it listens (`relay_listening`): a worker that exits while starting (a broken
    # config) never counts as running, so its brief restarts cannot reset the alert.
    listening: bool = False
    # When its event loop last beat (`beat`), on the supervisor's clock; and its end of the
    # heartbeat pipe.
    beat_at: float = 0.0
    beats: int = -1
    killed_unresponsive: bool = False

    @property
    def running(self) -> bool:
        return self.listening and self.process.returncode is None


class Supervisor:
    def __init__(
        self,
        config: RelayConfig,
        source: ConfigSource,
        environ: Mapping[str, str],
        count: int,
        *,
        overrides: Mapping[str, str],
    ) -> None:
        self.config = config
        self.source = source
        self.environ = environ
        self.count = count
        self.overrides = dict(overrides)
        self.stopping = False
        self._stop = asyncio.Event()  # SIGTERM or SIGINT
        # Lines the supervisor's own log writer dropped (the workers' go through it).
        self.log_lines_dropped = 0
        self.workers: dict[int, Worker] = {}
        self._metrics_dir = tempfile.TemporaryDirectory(prefix="relay-metrics-")
        # The config file as the supervisor last loaded it (`keep_in_force`), which every
        # worker starts with: one restarted after the file changed, without a reload, started
        # with the file on disk (teams removed there refused on its share of connections).
        self._config_dir = tempfile.TemporaryDirectory(prefix="relay-config-")
        self._in_force = Path(self._config_dir.name) / "in-force.toml"
        self._loop = asyncio.get_running_loop()

    async def run(self, on_ready: Callable[[str], None]) -> int:
        from relay.server import pid_file

        self.config = self.keep_in_force()  # raises ConfigError if it changed since
        server = self.config.server
        # From the start: a SIGHUP while workers start must not end the supervisor.
        self._loop.add_signal_handler(signal.SIGHUP, self.pass_reload)
        with _reserve_port(server.host, server.port) as port:
            self.overrides["RELAY_SERVER__PORT"] = str(port)
            metrics_runner = await self._serve_metrics()
            watcher = None
            try:
                ready = [self._loop.create_future() for _ in range(self.count)]
                for index in range(self.count):
                    await self._spawn(index, ready[index])
                url = await ready[0]
                await asyncio.gather(*ready)
                if server.watch_config:
                    watcher = self._loop.create_task(
                        watch_file(self.source.path, self._reload_all), name="config file watch"
                    )
                with pid_file(server.pid_file):
                    _log.info(
                        "relay_listening", url=url, workers=self.count, frame_scans=frame_scans()
                    )
                    on_ready(url)
                    return await self._supervise()
            finally:
                if watcher is not None:
                    watcher.cancel()
                if metrics_runner is not None:
                    await metrics_runner.cleanup()
                self._metrics_dir.cleanup()
                self._config_dir.cleanup()

    def keep_in_force(self) -> RelayConfig:
        """Load the config file and keep it as the one in force; ConfigError if it is bad
        (the one in force stays)."""
        with open(self.source.path, "rb") as file:
            data = file.read()
        loading = self._in_force.with_name("loading.toml")
        fd = os.open(loading, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        try:
            config = ConfigSource(loading, self.source.environ).load(strict=True)
        except ConfigError:
            loading.unlink()  # a bad file is not kept
            raise
        os.replace(loading, self._in_force)
        return config

    def pass_reload(self) -> None:
        """SIGHUP: every worker reloads. The supervisor's own settings (drain grace), and
        what a worker it restarts starts with, follow a valid file; a bad one each worker
        reports."""
        try:
            self.config = self.keep_in_force()
        except (ConfigError, OSError):
            pass  # each worker logs and counts the problems
        for worker in self.workers.values():
            if worker.process.returncode is None:
                worker.process.send_signal(signal.SIGHUP)
        _log.info("config_reload_passed", workers=len(self.workers))

    async def _reload_all(self) -> None:
        self.pass_reload()

    async def _serve_metrics(self) -> web.AppRunner | None:
        if not self.config.metrics.enabled:
            return None
        from prometheus_client import CollectorRegistry, PlatformCollector

        from relay.app import create_metrics_app
        from relay.edge.connection import RelayRunner
        from relay.ops.process_metrics import WorkerMetricFiles, WorkerProcesses
        from relay.server import runner_options

        registry = CollectorRegistry()
        WorkerMetricFiles(registry, path=self._metrics_dir.name, shape=self._shape)
        registry.register(WorkerProcesses(self._live_pids))
        registry.register(_WorkerStats(self))
        count_dropped_lines(self._dropped_line)
        PlatformCollector(registry=registry)
        runner = RelayRunner(
            create_metrics_app(registry), **runner_options(self.config, access_log=False)
        )
        await runner.setup()
        metrics = self.config.metrics
        from relay.server import listen

        site = web.TCPSite(runner, metrics.host, metrics.port)
        await listen(site, metrics.host, metrics.port, "metrics.port (--metrics-port)")
        host, port = runner.addresses[0][:2]
        _log.info("metrics_listening", url=f"http://{host}:{port}/metrics")
        return runner

    def _dropped_line(self) -> None:
        self.log_lines_dropped += 1

    def _shape(self, families: list[Metric]) -> list[Metric]:
        """The workers' merged families as the scrape shows them: what a reload removed
        (a backend, a team, a budget) left out, since a worker's metric file keeps a series
        for good; the lines the supervisor dropped counted with the workers' (whose lines
        it writes, so they never drop any)."""
        series = configured_series(self.config)
        dropped_seen = False
        for family in families:
            kept = series.get(family.name)
            if kept is not None:
                names, allowed = kept
                family.samples = [
                    s for s in family.samples if tuple(s.labels.get(n) for n in names) in allowed
                ]
            elif family.name == "relay_log_lines_dropped":
                dropped_seen = True
                family.samples = [
                    s._replace(value=s.value + self.log_lines_dropped)
                    if s.name.endswith("_total")
                    else s
                    for s in family.samples
                ]
        if not dropped_seen and self.log_lines_dropped:
            family = CounterMetricFamily(
                "relay_log_lines_dropped", "Log lines dropped: stdout was not read."
            )
            family.add_metric([], self.log_lines_dropped)
            families.append(family)
        return families

    def _live_pids(self) -> list[int]:
        return [w.process.pid for w in self.workers.values() if w.process.returncode is None]

    async def _spawn(self, index: int, ready: asyncio.Future[str] | None = None) -> None:
        env = {
            **self.environ,
            **self.overrides,
            "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir.name,
        }
        beats, beating = os.pipe()
        os.set_blocking(beats, False)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay", "serve", "--config", str(self.source.path),
                "--start-config", str(self._in_force), "--worker", str(index),
                stdout=asyncio.subprocess.PIPE,
                limit=MAX_WORKER_LINE_BYTES,
                env={**env, HEARTBEAT_FD_ENV: str(beating)},
                pass_fds=(beating,),
                preexec_fn=_die_with_parent,
            )  # fmt: skip
        except BaseException:
            os.close(beats)
            raise
        finally:
            os.close(beating)
        previous = self.workers.get(index)
        restarts = previous.restarts + 1 if previous else 0
        worker = self.workers[index] = Worker(index, process, self._loop.time(), restarts)
        worker.beat_at, worker.beats = self._loop.time(), beats
        self._loop.add_reader(beats, self._heard, worker)
        assert process.stdout is not None
        self._loop.create_task(
            _pass_output(worker, process.stdout, ready), name=f"worker {index} log"
        )
        _log.info("worker_started", worker=index, pid=process.pid)

    def _heard(self, worker: Worker) -> None:
        """A worker's heartbeat pipe is readable: it beat, or it is gone (EOF)."""
        try:
            data = os.read(worker.beats, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            worker.beat_at = self._loop.time()
            return
        self._loop.remove_reader(worker.beats)
        os.close(worker.beats)
        worker.beats = -1

    async def _watch_heartbeats(self) -> None:
        """Kill a worker whose event loop stopped beating (SIGSTOP, a deadlock, a frozen
        loop): its port share kept taking connections that hung, and its metrics, frozen
        too, said all was well. Its restart is then counted and alerted on."""
        ticked = self._loop.time()
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            limit = self.config.server.worker_unresponsive_seconds
            now = self._loop.time()
            late, ticked = now - ticked > HEARTBEAT_SECONDS + limit / 2, now
            for worker in self.workers.values():
                if worker.beats >= 0:
                    self._heard(worker)  # beats waiting in the pipe count, read or not
                if late:
                    # The supervisor itself did not run (a paused container, a stopped
                    # process group): its workers' silence is its own. A fresh window.
                    worker.beat_at = now
                silent = now - worker.beat_at
                # One that never listened is silent since it was started (it beats once it
                # listens): hung while starting, it is killed and started again too, given
                # at least START_SECONDS (a loaded host starts Python slowly).
                if worker.running:
                    allowed = limit
                elif not worker.listening and worker.process.returncode is None:
                    allowed = max(limit, START_SECONDS)
                else:
                    continue
                if silent > allowed and not worker.killed_unresponsive:
                    worker.killed_unresponsive = True
                    _log.error(
                        "worker_unresponsive",
                        worker=worker.index,
                        pid=worker.process.pid,
                        silent_seconds=round(silent, 1),
                        listening=worker.listening,
                    )
                    worker.process.kill()

    async def _supervise(self) -> int:
        watchdog = self._loop.create_task(self._watch_heartbeats(), name="worker heartbeats")
        try:
            return await self._supervise_workers()
        finally:
            watchdog.cancel()

    async def _supervise_workers(self) -> int:
        stop = self._stop
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(signum, stop.set)
        while True:
            waits = {
                self._loop.create_task(w.process.wait(), name=f"wait worker {i}"): i
                for i, w in self.workers.items()
            }
            stopper = self._loop.create_task(stop.wait(), name="stop")
            done, _ = await asyncio.wait([*waits, stopper], return_when=asyncio.FIRST_COMPLETED)
            for task in [*waits, stopper]:
                if task not in done:
                    task.cancel()
            if stopper in done:
                return await self._stop_all()
            for task in done:
                await self._restart(waits[task])

    async def _restart(self, index: int) -> None:
        worker = self.workers[index]
        _log.error(
            "worker_exited", worker=index, pid=worker.process.pid, code=worker.process.returncode
        )
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.process.pid, self._metrics_dir.name)  # type: ignore[no-untyped-call]
        crashed_early = self._loop.time() - worker.started_at < _CRASH_WINDOW_SECONDS
        delay = min(_MAX_RESTART_DELAY_SECONDS, 2.0**worker.restarts) if crashed_early else 0.0
        if delay:
            try:  # a SIGTERM meanwhile starts the drain at once, not after the delay
                async with asyncio.timeout(delay):
                    await self._stop.wait()
                return
            except TimeoutError:
                pass
        await self._spawn(index)

    async def _stop_all(self) -> int:
        """SIGTERM to every worker; each drains. Kill those that outlive the grace."""
        self.stopping = True
        _log.info("relay_stopping", workers=len(self.workers))
        for worker in self.workers.values():
            if worker.process.returncode is None:
                worker.process.send_signal(signal.SIGTERM)
        server = self.config.server
        deadline = server.drain_grace_seconds + 2 * server.close_timeout_seconds + 5
        try:
            async with asyncio.timeout(deadline):
                codes = [await w.process.wait() for w in self.workers.values()]
        except TimeoutError:
            for worker in self.workers.values():
                if worker.process.returncode is None:
                    worker.process.kill()
            return 1
        _log.info("relay_stopped", exit_codes=codes)
        return 0 if all(code == 0 for code in codes) else 1


# The series only the supervisor exports (tests/test_workers.py scrapes them).
SUPERVISOR_METRICS = frozenset(
    {"relay_workers", "relay_workers_running", "relay_worker_restarts_total"}
)


class _WorkerStats(Collector):
    """How many workers run, of how many, and how often each was restarted: a worker that
    cannot start again (a config file broken meanwhile) leaves the pod at part capacity
    with /readyz green."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> list[Metric]:
        supervisor = self._supervisor
        configured = GaugeMetricFamily("relay_workers", "Worker processes configured.")
        configured.add_metric([], supervisor.count)
        running = GaugeMetricFamily("relay_workers_running", "Worker processes running now.")
        running.add_metric([], sum(1 for w in supervisor.workers.values() if w.running))
        restarts = CounterMetricFamily(
            "relay_worker_restarts",
            "Worker processes started again after one exited.",
            labels=["worker"],
        )
        for index, worker in sorted(supervisor.workers.items()):
            restarts.add_metric([str(index)], worker.restarts)
        return [configured, running, restarts]


def _die_with_parent() -> None:
    """In the child, before exec: have the kernel send SIGTERM if the supervisor dies (even
    by SIGKILL), so no worker is left serving alone. SIGHUP is ignored until the worker
    handles it (an ignored signal stays ignored across exec): a reload passed on while a
    worker starts must not kill it, and it reads the file as it is anyway."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux/glibc: workers then outlive a killed supervisor


_PR_SET_PDEATHSIG = 1


def _check_free(family: socket.AddressFamily, host: str, port: int) -> None:
    """Refuse a port another process listens on. SO_REUSEPORT lets any process of the same
    user join a port: a second `--workers` relay (an old one left running, with its old
    config and keys) took half the connections without a word. A bind without it fails
    there, and still takes a port only TIME_WAIT connections hold."""
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as exc:
        raise StartupError.cannot_listen(host, port, exc, "server.port (--port)") from exc
    finally:
        probe.close()


class _reserve_port:
    """Hold (host, port) bound with SO_REUSEPORT while the workers listen on it."""

    def __init__(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if port:
            _check_free(family, host, port)
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # As asyncio's listeners do: the port's connections a restart left in TIME_WAIT (a
        # drain closes its sessions first) must not keep it for a minute.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            raise StartupError.cannot_listen(host, port, exc, "server.port (--port)") from exc

    def __enter__(self) -> int:
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


async def _pass_output(
    worker: Worker, stream: asyncio.StreamReader, ready: asyncio.Future[str] | None
) -> None:
    def listening(url: str) -> None:
        worker.listening = True
        if ready is not None and not ready.done():
            ready.set_result(url)

    await relay_output(stream, listening)
    if ready is not None and not ready.done():
        ready.set_exception(RuntimeError("a worker exited before listening"))


async def relay_output(
    stream: asyncio.StreamReader, on_listening: Callable[[str], None] | None = None
) -> None:
    """Pass a worker's log lines through; say when it is listening. A line past
    `MAX_WORKER_LINE_BYTES` is dropped and said (readline's error ended this reading, and
    every later line of the worker was lost while it went on serving)."""
    while True:
        try:
            line = await stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as end:  # the worker's output ended
            line = end.partial
            if not line:
                break
        except asyncio.LimitOverrunError:
            await _skip_line(stream)
            _log.warning("worker_log_line_too_long", limit_bytes=MAX_WORKER_LINE_BYTES)
            continue
        write_log_line(line)
        if on_listening is not None and b'"relay_listening"' in line:
            on_listening(str(orjson.loads(line).get("url", "")))
            on_listening = None


async def _skip_line(stream: asyncio.StreamReader) -> None:
    """Read and drop the rest of a line longer than the stream's limit, through its end."""
    while True:
        try:
            await stream.readuntil(b"\n")
            return
        except asyncio.LimitOverrunError as over:
            await stream.readexactly(over.consumed)
        except asyncio.IncompleteReadError:
            return


async def beat(environ: Mapping[str, str]) -> None:
    """A worker's side of the heartbeat: a byte a second from its event loop, while the
    supervisor reads (a full pipe skips a beat; a closed one ends it)."""
    fd = int(environ.get(HEARTBEAT_FD_ENV, "-1"))
    if fd < 0:
        return
    os.set_blocking(fd, False)
    while True:
        try:
            os.write(fd, b".")
        except BlockingIOError:
            pass
        except OSError:
            return
        await asyncio.sleep(HEARTBEAT_SECONDS)
