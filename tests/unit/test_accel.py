"""relay/session/_accel.c gives the same answers as its Python references.

The relay runs the C versions where they were built (CI checks they were: .ci/run), and the
Python ones elsewhere; what the relay judges must not depend on which. Each function is
compared on the layouts it answers, on every truncation of them, on near misses (a quote, a
backslash, padding, a brace, a space where the layout has another byte) and on random bytes.
"""

from __future__ import annotations

import base64
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.session import codec, frames
from tests.unit.accel_build import NOT_BUILT, not_built
from tests.unit.frame_corpus import APPENDS, AUDIO, DELTAS, frames_from

try:
    from relay.session import _accel as accel
except ImportError:
    not_built()
    pytest.skip(NOT_BUILT, allow_module_level=True)


def test_fixed_append_size_matches_its_reference() -> None:
    cases = frames_from(APPENDS)
    wrong = [f for f in cases if accel.fixed_append_size(f) != codec._fixed_append_size(f)]
    assert wrong[:3] == [], f"{len(wrong)} of {len(cases)} differ"


def test_delta_to_the_end_matches_its_reference() -> None:
    cases = frames_from(DELTAS)
    wrong = [f for f in cases if accel.delta_to_the_end(f) != codec._delta_to_the_end(f)]
    assert wrong[:3] == [], f"{len(wrong)} of {len(cases)} differ"


def test_the_layouts_are_answered_and_the_size_is_the_decoded_size() -> None:
    decoded = len(base64.b64decode(AUDIO))
    for layout in APPENDS:
        assert accel.fixed_append_size((layout % AUDIO).encode()) == decoded
    for layout in DELTAS:
        assert accel.delta_to_the_end((layout % AUDIO).encode()) == decoded
    # A lone "=" is no audio, not -1 bytes (which would read as "not this layout").
    assert accel.fixed_append_size((APPENDS[0] % "=").encode()) == 0


@settings(max_examples=500)
@given(st.binary(max_size=200), st.sampled_from(APPENDS + DELTAS), st.integers(0, 120))
def test_random_bytes_in_a_layout_get_the_same_answers(noise: bytes, layout: str, at: int) -> None:
    frame = (layout % AUDIO[:60]).encode()
    frame = frame[:at] + noise + frame[at:]
    assert accel.fixed_append_size(frame) == codec._fixed_append_size(frame)
    assert accel.delta_to_the_end(frame) == codec._delta_to_the_end(frame)


@pytest.mark.parametrize("length", [0, 1, 5, 125, 126, 127, 1283, 65535, 65536, 70001])
@pytest.mark.parametrize("masked", [False, True])
def test_text_frame_matches_its_reference(length: int, masked: bool) -> None:
    payload = random.Random(length).randbytes(length)
    for mask in (0, 1, 0x5A5A5A5A, 0xFFFFFFFF, 0x01020304):
        expected = bytes(frames._text_frame(payload, masked, mask))
        assert accel.text_frame(payload, masked, mask) == expected


def test_what_is_not_bytes_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        accel.fixed_append_size("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        accel.delta_to_the_end(bytearray(b"{}"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        accel.text_frame(b"x", True)  # type: ignore[call-arg]


def test_the_relay_runs_the_c_versions_where_they_were_built() -> None:
    assert codec.fixed_append_size is accel.fixed_append_size
    assert codec.delta_to_the_end is accel.delta_to_the_end
    assert frames.text_frame is accel.text_frame
