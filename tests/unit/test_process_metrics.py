"""The supervisor's collectors under --workers, on a directory of metric files: no sockets."""

import os

from prometheus_client import CollectorRegistry, generate_latest

from relay.ops.process_metrics import WorkerMetricFiles, WorkerProcesses


def test_a_file_a_worker_has_not_sized_yet_does_not_fail_the_scrape(tmp_path):
    # What a worker killed between creating and sizing its file leaves behind.
    (tmp_path / "gauge_max_4242.db").write_bytes(b"")
    registry = CollectorRegistry()
    WorkerMetricFiles(registry, path=str(tmp_path))
    assert generate_latest(registry) == b""


def test_each_process_by_pid_and_a_vanished_one_skipped():
    collector = WorkerProcesses(lambda: [os.getpid() + 10_000_000])  # no such process
    families = {f.name: f for f in collector.collect()}
    pids = {s.labels["pid"] for s in families["process_resident_memory_bytes"].samples}
    assert pids == {str(os.getpid())}
    assert families["process_cpu_seconds"].samples[0].name == "process_cpu_seconds_total"
