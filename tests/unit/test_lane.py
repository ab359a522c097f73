"""The callbacks' fast paths (relay/session/lane.py): what a lane takes, it judges as the
general path does and counts as the meter does; the C lane gives the reference's answers.

A lane may decline more than the general path would (the frame then goes that way); it may
never take a frame the general path would refuse or read differently.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.session.codec import read_client_frame
from relay.session.lane import APPEND, PyLane
from relay.session.policy import SessionPolicy
from tests.unit import accel_build
from tests.unit.frame_corpus import APPENDS, AUDIO, DELTAS, frames_from

NOT_BUILT = accel_build.NOT_BUILT + "; the Python lane is tested all the same"
try:
    from relay.session._accel import Lane as CLane
except ImportError:
    accel_build.not_built()
    CLane = None  # type: ignore[assignment,misc]

LANES = [PyLane] + ([CLane] if CLane is not None else [])
BOUNDS = [0.0005, 0.001, 0.005, 0.05, float("inf")]
DELTA = "response.output_audio.delta"
DECODED = len(base64.b64decode(AUDIO))


def make(
    lane_type: Any, max_frame: int = -1, max_audio: int = 15 * 1024 * 1024
) -> tuple[Any, dict[str, int], dict[int, int]]:
    """A lane, and the event and chunk tallies it counts into."""
    events: dict[str, int] = {}
    chunks: dict[int, int] = {}
    return lane_type(events, chunks, BOUNDS, max_frame, max_audio), events, chunks


@pytest.mark.parametrize("lane_type", LANES)
def test_an_append_in_a_fixed_layout_is_taken_and_counted(lane_type: Any) -> None:
    lane, events, chunks = make(lane_type)
    frames = [(layout % AUDIO).encode() for layout in APPENDS]
    assert [lane.append(f) for f in frames] == [DECODED] * len(frames)
    assert events == {APPEND: len(frames)} and chunks == {DECODED: len(frames)}
    taken, delays, delay_sum = lane.drain()
    assert taken == sum(map(len, frames)) and delays == [0] * len(BOUNDS) and delay_sum == 0


@pytest.mark.parametrize("lane_type", LANES)
def test_what_a_lane_declines_it_does_not_count(lane_type: Any) -> None:
    events: dict[str, int] = {}
    chunks: dict[int, int] = {}
    frame = (APPENDS[0] % AUDIO).encode()
    declined = [
        (lane_type(events, chunks, BOUNDS, len(frame) - 1, 10**6), frame),  # over max_frame
        (lane_type(events, chunks, BOUNDS, -1, DECODED - 1), frame),  # over max_audio
        (lane_type(events, chunks, BOUNDS, -1, -1), frame),  # appends not allowed
        (lane_type(events, chunks, BOUNDS), (APPENDS[4] % AUDIO).replace("ev_1", "é").encode()),
        (lane_type(events, chunks, BOUNDS), frame.replace(b'"audio"', b'"audio" ')),
        (lane_type(events, chunks, BOUNDS), b'{"type":"input_audio_buffer.commit"}'),
    ]
    for lane, declined_frame in declined:
        assert lane.append(declined_frame) == -1
        assert lane.bytes == 0
    assert events == {} and chunks == {}
    at_the_limits = lane_type(events, chunks, BOUNDS, len(frame), DECODED)
    assert at_the_limits.append(frame) == DECODED
    assert events == {APPEND: 1} and chunks == {DECODED: 1}


@pytest.mark.parametrize("lane_type", LANES)
def test_a_delta_is_taken_unless_the_turns_first_audio_is_awaited(lane_type: Any) -> None:
    events: dict[str, int] = {}
    chunks: dict[int, int] = {}
    lane = lane_type(events, chunks, BOUNDS)
    frame = (DELTAS[0] % AUDIO).encode()
    lane.turn_pending = True
    assert lane.delta(DELTA, frame) == -1 and events == {}
    lane.turn_pending = False
    assert lane.delta(DELTA, frame) == DECODED
    assert lane.delta(DELTA, frame.replace(b'"}', b'" }')) == -1  # not the fixed layout
    assert events == {DELTA: 1} and chunks == {DECODED: 1} and lane.bytes == len(frame)


@pytest.mark.parametrize("lane_type", LANES)
def test_written_frames_delays_fall_in_their_buckets(lane_type: Any) -> None:
    lane = make(lane_type)[0]
    # Each just above a bucket's lower bound: measured up to `spent` later, it stays in it.
    delays = [0.0, 0.00051, 0.00101, 0.00501, 0.0501, 0.00101]
    for _ in range(20):  # a preempted attempt (0.5 ms or more) is measured again
        lane.drain()
        before = time.perf_counter()
        for delay in delays:
            lane.written(before - delay)
        spent = time.perf_counter() - before
        if spent < 0.0005:
            break
    taken, counts, total = lane.drain()
    assert taken == 0 and counts == [1, 1, 2, 1, 1]
    assert sum(delays) <= total <= sum(delays) + len(delays) * spent
    assert lane.drain() == (0, [0] * len(BOUNDS), 0.0)


@pytest.mark.skipif(CLane is None, reason=NOT_BUILT)
def test_the_c_lane_gives_the_references_answers_and_counts() -> None:
    appends, deltas = frames_from(APPENDS), frames_from(DELTAS)
    for max_frame, max_audio in ((-1, 10**6), (1300, 900), (-1, -1), (2000, 0)):
        made = [make(t, max_frame, max_audio) for t in (PyLane, CLane)]
        for lane, _, _ in made:
            lane.turn_pending = max_audio == 900  # a turn's first audio awaited: no delta
        answers = [
            [(lane.append(f), lane.delta(DELTA, f)) for f in appends + deltas]
            for lane, _, _ in made
        ]
        assert answers[0] == answers[1]
        (python, *python_tallies), (c, *c_tallies) = made
        assert python_tallies == c_tallies
        assert python.drain() == c.drain()


@pytest.mark.skipif(CLane is None, reason=NOT_BUILT)
def test_the_c_lanes_clock_is_perf_counter() -> None:
    lane = make(CLane)[0]
    arrived = time.perf_counter()
    lane.written(arrived)
    ceiling = time.perf_counter() - arrived
    _, _, delay = lane.drain()
    assert 0 <= delay <= ceiling


POLICIES = [
    SessionPolicy(),
    SessionPolicy(max_frame_bytes=1300, max_append_audio_bytes=900),
    SessionPolicy(allowed_events=frozenset({"session.update"})),
]


def lane_for(lane_type: Any, policy: SessionPolicy) -> Any:
    """As the pump makes its client lane (pump.Bridge)."""
    max_frame = -1 if policy.max_frame_bytes is None else policy.max_frame_bytes
    max_audio = policy.max_append_audio_bytes if APPEND in policy.allowed_events else -1
    return make(lane_type, max_frame, max_audio)[0]


def judged_alike(lane: Any, policy: SessionPolicy, frame: bytes) -> bool:
    """What the lane takes, the general path reads as the same append and lets through."""
    audio = lane.append(frame)
    if audio < 0:
        return True
    kind, event, measured = read_client_frame(frame)
    return (
        frame.isascii()
        and (kind, event, measured) == (APPEND, None, audio)
        and policy.check(kind, frame, {}, audio, event) is frame
    )


@pytest.mark.parametrize("lane_type", LANES)
@pytest.mark.parametrize("policy", POLICIES)
def test_a_lane_takes_only_what_the_general_path_would_forward_unchanged(
    lane_type: Any, policy: SessionPolicy
) -> None:
    lane = lane_for(lane_type, policy)
    wrong = [f for f in frames_from(APPENDS) if not judged_alike(lane, policy, f)]
    assert wrong[:3] == []


@settings(max_examples=300)
@given(st.binary(max_size=120), st.sampled_from(APPENDS), st.integers(0, 120))
def test_random_bytes_in_an_append_are_judged_alike(noise: bytes, layout: str, at: int) -> None:
    frame = (layout % AUDIO[:60]).encode()
    frame = frame[:at] + noise + frame[at:]
    for lane_type in LANES:
        for policy in POLICIES:
            assert judged_alike(lane_for(lane_type, policy), policy, frame), frame
