"""Log lines written by a thread of their own: a log reader that stops reading never stops
the relay.

The relay logs to stdout, which is a pipe to a log shipper, journald or a container runtime.
Written from the event loop, a line blocks the whole process once that pipe is full: with its
reader stuck, the relay froze after about 44 sessions (64 KiB of lines), every live session's
audio with it, and /healthz stopped answering. Here the loop only appends a line to a bounded
buffer; a thread writes out what gathered over `FLUSH_INTERVAL_SECONDS` (sooner when much is
waiting), blocking there instead. Past `MAX_PENDING_BYTES` new
lines are dropped and counted (`relay_log_lines_dropped_total`), and once lines flow again a
`log_lines_dropped` line says how many.

Lines are written in batches of whole lines of at most `BATCH_BYTES`; a longer line on its
own. This process is its stdout's only writer (workers send their lines through the
supervisor), so a batch need not fit a pipe's atomic `PIPE_BUF`. Batches are large because
each write costs the thread the GIL back: with the loop busy it waits up to the switch
interval (5 ms) each time, and 4 KiB batches let a keyless flood of 404s crowd out other
sessions' lines (dropped, with the disk idle).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import BinaryIO, TextIO

import structlog

# What a stuck reader may cost in memory before lines are dropped.
MAX_PENDING_BYTES = 8 * 1024 * 1024
BATCH_BYTES = 256 * 1024
# How long an exiting process waits for its last lines to be written.
FLUSH_TIMEOUT_SECONDS = 5.0
# The thread writes the lines of 0.1 s at once, from the first one's arrival, or as soon as
# this much waits; with none, it sleeps. Woken for each line, it cost a set-up 0.24 ms of CPU
# for its two lines (a futex wake, a thread switch and a handover of the GIL each), 17 % of
# all of it; a line now waits up to 0.1 s instead.
FLUSH_INTERVAL_SECONDS = 0.1
WAKE_BYTES = 16 * 1024

_log = structlog.get_logger("relay.logs")


class LogWriter:
    """A binary stream for log lines (structlog's `BytesLogger` writes here): `write` never
    blocks on the output."""

    def __init__(self, stream: BinaryIO, *, max_pending: int = MAX_PENDING_BYTES) -> None:
        self._stream = stream
        self._max_pending = max_pending
        self._lines: deque[bytes] = deque()
        self._pending = 0
        self._dropped = 0  # since the last `log_lines_dropped` line
        self._lock = threading.Lock()
        self._wake = threading.Event()  # lines are waiting
        self._hurry = threading.Event()  # write them now, not after gathering more
        self._idle = threading.Event()  # set while nothing is pending
        self._idle.set()
        self.on_drop: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name="relay log writer", daemon=True)
        self._thread.start()

    def retarget(self, stream: BinaryIO) -> None:
        """Write to ``stream`` from now on (logging configured again)."""
        with self._lock:
            self._stream = stream

    def write(self, line: bytes) -> int:
        with self._lock:
            pending = self._pending
            if pending + len(line) > self._max_pending:
                self._dropped += 1
                dropped = True
            else:
                self._lines.append(line)
                self._pending = pending + len(line)
                if self._idle.is_set():  # a plain read; clear() and set() take a lock each
                    self._idle.clear()
                dropped = False
        if dropped:
            if self.on_drop is not None:
                self.on_drop()
        elif not pending:  # the first line since the last write: the thread is asleep
            self._wake.set()
        elif pending >= WAKE_BYTES and not self._hurry.is_set():
            self._hurry.set()
        return len(line)

    def flush(self) -> None:
        """Nothing: lines are written by the thread (see `wait_written`)."""

    def wait_written(self, timeout: float = FLUSH_TIMEOUT_SECONDS) -> bool:
        """Wait until every pending line is written (at exit); False if that took longer than
        ``timeout`` (the reader is stuck: what is left is lost with the process)."""
        self._hurry.set()
        self._wake.set()
        return self._idle.wait(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._hurry.wait(FLUSH_INTERVAL_SECONDS)  # let the lines of the next 0.1 s join
            self._hurry.clear()
            self._wake.clear()  # before taking lines: a first line added meanwhile wakes it
            self._drain()

    def _drain(self) -> None:
        while True:
            while batch := self._take():
                stream = self._stream
                try:
                    stream.write(batch)
                    stream.flush()
                except (OSError, ValueError):  # the reader is gone, or the stream closed
                    pass
            with self._lock:
                dropped, self._dropped = self._dropped, 0
                if not dropped and not self._lines:
                    self._idle.set()
                    return
            if dropped:  # its line is written by the next pass
                reason = "log output not read fast enough"
                _log.warning("log_lines_dropped", count=dropped, reason=reason)

    def _take(self) -> bytes:
        """The next batch: whole lines, at most BATCH_BYTES unless one line is longer."""
        with self._lock:
            lines = self._lines
            if not lines:
                return b""
            batch = [lines.popleft()]
            size = len(batch[0])
            while lines and size + len(lines[0]) <= BATCH_BYTES:
                line = lines.popleft()
                batch.append(line)
                size += len(line)
            self._pending -= size
        return b"".join(batch)


class TextLines:
    """A text stream onto a `LogWriter` (the console renderer, the stdlib handler)."""

    def __init__(self, writer: LogWriter) -> None:
        self._writer = writer

    def write(self, text: str) -> int:
        self._writer.write(text.encode("utf-8", "backslashreplace"))
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def text_stream(writer: LogWriter) -> TextIO:
    return TextLines(writer)  # type: ignore[return-value]
