"""process_* by `ProcessStats` against prometheus-client's `ProcessCollector`: no sockets."""

import os
import socket
import subprocess

from prometheus_client import ProcessCollector

from relay.ops import process_collector
from relay.ops.process_collector import ProcessStats


def _by_name(collector):
    return {family.name: family for family in collector.collect()}


def test_the_same_families_as_the_library_and_the_same_steady_values():
    ours, theirs = _by_name(ProcessStats(registry=None)), _by_name(ProcessCollector(registry=None))
    assert ours.keys() == theirs.keys()
    assert {"process_open_fds", "process_max_fds", "process_cpu_seconds"} <= ours.keys()
    for name in ours:
        assert (ours[name].type, ours[name].documentation) == (
            theirs[name].type,
            theirs[name].documentation,
        )
        assert [s.name for s in ours[name].samples] == [s.name for s in theirs[name].samples]
    for name in ("process_max_fds", "process_start_time_seconds"):
        assert ours[name].samples[0].value == theirs[name].samples[0].value


def test_open_descriptors_are_counted_as_the_listing_counts_them_less_its_own():
    sockets = [socket.socket() for _ in range(200)]
    try:
        fds = _by_name(ProcessStats(registry=None))["process_open_fds"].samples[0].value
        listed = _by_name(ProcessCollector(registry=None))["process_open_fds"].samples[0].value
        # The library's listing holds the directory open while it counts: one more entry
        # (and ours too, on a kernel older than 6.2, which gives the directory no size).
        own = 1 if os.stat("/proc/self/fd").st_size else 0
        assert fds == listed - own
        assert fds >= 200
    finally:
        for s in sockets:
            s.close()


def test_a_kernel_that_gives_no_size_is_listed(monkeypatch, tmp_path):
    for name in ("0", "1", "2"):
        (tmp_path / name).write_text("")
    real_stat = os.stat
    monkeypatch.setattr(
        process_collector.os,
        "stat",
        lambda path: os.stat_result((0,) * 10) if path == str(tmp_path) else real_stat(path),
    )
    assert process_collector.open_descriptors(str(tmp_path)) == 3


def test_another_process_and_a_vanished_one():
    with subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL) as child:
        try:
            other = _by_name(ProcessStats(pid=lambda: child.pid, registry=None))
        finally:
            child.kill()
    assert other["process_open_fds"].samples[0].value >= 1
    assert list(ProcessStats(pid=lambda: 2**22 + 7, registry=None).collect()) == []
