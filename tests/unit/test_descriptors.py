"""The descriptor limit raised at start-up, and the headroom check: no sockets but the ones
counted."""

import os
import resource
import socket
import subprocess
import sys

import orjson

from relay.ops import descriptors
from relay.ops.descriptors import RESERVED, DescriptorWatch


def _in_a_child(soft: int, hard: int) -> dict[str, int]:
    """`raise_limit` in a process started with the limits ``soft``/``hard``."""
    code = (
        "import orjson, sys; from relay.ops.descriptors import raise_limit; "
        "l = raise_limit(); sys.stdout.buffer.write(orjson.dumps("
        "{'soft': l.soft, 'hard': l.hard, 'was': l.was, 'sessions': l.sessions}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        check=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
    )
    return orjson.loads(done.stdout)


def test_the_soft_limit_is_raised_to_the_hard_one():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = min(hard, 4096) if hard != resource.RLIM_INFINITY else 4096
    limit = _in_a_child(256, ceiling)
    assert limit == {
        "soft": ceiling,
        "hard": ceiling,
        "was": 256,
        "sessions": (ceiling - RESERVED) // 2,
    }


def test_a_hard_limit_of_its_own_is_kept_and_its_sessions_counted():
    assert _in_a_child(200, 200) == {"soft": 200, "hard": 200, "was": 200, "sessions": 68}


def _open_now() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # less the listing's own


def test_exhausted_once_fewer_than_the_reserve_are_free():
    sockets: list[socket.socket] = []
    limit = _open_now() + RESERVED + 3
    watch = DescriptorWatch(limit=lambda: limit)
    try:
        while not watch.exhausted():
            sockets.append(socket.socket())
            assert len(sockets) <= 3
        assert len(sockets) == 3
        sockets.pop().close()
        assert not watch.exhausted()
    finally:
        for s in sockets:
            s.close()


def test_no_limit_and_no_proc_are_never_exhausted(tmp_path):
    assert not DescriptorWatch(limit=lambda: resource.RLIM_INFINITY).exhausted()
    assert not DescriptorWatch(fd_directory=str(tmp_path / "absent"), limit=lambda: 1).exhausted()


def test_without_the_kernels_count_a_listing_is_trusted_briefly(monkeypatch):
    real_stat = os.stat

    def sizeless(path, *args, **kwargs):
        found = real_stat(path, *args, **kwargs)
        if path != "/proc/self/fd":
            return found
        return os.stat_result((*found[:6], 0, *found[7:]))  # st_size is field 6

    monkeypatch.setattr(descriptors.os, "stat", sizeless)
    monkeypatch.setattr(descriptors, "open_descriptors", counted := _Counted())
    now = [0.0]
    limit = counted.value + RESERVED + 6
    watch = DescriptorWatch(limit=lambda: limit, clock=lambda: now[0])
    # Three sessions' worth of headroom: each check lets one in and counts two for it, and
    # the fourth check lists again, exactly, before it refuses.
    assert [watch.exhausted() for _ in range(3)] == [False, False, False]
    assert counted.listings == 1
    counted.value += 6
    assert watch.exhausted()
    assert counted.listings == 2
    # Sessions closed: seen at the next listing, which a refusal always makes.
    counted.value -= 6
    assert not watch.exhausted()
    assert counted.listings == 3
    now[0] += 0.2  # a listing is trusted for 0.1 s
    watch.exhausted()
    assert counted.listings == 4


class _Counted:
    def __init__(self) -> None:
        self.value = 40
        self.listings = 0

    def __call__(self, directory: str) -> int:
        self.listings += 1
        return self.value
