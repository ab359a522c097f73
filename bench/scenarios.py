"""The scenarios: what the sessions send, how many, for how long. Default and quick plans.

A scenario runs at each of its session counts on every path, direct first (the baseline its
added latency is measured against).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

# 24 kHz PCM16 mono: 48 bytes of audio per millisecond.
PCM16_24K_BYTES_PER_MS = 48
MIB = 1024 * 1024


def audio_bytes_for(frame_ms: float) -> int:
    """Decoded bytes of ``frame_ms`` of audio (20 ms: 960 bytes, 1280 base64 characters)."""
    return int(frame_ms * PCM16_24K_BYTES_PER_MS)


def audio_bytes_for_event(event_bytes: int) -> int:
    """Decoded bytes whose base64 makes an append event of about ``event_bytes``."""
    return event_bytes // 4 * 3


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    kind: Literal["paced", "saturation", "large", "setup", "idle"]
    # Sessions (setup: connectors, each opening one session after another).
    sessions: tuple[int, ...]
    # paced: one frame per interval per session; closed: `window` frames in flight;
    # setup: open, wait for `session.created`, close, repeat.
    mode: Literal["paced", "closed", "setup"]
    interval_s: float
    audio_bytes: int
    window: int = 1
    warmup_s: float = 1.5
    duration_s: float = 4.0

    @property
    def realtime(self) -> bool:
        """Whether "keeps real time" means anything here (paced sessions only)."""
        return self.mode == "paced"


def paced(frame_ms: int, sessions: tuple[int, ...], duration_s: float) -> Scenario:
    return Scenario(
        name=f"paced {frame_ms} ms",
        kind="paced",
        sessions=sessions,
        mode="paced",
        interval_s=frame_ms / 1000,
        audio_bytes=audio_bytes_for(frame_ms),
        duration_s=duration_s,
    )


def saturation(sessions: int, window: int, duration_s: float) -> Scenario:
    return Scenario(
        name="saturation",
        kind="saturation",
        sessions=(sessions,),
        mode="closed",
        interval_s=0.02,
        audio_bytes=audio_bytes_for(20),
        window=window,
        warmup_s=1.0,
        duration_s=duration_s,
    )


def idle(sessions: tuple[int, ...], duration_s: float) -> Scenario:
    """Sessions open but nearly idle (one 20 ms frame a second each): memory per session."""
    return Scenario(
        name="idle",
        kind="idle",
        sessions=sessions,
        mode="paced",
        interval_s=1.0,
        audio_bytes=audio_bytes_for(20),
        duration_s=duration_s,
    )


def setup(connectors: tuple[int, ...], duration_s: float) -> Scenario:
    """Session set-up: connect, `session.created`, close, repeated by each connector. The
    warm-up is long enough for a path's first sessions, which may load code (LiteLLM's)."""
    return Scenario(
        name="setup",
        kind="setup",
        sessions=connectors,
        mode="setup",
        interval_s=1.0,
        audio_bytes=0,
        warmup_s=2.0,
        duration_s=duration_s,
    )


def large(event_mib: int, sessions: int, duration_s: float) -> Scenario:
    return Scenario(
        name=f"large {event_mib} MiB",
        kind="large",
        sessions=(sessions,),
        mode="closed",
        interval_s=0.02,
        audio_bytes=audio_bytes_for_event(event_mib * MIB),
        window=1,
        warmup_s=0.5,
        duration_s=duration_s,
    )


def default_plan() -> list[Scenario]:
    """About 10 minutes on 2 cores with the default paths, LiteLLM included (it takes 20 to
    30 s to start, for each point, and falls behind early)."""
    return [
        paced(20, (50, 200, 500, 1000), 3.0),
        paced(100, (200, 1000), 3.0),
        saturation(50, 4, 4.0),
        setup((1, 16), 3.0),
        idle((200,), 2.0),
        large(8, 4, 2.5),
    ]


def quick_plan() -> list[Scenario]:
    """A few minutes: for developing the bench, not for figures."""
    short = [
        paced(20, (50, 200), 1.2),
        saturation(50, 4, 1.2),
        setup((1, 16), 1.2),  # keeps its 2 s warm-up
        idle((50,), 2.0),  # two frames per session in the window
        large(8, 2, 0.8),
    ]
    return [s if s.kind == "setup" else replace(s, warmup_s=0.5) for s in short]
