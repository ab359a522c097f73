"""The log writer's thread: order, whole-line batches, a stuck output, dropped lines."""

import contextlib
import os
import threading

import orjson
from structlog.testing import capture_logs

from relay.ops.log_writer import BATCH_BYTES, LogWriter


class Recorder:
    """A binary stream that keeps each write, and can be held (a reader that stopped)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.flowing = threading.Event()
        self.flowing.set()
        self.entered = threading.Event()

    def write(self, data: bytes) -> int:
        self.entered.set()
        self.flowing.wait()
        self.writes.append(data)
        return len(data)

    def flush(self) -> None:
        pass


def _line(i: int, size: int = 100) -> bytes:
    return orjson.dumps({"event": "e", "i": i, "pad": "x" * size}) + b"\n"


def test_lines_come_out_in_order_in_whole_line_batches():
    out = Recorder()
    writer = LogWriter(out)  # type: ignore[arg-type]
    lines = [_line(i, size=(i * 37) % 900) for i in range(2000)] + [_line(-1, size=3 * BATCH_BYTES)]
    for line in lines:
        writer.write(line)
    assert writer.wait_written()
    assert b"".join(out.writes) == b"".join(lines)
    for batch in out.writes:
        assert batch.endswith(b"\n")
        assert len(batch) <= BATCH_BYTES or batch.count(b"\n") == 1  # a long line alone
    assert len(out.writes) < len(lines) / 4  # batched, not a write a line


def test_a_stuck_output_neither_blocks_nor_grows_past_the_cap():
    out = Recorder()
    out.flowing.clear()
    dropped: list[int] = []
    writer = LogWriter(out, max_pending=10 * 1024)  # type: ignore[arg-type]
    writer.on_drop = lambda: dropped.append(1)
    writer.write(_line(0))
    assert out.entered.wait(5)  # the thread holds the first line, blocked in write
    for i in range(1, 301):  # about 35 KiB more: the first ~10 KiB are kept
        writer.write(_line(i))
    assert not writer.wait_written(timeout=0.05)
    assert 150 < len(dropped) < 250
    with capture_logs() as logs:
        out.flowing.set()
        assert writer.wait_written()
    kept = b"".join(out.writes).splitlines()
    assert [orjson.loads(line)["i"] for line in kept] == list(range(301 - len(dropped)))
    assert logs == [
        {
            "event": "log_lines_dropped",
            "count": len(dropped),
            "reason": "log output not read fast enough",
            "log_level": "warning",
        }
    ]


def test_a_closed_output_loses_its_lines_not_the_thread():
    read, write = os.pipe()
    stream = os.fdopen(write, "wb")
    writer = LogWriter(stream)
    os.close(read)  # the reader is gone: EPIPE (SIGPIPE is ignored by Python)
    writer.write(_line(1))
    assert writer.wait_written()
    out = Recorder()
    writer.retarget(out)  # type: ignore[arg-type]
    writer.write(_line(2))
    assert writer.wait_written()
    assert out.writes == [_line(2)]
    with contextlib.suppress(BrokenPipeError):  # what the failed write left in its buffer
        stream.close()
