"""What the orchestrator measures from outside: process CPU and memory, machine CPU,
percentiles of the round-trip samples the generators write.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil  # type: ignore[import-untyped]  # no stubs installed


class ProcessTree:
    """A process and its descendants (nginx's master and worker, future relay workers)."""

    def __init__(self, pids: Iterable[int]) -> None:
        self.roots = [psutil.Process(pid) for pid in pids]

    def processes(self) -> list[psutil.Process]:
        found: list[psutil.Process] = []
        for root in self.roots:
            try:
                found += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        return found

    def cpu_seconds(self) -> float:
        return sum(self.cpu_split())

    def cpu_split(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the live processes of the tree."""
        user = system = 0.0
        for proc in self.processes():
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            user += times.user
            system += times.system
        return user, system

    def rss_bytes(self) -> int:
        total = 0
        for proc in self.processes():
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def open_fds(self) -> int:
        """File descriptors open in the live processes of the tree."""
        total = 0
        for proc in self.processes():
            try:
                total += proc.num_fds()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return int(total)

    def schedstat_ns(self) -> tuple[int, int]:
        """(on a CPU, runnable but waiting for one) nanoseconds of every thread of the tree,
        from /proc/<pid>/task/<tid>/schedstat (the scheduler's own accounting); (0, 0)
        where the kernel does not keep it."""
        on_cpu = waiting = 0
        for proc in self.processes():
            try:
                tasks = list(Path(f"/proc/{proc.pid}/task").iterdir())
            except OSError:
                continue
            for task in tasks:
                try:
                    ran, waited, _ = (task / "schedstat").read_text().split()
                except (OSError, ValueError):
                    continue
                on_cpu += int(ran)
                waiting += int(waited)
        return on_cpu, waiting

    def peak_rss_bytes(self) -> int:
        """Sum of each process's high-water RSS (VmHWM) since it started."""
        total = 0
        for proc in self.processes():
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        return total


def machine_busy_seconds() -> tuple[float, float]:
    """CPU seconds all cores spent since boot: in processes (user, nice, system), and in
    interrupts (irq, softirq: on loopback, much of TCP's receive work lands there, charged
    to no process)."""
    times = psutil.cpu_times()
    in_processes = times.user + times.nice + times.system
    in_interrupts = getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)
    return float(in_processes), float(in_interrupts)


def self_cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """CPU seconds used so far by the path's processes, the upstream, the machine's
    processes and interrupts, and the orchestrator."""

    path: float
    path_system: float
    upstream: float
    machine: float
    interrupts: float
    orchestrator: float

    @classmethod
    def take(cls, path: ProcessTree | None, upstream: ProcessTree) -> CpuSnapshot:
        machine, interrupts = machine_busy_seconds()
        user, system = path.cpu_split() if path is not None else (0.0, 0.0)
        return cls(
            path=user + system,
            path_system=system,
            upstream=upstream.cpu_seconds(),
            machine=machine,
            interrupts=interrupts,
            orchestrator=self_cpu_seconds(),
        )


def load_samples(paths: Sequence[Path]) -> np.ndarray:
    """Round trips in nanoseconds, as int64, from the generators' sample files."""
    parts = [np.fromfile(path, dtype=np.int64) for path in paths if path.exists()]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def load_timed_samples(pairs: Sequence[tuple[Path, Path]]) -> tuple[np.ndarray, np.ndarray]:
    """(send instants, round trips), both int64 ns and in the same order, from pairs of
    (send-instant file, round-trip file) the generators write."""
    sent, rtts = [], []
    for times, samples in pairs:
        if times.exists() and samples.exists():
            sent.append(np.fromfile(times, dtype=np.int64))
            rtts.append(np.fromfile(samples, dtype=np.int64))
    if not rtts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    return np.concatenate(sent), np.concatenate(rtts)


def percentiles_ms(samples_ns: np.ndarray, points: Sequence[float]) -> dict[str, float | None]:
    if samples_ns.size == 0:
        return {f"p{p:g}": None for p in points}
    values = np.percentile(samples_ns, points) / 1e6
    return {f"p{p:g}": round(float(v), 4) for p, v in zip(points, values, strict=True)}
