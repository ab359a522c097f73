"""A direction's per-frame fast path: the frames it can prove, judged and metered in one call.

At paced load a read holds one frame, and what the relay spent on it, beyond the kernel's
work and aiohttp's reader, was about ten Python calls: read the frame, the policy, the meter,
the delay histogram. Written without them (an experiment, not the relay), a frame cost 0.7x.
A lane does that work in one call, in C (`relay/session/_accel.c`'s `Lane`) where it was
built; `PyLane` here is its reference (`tests/unit/test_lane.py` holds the two to the same
answers and counts) and what runs without it.

What a lane takes, and what it does with it:
- `append(frame)`, client to upstream: an `input_audio_buffer.append` in one of the fixed
  layouts (`codec.fixed_append_size`: no parse needed to know what the upstream will read),
  all ASCII, that the policy allows (the event's and its audio's size): counted as the meter
  counts it. Its decoded audio bytes, or -1 with nothing counted: the frame then goes the
  general way (read, policy, meter), which refuses it or handles its layout.
- `delta(kind, frame)`, upstream to client, for an audio delta's type: a delta whose audio
  runs to the end (`codec.delta_to_the_end`), counted. -1 while `turn_pending` (the meter
  times the turn's first audio itself) or for another layout.
- `written(arrived)`: the frame was written; its relay delay (from ``arrived``, a
  `time.perf_counter()` reading) goes into the direction's delay buckets.
- `drain()`: bytes, delay bucket counts and delay sum since the last drain, for the meter's
  flush (`SessionMeter.flush`).

The lane's type counts and chunk sizes go straight into the meter's own dicts (the flow's
`events` and its chunk histogram's `values`), so a flush sees one tally either way.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Sequence

from relay.session.codec import delta_to_the_end, fixed_append_size

APPEND = "input_audio_buffer.append"


class PyLane:
    """The reference lane (see the module's docstring)."""

    __slots__ = (
        "events", "chunks", "max_frame", "max_audio", "turn_pending", "bytes", "_bounds",
        "_counts", "_sum",
    )  # fmt: skip

    def __init__(
        self,
        events: dict[str, int],
        chunks: dict[int, int],
        bounds: Sequence[float],
        max_frame: int = -1,
        max_audio: int = -1,
    ) -> None:
        self.events = events
        self.chunks = chunks
        # The policy's limits: -1 for no frame limit; an append takes audio up to max_audio
        # (-1: no append is taken, as when the policy does not allow them).
        self.max_frame = max_frame
        self.max_audio = max_audio
        self.turn_pending = False
        self.bytes = 0
        self._bounds = tuple(bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def append(self, frame: bytes) -> int:
        if self.max_frame >= 0 and len(frame) > self.max_frame:
            return -1
        audio = fixed_append_size(frame)
        if audio < 0 or audio > self.max_audio or not frame.isascii():
            return -1
        self._count(APPEND, frame, audio)
        return audio

    def delta(self, kind: str, frame: bytes) -> int:
        if self.turn_pending:
            return -1
        size = delta_to_the_end(frame)
        if size >= 0:
            self._count(kind, frame, size)
        return size

    def written(self, arrived: float) -> None:
        delay = time.perf_counter() - arrived
        self._counts[bisect_left(self._bounds, delay)] += 1
        self._sum += delay

    def drain(self) -> tuple[int, list[int], float]:
        drained = (self.bytes, self._counts, self._sum)
        self.bytes, self._counts, self._sum = 0, [0] * len(self._bounds), 0.0
        return drained

    def _count(self, kind: str, frame: bytes, audio: int) -> None:
        events, chunks = self.events, self.chunks
        events[kind] = events.get(kind, 0) + 1
        chunks[audio] = chunks.get(audio, 0) + 1
        self.bytes += len(frame)


try:
    from relay.session._accel import Lane as Lane
except ImportError:  # pragma: no cover
    Lane = PyLane  # type: ignore[misc,assignment]
