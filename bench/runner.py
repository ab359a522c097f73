"""One measured point: a path, a scenario and a session count.

The path is started fresh; the generators connect every session and say READY; all are
told GO at one instant t0; the measured window is [t0 + warm-up, t0 + warm-up + duration].
The orchestrator reads the CPU of the path's processes, the upstream, the generators and the
whole machine at both ends of the window, and samples RSS through it. Every wait is bounded.

With ``series_every_s`` (the soak), it also records the path's RSS, open file descriptors
and CPU every that many seconds, and the point gets a time series (``series``: frames per
second, cores and CPU per frame between samples) and per-minute round-trip percentiles
(``by_minute``), both split by the frames' send instants.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.loadgen import LoadSpec, send_times_path
from bench.measure import (
    CpuSnapshot,
    ProcessTree,
    load_samples,
    load_timed_samples,
    machine_busy_seconds,
    percentiles_ms,
    self_cpu_seconds,
)
from bench.paths import REPO_DIR, BenchPath, Endpoint
from bench.scenarios import Scenario

PERCENTILES = (50.0, 99.0, 99.9)
RSS_SAMPLE_S = 0.25
SECOND_NS = 1_000_000_000
GO_LEAD_S = 0.3
QUIET_SAMPLE_S = 0.3
# A session keeps real time when its round trips stay under this many frame intervals at
# p99, no frame of it left a whole interval late, and every frame it sent was echoed.
REALTIME_RTT_INTERVALS = 2.0
# The per-minute percentiles of a long window (the soak).
MINUTE_S = 60.0
# A series' last sample is taken this long before the window's end.
SERIES_END_MARGIN_NS = 100_000_000
# Called at the window's start with the path's pids and the window's length (a profiler).
WindowHook = Callable[[list[int], float], None]


@dataclass(frozen=True, slots=True)
class SeriesSpec:
    """Sample the path every ``every_s`` through the window (the soak); ``on_sample`` sees
    each sample as it is taken: ``t_s`` into the window, ``rss_bytes``, ``open_fds``."""

    every_s: float
    on_sample: Callable[[dict[str, Any]], None] | None = None


@dataclass(slots=True)
class QuietGate:
    """Other work shares this machine (test runs of other sessions, here): before each
    point, wait until processes other than the bench's use under ``cores``, at most
    ``per_point_s`` per point and ``budget_s`` for the whole run."""

    cores: float = 0.25
    per_point_s: float = 20.0
    budget_s: float = 120.0
    waited_s: float = 0.0

    def wait(self, upstream: ProcessTree) -> float:
        """Wait (bounded); the cores other processes used in the last sample."""
        began = time.monotonic()
        limit = max(0.0, min(self.per_point_s, self.budget_s - self.waited_s))
        while True:
            machine, ours = machine_busy_seconds()[0], upstream.cpu_seconds()
            time.sleep(QUIET_SAMPLE_S)
            machine = machine_busy_seconds()[0] - machine
            others = (machine - (upstream.cpu_seconds() - ours)) / QUIET_SAMPLE_S
            if others < self.cores or time.monotonic() - began >= limit:
                self.waited_s += time.monotonic() - began
                return others


@dataclass(frozen=True, slots=True)
class Context:
    work: Path
    upstream: Endpoint
    upstream_tree: ProcessTree
    quiet: QuietGate = field(default_factory=QuietGate)
    sessions_per_generator: int = 500
    connect_timeout_s: float = 60.0
    # --pin: the path on CPU 0, the generators and the echo upstream on the others, so the
    # path never waits for a core behind the harness (the stall-episode control).
    pin: bool = False


class GeneratorProcess:
    """One `bench.loadgen` process and its stdin/stdout conversation."""

    def __init__(self, spec: LoadSpec, spec_path: Path, log: Path) -> None:
        self.spec = spec
        spec_path.write_bytes(orjson.dumps(asdict(spec)))
        self.log = log
        with log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.loadgen", str(spec_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=REPO_DIR,
            )
        self._buf = b""

    def expect(self, word: str, deadline: float) -> list[str]:
        """The words of the next line, which must start with ``word``."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"load generator: no {word} in time\n{self.tail()}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise RuntimeError(f"load generator exited before {word}\n{self.tail()}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        words = line.decode().split()
        if not words or words[0] != word:
            raise RuntimeError(f"load generator said {line!r}, expected {word}")
        return words[1:]

    def go(self, t0: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"GO {t0}\n".encode())
        self.proc.stdin.flush()

    def results(self) -> dict[str, Any]:
        data: dict[str, Any] = orjson.loads(Path(self.spec.result_path).read_bytes())
        return data

    def tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-10:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def split(total: int, per_process: int) -> list[int]:
    """Sessions per generator process: as even as possible, at most ``per_process`` each."""
    count = max(1, -(-total // per_process))
    return [total // count + (1 if i < total % count else 0) for i in range(count)]


def run_point(
    path: BenchPath,
    scenario: Scenario,
    sessions: int,
    ctx: Context,
    *,
    during_window: WindowHook | None = None,
    series: SeriesSpec | None = None,
    per_second: bool = False,
) -> dict[str, Any]:
    """Measure one point; ``during_window(pids, seconds)`` runs at the window's start;
    ``series`` adds a time series of the path's memory, fds and CPU, and the round trips'
    p99 of each second (which ``per_second`` adds alone)."""
    timed = series is not None or per_second
    background = ctx.quiet.wait(ctx.upstream_tree)
    work = ctx.work / f"{scenario.name.replace(' ', '-')}-{sessions}-{path.name}"
    work.mkdir(parents=True, exist_ok=True)
    endpoint = path.start(ctx.upstream, work)
    generators: list[GeneratorProcess] = []
    sent_at = rtts = np.zeros(0, dtype=np.int64)
    try:
        tree = ProcessTree(path.pids()) if path.pids() else None
        if ctx.pin and tree is not None:
            pin(tree, ctx.upstream_tree)
        time.sleep(0.2)
        rss_idle = tree.rss_bytes() if tree else 0
        generators = _start_generators(endpoint, scenario, sessions, ctx, work)
        deadline = time.monotonic() + ctx.connect_timeout_s + 15
        connected = sum(int(g.expect("READY", deadline)[0]) for g in generators)
        t0 = time.monotonic_ns() + int(GO_LEAD_S * 1e9)
        for generator in generators:
            generator.go(t0)
        gen_tree = ProcessTree([g.proc.pid for g in generators])
        if ctx.pin:
            pin(None, gen_tree)
        window = _measure_window(t0, scenario, tree, ctx, path, during_window, series, gen_tree)
        deadline = time.monotonic() + 20
        for generator in generators:
            generator.expect("DONE", deadline)
        results = [g.results() for g in generators]
        samples = load_samples([Path(g.spec.samples_path) for g in generators])
        if timed:
            sent_at, rtts = load_timed_samples(
                [
                    (Path(send_times_path(g.spec.samples_path)), Path(g.spec.samples_path))
                    for g in generators
                ]
            )
        peak = max(window["rss_peak"], tree.peak_rss_bytes() if tree else 0)
    finally:
        for generator in generators:
            generator.stop()
        path.stop()
    counts = (sessions, connected)
    point = _figures(path, scenario, tree is not None, counts, results, samples, window)
    point["rss_idle_bytes"] = rss_idle
    point["rss_peak_bytes"] = peak
    point["background_cores_before"] = round(background, 3)
    logged = path.gc_pauses(*window["span_ns"])
    if logged is not None:
        pauses = [ms for _, ms in logged]
        point["gc_pauses"] = {
            "count": len(pauses),
            "max_ms": round(max(pauses, default=0.0), 2),
            "total_ms": round(sum(pauses), 2),
            "by_generation": {str(g): sum(1 for gen, _ in logged if gen == g) for g in (0, 1, 2)},
        }
    if tree is not None and connected and scenario.kind != "setup":
        # RSS per session: the path's growth from idle to loaded, over the sessions; and
        # its highest growth (a large event's copies), over the sessions.
        growth = point["rss_loaded_bytes"] - rss_idle
        point["rss_per_session_kib"] = round(growth / connected / 1024, 1)
        point["peak_growth_per_session_mib"] = round((peak - rss_idle) / connected / 2**20, 2)
    start, end = window["span_ns"]
    if series is not None:
        point["series"] = _series(window["series"], start, sent_at, rtts)
        point["by_minute"] = _by_minute(start, end, sent_at, rtts)
    if timed:
        point["p99_by_second_ms"] = _by_second(start, end, sent_at, rtts)
    if window["sched"]:
        point["sched_by_second"] = _sched_by_second(window["sched"])
    return point


def _series(
    raw: list[dict[str, Any]], start_ns: int, sent_at: np.ndarray, rtts: np.ndarray
) -> list[dict[str, Any]]:
    """The path's samples through the window, each with the rates since the one before:
    frames forwarded per second (appends by send instant, deltas by arrival, as the
    generators saw them), the path's cores and its CPU per forwarded frame, and the cores
    of the generators, of processes outside the bench, and of interrupts."""
    sent_sorted = np.sort(sent_at)
    arrived = np.sort(sent_at + rtts)
    series: list[dict[str, Any]] = []
    for index, sample in enumerate(raw):
        entry = {
            "t_s": round((sample["at_ns"] - start_ns) / 1e9, 2),
            "rss_bytes": sample["rss_bytes"],
            "open_fds": sample["open_fds"],
            "frames_per_s": None,
            "proxy_cores": None,
            "cpu_us_per_frame": None,
            "generator_cores": None,
            "other_cores": None,
            "interrupt_cores": None,
        }
        if index:
            before = raw[index - 1]
            lo, hi = before["at_ns"], sample["at_ns"]
            seconds = (hi - lo) / 1e9
            frames = _count_in(sent_sorted, lo, hi) + _count_in(arrived, lo, hi)
            cpu = sample["cpu_s"] - before["cpu_s"]
            entry["frames_per_s"] = round(frames / seconds, 1) if seconds > 0 else None
            entry["proxy_cores"] = round(cpu / seconds, 3) if seconds > 0 else None
            entry["cpu_us_per_frame"] = round(cpu / frames * 1e6, 2) if frames else None
            if seconds > 0:
                gens = sample["generators_s"] - before["generators_s"]
                bench = sample["bench_s"] - before["bench_s"]
                machine = sample["machine_s"] - before["machine_s"]
                others = max(0.0, machine - cpu - gens - bench)
                irq = sample["interrupts_s"] - before["interrupts_s"]
                entry["generator_cores"] = round(gens / seconds, 3)
                entry["other_cores"] = round(others / seconds, 3)
                entry["interrupt_cores"] = round(irq / seconds, 3)
        series.append(entry)
    return series


def _count_in(ordered: np.ndarray, lo: int, hi: int) -> int:
    """How many values of the sorted ``ordered`` are in [lo, hi)."""
    return int(np.searchsorted(ordered, hi, "left") - np.searchsorted(ordered, lo, "left"))


def _by_minute(
    start_ns: int, end_ns: int, sent_at: np.ndarray, rtts: np.ndarray
) -> list[dict[str, Any]]:
    """Round-trip percentiles of the frames sent in each minute of the window (a last
    partial minute only when it holds at least half a minute)."""
    return [
        {"minute": index + 1, **window}
        for index, window in enumerate(_by_window(start_ns, end_ns, sent_at, rtts, MINUTE_S))
    ]


def _by_second(
    start_ns: int, end_ns: int, sent_at: np.ndarray, rtts: np.ndarray
) -> list[float | None]:
    """The round-trip p99 (ms) of the frames sent in each second of the window: a stall
    episode shows as a run of high seconds that a whole-window p99 averages away."""
    return [w["rtt_ms"]["p99"] for w in _by_window(start_ns, end_ns, sent_at, rtts, 1.0)]


def _by_window(
    start_ns: int, end_ns: int, sent_at: np.ndarray, rtts: np.ndarray, window_s: float
) -> list[dict[str, Any]]:
    window_ns = int(window_s * 1e9)
    order = np.argsort(sent_at, kind="stable")
    sent_at, rtts = sent_at[order], rtts[order]
    windows: list[dict[str, Any]] = []
    lo = start_ns
    while lo < end_ns:
        hi = min(lo + window_ns, end_ns)
        if hi - lo < window_ns // 2 and windows:
            break
        first, last = np.searchsorted(sent_at, (lo, hi), "left")
        chosen = rtts[first:last]
        windows.append(
            {
                "from_s": round((lo - start_ns) / 1e9, 1),
                "to_s": round((hi - start_ns) / 1e9, 1),
                "samples": int(chosen.size),
                "rtt_ms": percentiles_ms(chosen, PERCENTILES) | {"max": _max_ms(chosen)},
            }
        )
        lo = hi
    return windows


def _start_generators(
    endpoint: Endpoint, scenario: Scenario, sessions: int, ctx: Context, work: Path
) -> list[GeneratorProcess]:
    generators = []
    for index, count in enumerate(split(sessions, ctx.sessions_per_generator)):
        spec = LoadSpec(
            host=endpoint.host,
            port=endpoint.port,
            path=endpoint.path,
            headers=endpoint.headers,
            sessions=count,
            mode=scenario.mode,
            interval_s=scenario.interval_s,
            window=scenario.window,
            audio_bytes=scenario.audio_bytes,
            warmup_s=scenario.warmup_s,
            duration_s=scenario.duration_s,
            result_path=str(work / f"gen{index}.json"),
            samples_path=str(work / f"gen{index}.rtt"),
            connect_timeout_s=ctx.connect_timeout_s,
            seed=index * 7919 + sessions,
        )
        generators.append(
            GeneratorProcess(spec, work / f"gen{index}.spec.json", work / f"gen{index}.log")
        )
    return generators


def _sleep_until_ns(when: int) -> None:
    time.sleep(max(0.0, (when - time.monotonic_ns()) / 1e9))


def _measure_window(
    t0: int,
    scenario: Scenario,
    tree: ProcessTree | None,
    ctx: Context,
    path: BenchPath,
    during_window: WindowHook | None,
    spec: SeriesSpec | None = None,
    gen_tree: ProcessTree | None = None,
) -> dict[str, Any]:
    start = t0 + int(scenario.warmup_s * 1e9)
    end = start + int(scenario.duration_s * 1e9)
    _sleep_until_ns(start)
    before = CpuSnapshot.take(tree, ctx.upstream_tree)
    series: list[dict[str, Any]] = []

    def sample() -> dict[str, Any]:
        taken = _series_sample(tree, gen_tree, ctx.upstream_tree)
        if spec is not None and spec.on_sample is not None:
            shown = {k: v for k, v in taken.items() if k in ("rss_bytes", "open_fds")}
            spec.on_sample({"t_s": (taken["at_ns"] - start) / 1e9, **shown})
        return taken

    # The series' instants: every `every_s` from the window's start, and a last one just
    # before its end (at the end itself, the generators are already closing sessions).
    instants: list[int] = []
    if spec is not None and tree is not None:
        last = end - SERIES_END_MARGIN_NS
        instants = list(range(start, last, int(spec.every_s * 1e9))) + [last]
    if during_window is not None:
        during_window(path.pids(), scenario.duration_s)
    # With a series, the scheduler's accounting at every whole second of the window: a
    # stalled second is told apart as the path's own work or its wait for a core.
    seconds = list(range(start, end, SECOND_NS)) if spec is not None and tree is not None else []
    sched: list[tuple[int, ...]] = []
    peak = 0
    while time.monotonic_ns() < end:
        if tree is not None:
            peak = max(peak, tree.rss_bytes())
        if seconds and tree is not None and time.monotonic_ns() >= seconds[0]:
            sched.append(_sched_sample(tree, gen_tree, ctx.upstream_tree))
            seconds.pop(0)
        if instants and time.monotonic_ns() >= instants[0]:
            series.append(sample())
            instants.pop(0)
        wake = min(time.monotonic_ns() + int(RSS_SAMPLE_S * 1e9), end, *instants[:1], *seconds[:1])
        _sleep_until_ns(wake)
    if sched and tree is not None:
        sched.append(_sched_sample(tree, gen_tree, ctx.upstream_tree))
    after = CpuSnapshot.take(tree, ctx.upstream_tree)
    rss_loaded = tree.rss_bytes() if tree else 0
    return {
        "before": before,
        "after": after,
        "rss_loaded": rss_loaded,
        "rss_peak": peak,
        "span_ns": (start, end),
        "series": series,
        "sched": sched,
    }


def pin(path: ProcessTree | None, harness: ProcessTree) -> None:
    """The path's processes (every thread) on CPU 0; the harness's on the other CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("bench: --pin needs at least 2 CPUs")
    for tree, where in ((path, {cpus[0]}), (harness, set(cpus[1:]))):
        for proc in tree.processes() if tree is not None else []:
            for thread in proc.threads():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(thread.id, where)


def _sched_sample(
    tree: ProcessTree, gen_tree: ProcessTree | None, upstream: ProcessTree
) -> tuple[int, ...]:
    """(instant, then on-CPU and waiting ns of the path, the generators, the upstream)."""
    gens = gen_tree.schedstat_ns() if gen_tree is not None else (0, 0)
    return (time.monotonic_ns(), *tree.schedstat_ns(), *gens, *upstream.schedstat_ns())


def _sched_by_second(sched: list[tuple[int, ...]]) -> list[dict[str, float]]:
    """Per second of the window: milliseconds each process group ran on a CPU, and waited
    for one while runnable (the kernel's run-queue delay)."""
    seconds = []
    for before, after in itertools.pairwise(sched):
        d = [(a - b) / 1e6 for a, b in zip(after[1:], before[1:], strict=True)]
        seconds.append(
            {
                "ms": round((after[0] - before[0]) / 1e6, 1),
                "path_run_ms": round(d[0], 1),
                "path_wait_ms": round(d[1], 1),
                "generators_run_ms": round(d[2], 1),
                "generators_wait_ms": round(d[3], 1),
                "upstream_run_ms": round(d[4], 1),
                "upstream_wait_ms": round(d[5], 1),
            }
        )
    return seconds


def _series_sample(
    tree: ProcessTree | None, gen_tree: ProcessTree | None, upstream: ProcessTree
) -> dict[str, Any]:
    """The path's memory, fds and CPU now; and the CPU of the machine, its interrupts, the
    generators and the rest of the bench, to tell other work on the machine apart."""
    if tree is None:
        raise ValueError("a series needs a path with processes")
    machine, interrupts = machine_busy_seconds()
    return {
        "at_ns": time.monotonic_ns(),
        "rss_bytes": tree.rss_bytes(),
        "open_fds": tree.open_fds(),
        "cpu_s": tree.cpu_seconds(),
        "machine_s": machine,
        "interrupts_s": interrupts,
        "generators_s": gen_tree.cpu_seconds() if gen_tree is not None else 0.0,
        "bench_s": upstream.cpu_seconds() + self_cpu_seconds(),
    }


def _session_keeps_real_time(summary: list[int], interval_ns: float) -> bool:
    sent, echoed, p99, _max_late, late_frames, lost = summary
    return (
        sent > 0
        and echoed == sent
        and not lost
        and late_frames == 0
        and p99 <= REALTIME_RTT_INTERVALS * interval_ns
    )


def _figures(
    path: BenchPath,
    scenario: Scenario,
    has_proxy: bool,
    counts: tuple[int, int],
    results: list[dict[str, Any]],
    samples: np.ndarray,
    window: dict[str, Any],
) -> dict[str, Any]:
    sessions, connected = counts
    duration = scenario.duration_s
    before: CpuSnapshot = window["before"]
    after: CpuSnapshot = window["after"]
    sent = sum(r["sent_window"] for r in results)
    received = sum(r["received_window"] for r in results)
    forwarded = sent + received
    path_cpu = after.path - before.path
    upstream_cpu = after.upstream - before.upstream
    gen_cpu = sum(r["cpu_window_user_s"] + r["cpu_window_system_s"] for r in results)
    machine = after.machine - before.machine
    ours = path_cpu + upstream_cpu + gen_cpu + (after.orchestrator - before.orchestrator)
    summaries = [s for r in results for s in r["sessions"]]
    interval_ns = scenario.interval_s * 1e9
    return {
        "path": path.name,
        "scenario": scenario.name,
        "kind": scenario.kind,
        "sessions": sessions,
        "connected": connected,
        "generators": len(results),
        "connect_errors": _merge_counts(r["connect_errors"] for r in results),
        "error_events": sum(r["error_events"] for r in results),
        # Events the generators did not take for echoes (a path that reshapes them shows).
        "other_events": sum(r["other_events"] for r in results),
        "unmatched_echoes": sum(r["unmatched_echoes"] for r in results),
        "rtt_ms": percentiles_ms(samples, PERCENTILES) | {"max": _max_ms(samples)},
        "samples": int(samples.size),
        "frames_in_per_s": round(sent / duration, 1),
        "frames_out_per_s": round(received / duration, 1),
        "append_bytes": 4 * -(-scenario.audio_bytes // 3) + 85,
        "proxy_cpu_s": round(path_cpu, 4) if has_proxy else None,
        "cpu_us_per_frame": round(path_cpu / forwarded * 1e6, 2)
        if has_proxy and forwarded
        else None,
        "cpu_s_per_1000_frames": round(path_cpu / forwarded * 1000, 5)
        if has_proxy and forwarded
        else None,
        "rss_loaded_bytes": window["rss_loaded"],
        "rss_per_session_kib": None,
        "realtime_sessions": sum(_session_keeps_real_time(s, interval_ns) for s in summaries)
        if scenario.realtime
        else None,
        "late_frames": sum(s[4] for s in summaries),
        "max_send_lateness_ms": round(max((s[3] for s in summaries), default=0) / 1e6, 3),
        "generator_cores": round(gen_cpu / duration, 3),
        "upstream_cores": round(upstream_cpu / duration, 3),
        "proxy_cores": round(path_cpu / duration, 3) if has_proxy else None,
        # Share of the proxy's CPU spent in the kernel (mostly loopback TCP send/receive).
        "proxy_system_share": round((after.path_system - before.path_system) / path_cpu, 3)
        if has_proxy and path_cpu
        else None,
        "other_cores": round(max(0.0, machine - ours) / duration, 3),
        "interrupt_cores": round((after.interrupts - before.interrupts) / duration, 3),
    } | (
        _setup_figures(has_proxy, path_cpu, received, duration) if scenario.kind == "setup" else {}
    )


def _setup_figures(
    has_proxy: bool, path_cpu: float, setups: int, duration: float
) -> dict[str, Any]:
    """The set-up scenario's own figures: set-ups completed per second in the window, and
    the path's CPU per set-up (its CPU in the window over those set-ups). Its `rtt_ms` are
    set-up times, from before the TCP connect to `session.created`; in/s and out/s are
    set-ups started and completed per second."""
    return {
        "setups_per_s": round(setups / duration, 1),
        "cpu_ms_per_setup": round(path_cpu / setups * 1000, 3) if has_proxy and setups else None,
        "cpu_us_per_frame": None,
        "cpu_s_per_1000_frames": None,
    }


def _merge_counts(parts: Any) -> dict[str, int]:
    merged: dict[str, int] = {}
    for part in parts:
        for key, value in part.items():
            merged[key] = merged.get(key, 0) + value
    return merged


def _max_ms(samples: np.ndarray) -> float | None:
    return round(float(samples.max()) / 1e6, 3) if samples.size else None
