"""`bench.hot_path` runs, and the callbacks take every one of its frames (a frame the fast
path declined would go to the pump, and the figures would measure nothing)."""

from __future__ import annotations

from bench.hot_path import best_per_frame_us


def test_the_in_process_bench_forwards_every_frame_in_its_callbacks():
    figures = best_per_frame_us(frames_total=200, repeat=1, sessions=3)
    assert len(figures) == 4 and all(figure > 0 for figure in figures)
