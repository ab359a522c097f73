"""`relay serve --workers 2`: one port, one aggregated scrape, crashed workers restarted."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from relay.edge.auth import hash_key
from tests.helpers import read_until
from tests.processes import free_port, relay_process

KEY = "rk-workers-demo"
CONFIG = """
[server]
port = 0
drain_grace_seconds = 2
[metrics]
port = {metrics_port}
[logging]
format = "json"
[simulator]
speed = 0
[deployments.gpt-realtime]
endpoint = "simulator"
credential = {{ env = "RELAY_SIMULATOR_KEY" }}
[teams.demo]
keys = ["{key}"]
deployments = ["gpt-realtime"]
"""


async def scrape(http: aiohttp.ClientSession, port: int) -> dict[str, list]:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    found: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


async def test_two_workers_share_the_port_and_the_scrape(tmp_path):
    metrics_port = free_port()
    config = tmp_path / "relay.toml"
    config.write_text(CONFIG.format(metrics_port=metrics_port, key=hash_key(KEY)))
    env = {"RELAY_SIMULATOR_KEY": "sim"}
    async with relay_process(config, env, "--workers", "2") as (supervisor, base):
        async with aiohttp.ClientSession() as http:
            for _ in range(20):
                connector = aiohttp.TCPConnector(force_close=True)
                async with aiohttp.ClientSession(connector=connector) as own:
                    ws = await own.ws_connect(
                        f"{base}/openai/v1/realtime?model=gpt-realtime", headers={"api-key": KEY}
                    )
                    await read_until(ws, "session.created")
                    await ws.close()
            # Workers write their gauges and flush their counters every second: poll.
            for _ in range(100):
                found = await scrape(http, metrics_port)
                ready = {s.labels["pid"]: s.value for s in found.get("relay_ready", [])}
                if len(ready) == 2 and set(ready.values()) == {1.0}:
                    break
                await asyncio.sleep(0.05)  # workers write their gauges every second: poll
            assert len(ready) == 2 and set(ready.values()) == {1.0}
            # Each worker's process metrics (and the supervisor's), by pid; the build, once.
            rss = {s.labels["pid"]: s.value for s in found["process_resident_memory_bytes"]}
            assert set(ready) < set(rss) and len(rss) == 3 and min(rss.values()) > 0
            assert "python_info" in found
            (build,) = found["relay_build_info"]
            assert build.labels["version"] == "0.1.0" and build.value == 1
            assert build.labels["frame_scans"] == "c"  # CI requires the C build
            for _ in range(100):
                total = sum(s.value for s in found.get("relay_sessions_total", []))
                if total == 20:
                    break
                await asyncio.sleep(0.05)  # the workers flush on their own schedule
                found = await scrape(http, metrics_port)
            assert total == 20

            # A worker dies: the supervisor starts another in its place.
            victim = int(next(iter(ready)))
            os.kill(victim, signal.SIGKILL)
            for _ in range(200):
                found = await scrape(http, metrics_port)
                pids = {s.labels["pid"] for s in found["relay_ready"]}
                running = [s.value for s in found["relay_workers_running"]]
                # Running once its `relay_listening` line reached the supervisor.
                if str(victim) not in pids and len(pids) == 2 and running == [2]:
                    break
                await asyncio.sleep(0.05)  # a process restart: no event to await from here
            assert str(victim) not in pids and len(pids) == 2 and running == [2]
            assert [s.value for s in found["relay_workers"]] == [2]
            restarts = {s.labels["worker"]: s.value for s in found["relay_worker_restarts_total"]}
            assert sorted(restarts.values()) == [0, 1]

        supervisor.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(supervisor.wait(), timeout=15) == 0


async def test_a_sigterm_during_a_restart_delay_starts_the_drain_at_once(tmp_path):
    """A worker that cannot start (here the config it starts with is broken under it) is
    restarted after a growing delay. A SIGTERM in that delay waited for it (up to 30 s,
    serving new sessions and ready meanwhile); it now stops every worker at once."""
    config = tmp_path / "relay.toml"
    config.write_text(CONFIG.format(metrics_port=free_port(), key=hash_key(KEY)))
    lines: asyncio.Queue[dict] = asyncio.Queue()
    env = {"RELAY_SIMULATOR_KEY": "sim"}
    async with relay_process(config, env, "--workers", "2", lines=lines) as (supervisor, _):
        # The supervisor says it listens once every worker does: its children are they.
        victim = _worker_pids(supervisor.pid)[0]
        _break_start_config(victim)  # a worker started from now on exits at once
        os.kill(victim, signal.SIGKILL)
        exits = 0
        while exits < 3:  # the kill, then two failed restarts: a 4 s delay is under way
            event = await lines.get()
            exits += event.get("event") == "worker_exited"
        supervisor.send_signal(signal.SIGTERM)
        while (event := await lines.get()).get("event") != "relay_stopping":
            assert event.get("event") != "worker_started", "restarted after the SIGTERM"
        await asyncio.wait_for(supervisor.wait(), timeout=15)


def _break_start_config(worker: int) -> None:
    """Break the config the supervisor starts its workers with (`--start-config`)."""
    with open(f"/proc/{worker}/cmdline", "rb") as cmdline:
        argv = cmdline.read().decode().split("\0")
    with open(argv[argv.index("--start-config") + 1], "w") as in_force:
        in_force.write("not toml [")


def _worker_pids(supervisor: int) -> list[int]:
    with open(f"/proc/{supervisor}/task/{supervisor}/children") as children:
        return [int(pid) for pid in children.read().split()]


async def test_the_supervisors_scrape_leaves_out_what_a_reload_removed(tmp_path):
    """Under --workers a worker's metric file keeps every series it ever wrote: a backend a
    reload removed stayed in the scrape at 0 (RelayBackendEjected firing until a restart),
    and a removed team's budget. The supervisor leaves out what the config no longer has,
    and counts the log lines it dropped itself (the workers' lines go through it)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from relay.ops.check import ConfigSource
    from relay.ops.workers import Supervisor
    from tests.helpers import relay_config

    def config(*backends: str, teams: tuple[str, ...]):
        pool = [{"name": b, "endpoint": "http://127.0.0.1:1", "credential": {"env": "K"}}
                for b in backends]  # fmt: skip
        limits = {"max_usd_per_day": 5.0}
        return relay_config(
            "http://127.0.0.1:1",
            deployments={"gpt-realtime": {"backends": pool, "prices": {"output_audio": 64.0}}},
            teams={
                t: {
                    "keys": [hash_key(f"rk-{t}-0123456789")],
                    "deployments": ["gpt-realtime"],
                    "limits": limits,
                }
                for t in teams
            },  # fmt: skip
        )

    supervisor = Supervisor(
        config("good", "dead", teams=("a", "b")),
        ConfigSource(tmp_path / "relay.toml", {}),
        {},
        2,
        overrides={},
    )
    supervisor.config = config("good", teams=("a",))  # what the reload applied
    up = GaugeMetricFamily("relay_backend_up", "", labels=["deployment", "backend"])
    up.add_metric(["gpt-realtime", "good"], 1)
    up.add_metric(["gpt-realtime", "dead"], 0)
    budget = GaugeMetricFamily("relay_budget_usd", "", labels=["team", "window"])
    budget.add_metric(["a", "day"], 5)
    budget.add_metric(["b", "day"], 5)
    budget.add_metric(["a", "month"], 0)  # a window without a budget
    dropped = CounterMetricFamily("relay_log_lines_dropped", "")
    dropped.add_metric([], 0)
    supervisor.log_lines_dropped = 7
    shaped = {f.name: f.samples for f in supervisor._shape([up, budget, dropped])}
    assert [s.labels["backend"] for s in shaped["relay_backend_up"]] == ["good"]
    assert [(s.labels["team"], s.labels["window"]) for s in shaped["relay_budget_usd"]] == [
        ("a", "day")
    ]
    assert [s.value for s in shaped["relay_log_lines_dropped"]] == [7]
    supervisor._metrics_dir.cleanup()
    supervisor._config_dir.cleanup()


def test_the_supervisor_takes_a_port_its_last_sessions_left_in_time_wait():
    """A relay that closed its sessions leaves their server side in TIME_WAIT for a minute;
    `--workers N` started on that port then failed ("Address already in use") where one
    process started, as asyncio's listener reuses the address."""
    import socket

    from relay.ops.workers import _reserve_port

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server closes first: its side of the connection waits
    client.recv(1)
    client.close()
    listener.close()
    with _reserve_port("127.0.0.1", port) as reserved:
        assert reserved == port


def test_the_supervisor_refuses_a_port_another_relay_listens_on():
    """With SO_REUSEPORT alone, a second `--workers` relay on the port joined it and took
    half the connections."""
    import socket

    import pytest

    from relay.errors import StartupError
    from relay.ops.workers import _reserve_port

    with _reserve_port("127.0.0.1", 0) as port:
        other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", port))
        other.listen()  # the first relay's workers
        try:
            with pytest.raises(StartupError, match="the port is in use by another process"):
                _reserve_port("127.0.0.1", port)
        finally:
            other.close()


async def test_a_worker_line_past_the_limit_is_dropped_and_the_lines_after_it_pass(monkeypatch):
    """readline's error on a line over the reader's limit ended the supervisor's reading of
    that worker: every later line of it was lost while it went on serving."""
    from structlog.testing import capture_logs

    from relay.ops import workers

    written: list[bytes] = []
    monkeypatch.setattr(workers, "write_log_line", written.append)
    stream = asyncio.StreamReader(limit=64)
    stream.feed_data(b'{"event":"a"}\n' + b"x" * 100)
    with capture_logs() as logs:
        reading = asyncio.ensure_future(workers.relay_output(stream))
        stream.feed_data(b"x" * 300)  # the long line arrives in pieces
        stream.feed_data(b"x\n" + b'{"event":"b"}\n' + b"y" * 200 + b'\n{"event":"c"}')
        stream.feed_eof()
        await reading
    assert written == [b'{"event":"a"}\n', b'{"event":"b"}\n', b'{"event":"c"}']
    assert [e["event"] for e in logs] == ["worker_log_line_too_long"] * 2


def test_a_worker_counts_as_running_once_it_listens_and_while_it_lives():
    """A worker restarted onto a broken config runs half a second before it exits: counted
    as running then, each attempt could reset RelayWorkersDown's `for:`."""
    from types import SimpleNamespace

    from relay.ops.workers import Worker

    process = SimpleNamespace(returncode=None, pid=1)
    worker = Worker(0, process, 0.0)  # type: ignore[arg-type]
    assert not worker.running  # started, not listening yet
    worker.listening = True
    assert worker.running
    process.returncode = 2
    assert not worker.running


def watched_config(tmp_path, *, unresponsive_seconds: float) -> tuple[Any, int]:
    """The workers' config, with a short `worker_unresponsive_seconds`; and its metrics port."""
    metrics_port = free_port()
    config = tmp_path / "relay.toml"
    text = CONFIG.format(metrics_port=metrics_port, key=hash_key(KEY))
    setting = f"[server]\nworker_unresponsive_seconds = {unresponsive_seconds}\n"
    config.write_text(text.replace("[server]\n", setting))
    return config, metrics_port


async def test_a_worker_whose_loop_stops_beating_is_killed_and_restarted(tmp_path):
    """A stopped worker kept its share of the port: half the connections hung, its frozen
    metrics said all was well, and nothing alerted. Its heartbeat stops: the supervisor
    kills it, and starts another."""
    config, metrics_port = watched_config(tmp_path, unresponsive_seconds=4)
    lines: asyncio.Queue = asyncio.Queue()
    env = {"RELAY_SIMULATOR_KEY": "sim"}
    async with relay_process(config, env, "--workers", "2", lines=lines) as (supervisor, _):
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                ready = [s.labels["pid"] for s in (await scrape(http, metrics_port))["relay_ready"]]
                if len(ready) == 2:
                    break
                await asyncio.sleep(0.05)  # workers write their gauges every second: poll
            victim = int(ready[0])
            os.kill(victim, signal.SIGSTOP)
            async with asyncio.timeout(30):
                while (line := await lines.get()).get("event") != "worker_unresponsive":
                    pass
            assert line["pid"] == victim and line["silent_seconds"] > 4
            async with asyncio.timeout(30):
                while (line := await lines.get()).get("event") != "worker_started":
                    pass
                while (line := await lines.get()).get("event") != "relay_listening":
                    pass  # the new worker's
        supervisor.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(supervisor.wait(), timeout=15) == 0


async def test_a_stalled_supervisor_does_not_take_its_workers_for_hung(tmp_path):
    """Paused itself (its workers beating all along, the beats unread in the pipes), the
    supervisor killed every worker once it ran again: every live session dropped."""
    config, metrics_port = watched_config(tmp_path, unresponsive_seconds=4)
    lines: asyncio.Queue = asyncio.Queue()
    env = {"RELAY_SIMULATOR_KEY": "sim"}
    async with relay_process(config, env, "--workers", "2", lines=lines) as (supervisor, _):
        supervisor.send_signal(signal.SIGSTOP)
        await asyncio.sleep(6)  # the supervisor stopped past the limit, its workers beating
        supervisor.send_signal(signal.SIGCONT)
        await asyncio.sleep(3)  # a negative check: a kill would come within a second or two
        seen = []
        while not lines.empty():
            seen.append(lines.get_nowait().get("event"))
        assert "worker_unresponsive" not in seen and "worker_exited" not in seen
        supervisor.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(supervisor.wait(), timeout=15) == 0


async def test_a_restarted_worker_starts_with_the_config_in_force(tmp_path):
    """A worker the supervisor restarted read the file on disk: a team removed there but
    not reloaded was refused on that worker's share of connections (3-6 of 8 handshakes),
    and nothing said so. It starts with the config the supervisor last loaded; a reload
    then applies the file everywhere."""
    metrics_port = free_port()
    other = "rk-workers-other-team"
    config = tmp_path / "relay.toml"
    text = CONFIG.format(metrics_port=metrics_port, key=hash_key(KEY))
    team_b = f'[teams.b]\nkeys = ["{hash_key(other)}"]\ndeployments = ["gpt-realtime"]\n'
    config.write_text(text + team_b)
    env = {"RELAY_SIMULATOR_KEY": "sim"}

    async def handshakes(base: str) -> list[int]:
        statuses = []
        for _ in range(8):
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as own:
                try:
                    ws = await own.ws_connect(
                        f"{base}/openai/v1/realtime?model=gpt-realtime", headers={"api-key": other}
                    )
                except aiohttp.WSServerHandshakeError as exc:
                    statuses.append(exc.status)
                    continue
                statuses.append(101)
                await ws.close()
        return statuses

    lines: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    async with relay_process(config, env, "--workers", "2", lines=lines) as (supervisor, base):
        assert await handshakes(base) == [101] * 8
        config.write_text(text)  # team b removed, not reloaded
        while not lines.empty():
            lines.get_nowait()
        os.kill(_worker_pids(supervisor.pid)[0], signal.SIGKILL)
        exited = None
        while True:  # the restarted worker listens
            line = await asyncio.wait_for(lines.get(), timeout=30)
            if line["event"] == "worker_exited":
                exited = line["worker"]
            elif line["event"] == "relay_listening" and exited is not None:
                if line.get("worker") == exited:
                    break
        assert await handshakes(base) == [101] * 8
        supervisor.send_signal(signal.SIGHUP)
        applied = 0
        while applied < 2:
            line = await asyncio.wait_for(lines.get(), timeout=20)
            applied += line["event"] == "config_reloaded"
        assert await handshakes(base) == [401] * 8
        supervisor.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(supervisor.wait(), timeout=15) == 0


async def test_a_worker_hung_while_starting_is_killed_and_started_again(tmp_path):
    """The heartbeat watched a worker only once it listened: one that hung while starting
    (here stopped before it could listen) was never replaced, its share of the workers
    missing until someone noticed `RelayWorkersDown`."""
    config, _ = watched_config(tmp_path, unresponsive_seconds=2)
    lines: asyncio.Queue = asyncio.Queue()
    env = {"RELAY_SIMULATOR_KEY": "sim"}
    async with relay_process(config, env, "--workers", "2", lines=lines) as (supervisor, _):
        while not lines.empty():
            lines.get_nowait()
        os.kill(_worker_pids(supervisor.pid)[0], signal.SIGKILL)
        async with asyncio.timeout(30):
            while (line := await lines.get()).get("event") != "worker_started":
                pass
        starting = line["pid"]
        os.kill(starting, signal.SIGSTOP)  # before it listens: Python takes longer to start
        async with asyncio.timeout(40):
            while (line := await lines.get()).get("event") != "worker_unresponsive":
                assert line.get("event") != "relay_listening" or line.get("worker") is None
            assert line["pid"] == starting and line["listening"] is False
            while (line := await lines.get()).get("event") != "relay_listening":
                pass  # its replacement
        supervisor.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(supervisor.wait(), timeout=15) == 0
