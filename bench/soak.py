"""The soak (``python -m bench.run --soak SECONDS``): does the relay's memory grow over time?

One paced load (default 200 sessions of 20 ms frames) runs through the relay (or each path
of ``--paths`` in turn, e.g. nginx,picows,relay) for SECONDS after a warm-up of
``SOAK_WARMUP_S``. Every
``SAMPLE_EVERY_S`` the orchestrator records the relay's RSS, open file descriptors and CPU;
the frames forwarded per second between samples come from the generators' send and arrival
instants. Round trips are split by minute of the window. "Added" latency needs direct at the
same load: a shorter direct run (``BASELINE_S``) comes first, and each minute's added p99 is
that minute's relay p99 minus direct's p99. The same goes for each second (stall episodes);
direct's own seconds against its window's p99 are the harness's floor, so a path's stall
seconds can be told from the machine's (`comparison`).

The summary: RSS at the window's start, end and highest, and its growth as the least-squares
slope over the window (and over its second half, after any settling), in KiB per minute; the
same for the fds; frames per second and the relay's cores between samples; rtt and added
percentiles per minute.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.paths import MAX_SESSION_S, BenchPath, RelayPath
from bench.runner import Context, SeriesSpec, run_point
from bench.scenarios import Scenario, paced

SOAK_WARMUP_S = 30.0
SAMPLE_EVERY_S = 10.0
# A second whose added p99 passes this is part of a stall episode (issue 14's bound).
STALL_MS = 5.0
BASELINE_S = 60.0
BASELINE_WARMUP_S = 5.0
DEFAULT_SESSIONS = 200
FRAME_MS = 20
KIB = 1024
MIB = 1024 * 1024


def soak_scenario(seconds: float, sessions: int) -> Scenario:
    base = paced(FRAME_MS, (sessions,), seconds)
    return replace(base, name=f"soak {FRAME_MS} ms", warmup_s=SOAK_WARMUP_S)


def run_soak(
    direct: BenchPath, paths: Sequence[BenchPath], seconds: float, sessions: int, ctx: Context
) -> list[dict[str, Any]]:
    """The direct baseline, then each path's soak: points, the soaks' with ``series``,
    ``by_minute`` and ``soak``, the summary. Direct's own seconds against its window's p99
    are the harness's floor: a second a path spends over the bound that direct also shows
    is the machine's (the generators, the echo upstream), not the path's."""
    scenario = soak_scenario(seconds, sessions)
    base = replace(scenario, warmup_s=BASELINE_WARMUP_S, duration_s=min(BASELINE_S, seconds))
    print(f"bench: soak: direct baseline, {sessions} sessions, {base.duration_s:g} s", flush=True)
    baseline = run_point(direct, base, sessions, ctx, per_second=True)
    baseline["soak_floor"] = _floor(baseline)
    print(
        f"bench: soak: direct p99 {baseline['rtt_ms']['p99']} ms; "
        f"{baseline['soak_floor']['seconds_over_5_ms']} of "
        f"{len(baseline['soak_floor']['over_own_p99_by_second_ms'])} seconds over it by "
        f"{STALL_MS:g} ms",
        flush=True,
    )
    points = [baseline]
    for path in paths:
        if isinstance(path, RelayPath):
            # The bench config's session limit would end the sessions of a long soak.
            path.max_session_s = max(MAX_SESSION_S, scenario.warmup_s + seconds + 120)
        print(
            f"bench: soak: {path.name}, {sessions} sessions x {FRAME_MS} ms frames, "
            f"{scenario.warmup_s:g} s warm-up + {seconds:g} s; a sample every "
            f"{SAMPLE_EVERY_S:g} s",
            flush=True,
        )
        point = run_point(
            path, scenario, sessions, ctx, series=SeriesSpec(SAMPLE_EVERY_S, _print_sample)
        )
        point["soak"] = summarize(point, baseline, scenario)
        if isinstance(path, RelayPath):
            point["relay_log"] = log_summary(path.log)
        points.append(point)
    return points


def _stall_causes(by_second: Sequence[float], sched: Sequence[dict[str, float]]) -> dict[str, Any]:
    """The scheduler's accounting in stalled seconds against the others: medians of what
    the path ran and waited for a core, and the generators' and upstream's running. A path
    that waits for a core in its stalled seconds is starved by the machine; one that runs
    more is behind on its own work."""

    def medians(rows: list[dict[str, float]]) -> dict[str, float | None]:
        keys = ("path_run_ms", "path_wait_ms", "generators_run_ms", "upstream_run_ms")
        return {
            k: _round(float(np.median([r[k] for r in rows])), 1) if rows else None for k in keys
        }

    paired = list(zip(by_second, sched, strict=False))
    return {
        "sched_stalled_seconds": medians([row for added, row in paired if added > STALL_MS]),
        "sched_other_seconds": medians([row for added, row in paired if added <= STALL_MS]),
    }


def _floor(baseline: dict[str, Any]) -> dict[str, Any]:
    """Direct's seconds against its own window's p99: the harness's stall floor."""
    p99 = baseline["rtt_ms"]["p99"]
    over = [
        round(second - p99, 3)
        for second in baseline.get("p99_by_second_ms", [])
        if second is not None and p99 is not None
    ]
    return {
        "over_own_p99_by_second_ms": over,
        "seconds_over_5_ms": sum(1 for added in over if added > STALL_MS),
    }


def log_summary(log: Path | None) -> dict[str, Any]:
    """The relay's log lines by level, and the events logged at warning or above."""
    levels: Counter[str] = Counter()
    warnings: Counter[str] = Counter()
    if log is None or not log.exists():
        return {"levels": {}, "warnings": {}}
    with log.open("rb") as lines:
        for line in lines:
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                levels["(not JSON)"] += 1
                continue
            if not isinstance(record, dict):
                levels["(not JSON)"] += 1
                continue
            level = str(record.get("level", "?"))
            levels[level] += 1
            if level in ("warning", "error", "critical", "exception"):
                warnings[str(record.get("event", "?"))] += 1
    return {"levels": dict(levels), "warnings": dict(warnings)}


def _print_sample(sample: dict[str, Any]) -> None:
    print(
        f"bench: soak: t={sample['t_s']:6.0f} s  RSS {sample['rss_bytes'] / MIB:7.2f} MiB  "
        f"fds {sample['open_fds']}",
        flush=True,
    )


def _slope_per_minute(ts: Sequence[float], values: Sequence[float]) -> float | None:
    """Least-squares slope of values against time (seconds), per minute."""
    if len(ts) < 3:
        return None
    slope = np.polyfit(np.asarray(ts, dtype=float) / 60, np.asarray(values, dtype=float), 1)[0]
    return float(slope)


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def summarize(
    point: dict[str, Any], baseline: dict[str, Any], scenario: Scenario
) -> dict[str, Any]:
    series = point["series"]
    ts = [s["t_s"] for s in series]
    rss_kib = [s["rss_bytes"] / KIB for s in series]
    fds = [s["open_fds"] for s in series]
    half = ts[-1] / 2
    late = [i for i, t in enumerate(ts) if t >= half]
    rates = [s["frames_per_s"] for s in series if s["frames_per_s"] is not None]
    cores = [s["proxy_cores"] for s in series if s["proxy_cores"] is not None]
    per_frame = [s["cpu_us_per_frame"] for s in series if s["cpu_us_per_frame"] is not None]
    others = [s["other_cores"] for s in series if s["other_cores"] is not None]
    direct_p99 = baseline["rtt_ms"]["p99"]
    minutes = []
    for minute in point["by_minute"]:
        p99 = minute["rtt_ms"]["p99"]
        added = None if p99 is None or direct_p99 is None else round(p99 - direct_p99, 3)
        minutes.append(
            {
                "minute": minute["minute"],
                "from_s": minute["from_s"],
                "to_s": minute["to_s"],
                "samples": minute["samples"],
                "rtt_p50_ms": minute["rtt_ms"]["p50"],
                "rtt_p99_ms": p99,
                "rtt_p99_9_ms": minute["rtt_ms"]["p99.9"],
                "rtt_max_ms": minute["rtt_ms"]["max"],
                "added_p99_ms": added,
            }
        )
    added_p99 = [m["added_p99_ms"] for m in minutes if m["added_p99_ms"] is not None]
    by_second = [
        round(p99 - direct_p99, 3)
        for p99 in point.get("p99_by_second_ms", [])
        if p99 is not None and direct_p99 is not None
    ]
    return {
        **_stall_causes(by_second, point.get("sched_by_second", [])),
        "seconds": scenario.duration_s,
        "warmup_s": scenario.warmup_s,
        "sample_every_s": SAMPLE_EVERY_S,
        "samples": len(series),
        "rss_idle_mib": round(point["rss_idle_bytes"] / MIB, 2),
        "rss_start_mib": round(rss_kib[0] / KIB, 2),
        "rss_end_mib": round(rss_kib[-1] / KIB, 2),
        "rss_max_mib": round(max(rss_kib) / KIB, 2),
        "rss_min_mib": round(min(rss_kib) / KIB, 2),
        "rss_slope_kib_per_min": _round(_slope_per_minute(ts, rss_kib)),
        "rss_slope_second_half_kib_per_min": _round(
            _slope_per_minute([ts[i] for i in late], [rss_kib[i] for i in late])
        ),
        "fds_start": fds[0],
        "fds_end": fds[-1],
        "fds_max": max(fds),
        "fds_min": min(fds),
        "fds_slope_per_min": _round(_slope_per_minute(ts, fds), 3),
        "frames_per_s": _spread(rates, 1),
        "proxy_cores": _spread(cores, 3),
        "cpu_us_per_frame": _spread(per_frame, 2),
        "other_cores": _spread(others, 3),
        "direct_p99_ms": direct_p99,
        "by_minute": minutes,
        "added_p99_ms": _spread(added_p99, 3),
        # Stall episodes: the added p99 of each second of the window.
        "added_p99_by_second_ms": by_second,
        "added_p99_per_second": _spread(by_second, 3),
        "seconds_over_5_ms": sum(1 for added in by_second if added > STALL_MS),
        "added_p99_slope_ms_per_min": _round(
            _slope_per_minute([m["from_s"] for m in minutes], added_p99)
            if len(added_p99) == len(minutes)
            else None,
            4,
        ),
    }


def comparison(points: Sequence[dict[str, Any]]) -> str:
    """One line per path: its seconds over the bound, beside direct's own (the floor)."""
    baseline = points[0]
    floor = baseline["soak_floor"]
    lines = [
        f"stall seconds (a second's p99 more than {STALL_MS:g} ms over direct's window p99 "
        f"{_fmt(baseline['rtt_ms']['p99'])} ms):",
        f"  direct (its own floor): {floor['seconds_over_5_ms']} of "
        f"{len(floor['over_own_p99_by_second_ms'])}",
    ]
    for point in points[1:]:
        if "soak" not in point:
            continue
        soak = point["soak"]
        per_second = soak["added_p99_per_second"]
        lines.append(
            f"  {point['path']}: {soak['seconds_over_5_ms']} of "
            f"{len(soak['added_p99_by_second_ms'])}; added p99 by second median "
            f"{_fmt(per_second['median'])}, max {_fmt(per_second['max'])} ms; "
            f"{_fmt(soak['cpu_us_per_frame']['median'], 1)} us/frame"
        )
    return "\n".join(lines)


def _spread(values: Sequence[float], digits: int) -> dict[str, float | None]:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {
        "min": round(min(values), digits),
        "median": round(float(np.median(values)), digits),
        "max": round(max(values), digits),
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def text(point: dict[str, Any]) -> str:
    """The soak's summary, per-minute latency and every sample, for the .txt output."""
    soak = point["soak"]
    lines = [
        f"soak: {point['path']}, {point['sessions']} sessions x {FRAME_MS} ms frames, "
        f"{soak['warmup_s']:g} s warm-up + {soak['seconds']:g} s measured, "
        f"{soak['samples']} samples",
        *_summary_lines(soak),
        *(
            [
                f"relay log lines by level: {point['relay_log']['levels']}; "
                f"warnings and errors: {point['relay_log']['warnings'] or 'none'}"
            ]
            if "relay_log" in point
            else []
        ),
        "",
        "minute  samples  rtt p50   p99  p99.9    max  added p99",
    ]
    for m in soak["by_minute"]:
        lines.append(
            f"{m['minute']:>6} {m['samples']:>8} {_fmt(m['rtt_p50_ms']):>7} "
            f"{_fmt(m['rtt_p99_ms']):>5} {_fmt(m['rtt_p99_9_ms']):>6} {_fmt(m['rtt_max_ms']):>6} "
            f"{_fmt(m['added_p99_ms']):>10}"
        )
    lines += [
        "",
        "(since the sample before: relay cores and us/frame; cores of the generators, of",
        "processes outside the bench, and of interrupts)",
        "   t s   RSS MiB   fds  frames/s  cores  us/frame   gen  other   irq",
    ]
    for s in point["series"]:
        lines.append(
            f"{s['t_s']:>6.0f} {s['rss_bytes'] / MIB:>9.2f} {s['open_fds']:>5} "
            f"{_fmt(s['frames_per_s'], 0):>9} {_fmt(s['proxy_cores']):>6} "
            f"{_fmt(s['cpu_us_per_frame'], 1):>9} {_fmt(s.get('generator_cores')):>5} "
            f"{_fmt(s.get('other_cores')):>6} {_fmt(s.get('interrupt_cores')):>5}"
        )
    return "\n".join(lines)


def _summary_lines(soak: dict[str, Any]) -> list[str]:
    fps, cores, cpu = soak["frames_per_s"], soak["proxy_cores"], soak["cpu_us_per_frame"]
    added = soak["added_p99_ms"]
    per_second = soak["added_p99_per_second"]
    return [
        f"RSS MiB: idle {soak['rss_idle_mib']}, start {soak['rss_start_mib']}, "
        f"end {soak['rss_end_mib']}, max {soak['rss_max_mib']}, min {soak['rss_min_mib']}",
        f"RSS growth: {_fmt(soak['rss_slope_kib_per_min'])} KiB/min (least squares), "
        f"{_fmt(soak['rss_slope_second_half_kib_per_min'])} KiB/min over the second half",
        f"open fds: start {soak['fds_start']}, end {soak['fds_end']}, "
        f"min {soak['fds_min']}, max {soak['fds_max']}, "
        f"slope {_fmt(soak['fds_slope_per_min'], 3)}/min",
        f"frames/s (min / median / max over samples): {_fmt(fps['min'], 0)} / "
        f"{_fmt(fps['median'], 0)} / {_fmt(fps['max'], 0)}",
        f"relay cores: {_fmt(cores['min'])} / {_fmt(cores['median'])} / {_fmt(cores['max'])}; "
        f"us/frame {_fmt(cpu['min'], 1)} / {_fmt(cpu['median'], 1)} / {_fmt(cpu['max'], 1)}",
        f"added p99 by minute (direct p99 {_fmt(soak['direct_p99_ms'])} ms): "
        f"min {_fmt(added['min'])}, median {_fmt(added['median'])}, max {_fmt(added['max'])} "
        f"ms; slope {_fmt(soak['added_p99_slope_ms_per_min'], 4)} ms/min",
        f"added p99 by second: min {_fmt(per_second['min'])}, median "
        f"{_fmt(per_second['median'])}, max {_fmt(per_second['max'])} ms; "
        f"{soak['seconds_over_5_ms']} of {len(soak['added_p99_by_second_ms'])} seconds "
        f"over {STALL_MS:g} ms",
        _sched_line("stalled seconds", soak.get("sched_stalled_seconds")),
        _sched_line("other seconds", soak.get("sched_other_seconds")),
        f"processes outside the bench, cores between samples: "
        f"median {_fmt(soak['other_cores']['median'])}, max {_fmt(soak['other_cores']['max'])}",
    ]


def _sched_line(what: str, medians: dict[str, float | None] | None) -> str:
    if not medians or medians["path_run_ms"] is None:
        return f"{what}: none"
    return (
        f"{what}, medians per second: the path ran {_fmt(medians['path_run_ms'], 0)} ms and "
        f"waited {_fmt(medians['path_wait_ms'], 0)} ms for a core; generators ran "
        f"{_fmt(medians['generators_run_ms'], 0)} ms, the upstream "
        f"{_fmt(medians['upstream_run_ms'], 0)} ms"
    )


def markdown(point: dict[str, Any]) -> str:
    """The summary and the per-minute latency in Markdown."""
    soak = point["soak"]
    lines = [
        f"Soak: {point['path']}, {point['sessions']} sessions x {FRAME_MS} ms frames, "
        f"{soak['warmup_s']:g} s warm-up + {soak['seconds']:g} s measured.",
        "",
        *(f"- {line}" for line in _summary_lines(soak)),
        "",
        "| minute | rtt p50 ms | rtt p99 ms | rtt p99.9 ms | added p99 ms |",
        "|---:|---:|---:|---:|---:|",
    ]
    for m in soak["by_minute"]:
        lines.append(
            f"| {m['minute']} | {_fmt(m['rtt_p50_ms'])} | {_fmt(m['rtt_p99_ms'])} | "
            f"{_fmt(m['rtt_p99_9_ms'])} | {_fmt(m['added_p99_ms'])} |"
        )
    return "\n".join(lines)


def plot(target: Path, point: dict[str, Any]) -> bool:
    """RSS over time (with its fitted line), open fds and frames per second, and the
    per-minute rtt and added p99; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    soak, series = point["soak"], point["series"]
    minutes = np.array([s["t_s"] for s in series]) / 60
    rss = np.array([s["rss_bytes"] for s in series]) / MIB
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    top.plot(minutes, rss, marker="o", markersize=3, label="relay RSS")
    late = minutes >= minutes[-1] / 2
    for chosen, name, key in (
        (minutes >= 0, "window", "rss_slope_kib_per_min"),
        (late, "second half", "rss_slope_second_half_kib_per_min"),
    ):
        slope = soak[key]
        if slope is not None:
            fit = np.polyfit(minutes[chosen], rss[chosen], 1)
            label = f"fit over the {name}: {slope:+.1f} KiB/min"
            top.plot(minutes[chosen], np.polyval(fit, minutes[chosen]), "--", label=label)
    top.set_ylabel("MiB")
    top.set_title(
        f"relay soak: {point['sessions']} sessions x {FRAME_MS} ms, after "
        f"{soak['warmup_s']:g} s warm-up"
    )
    middle.plot(minutes, [s["open_fds"] for s in series], color="C2", label="open fds")
    middle.set_ylabel("open fds")
    rate_axis = middle.twinx()
    rated = [(m, s["frames_per_s"]) for m, s in zip(minutes, series, strict=True)]
    rates = [r for _, r in rated if r is not None]
    rate_axis.plot(
        [m for m, r in rated if r is not None], rates, color="C3", label="frames/s (in + out)"
    )
    rate_axis.set_ylabel("frames/s")
    rate_axis.set_ylim(0, 1.2 * max(rates, default=1))
    middle.set_ylim(0, 2 * max(s["open_fds"] for s in series))
    handles = middle.get_legend_handles_labels()
    extra = rate_axis.get_legend_handles_labels()
    middle.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize="small")
    by_minute = soak["by_minute"]
    if by_minute:
        # Each minute's figure drawn across that minute.
        edges = [m["from_s"] / 60 for m in by_minute] + [by_minute[-1]["to_s"] / 60]
        for key, label in (("rtt_p99_ms", "rtt p99"), ("added_p99_ms", "added p99")):
            values = [m[key] for m in by_minute]
            bottom.stairs(values, edges, baseline=None, label=f"{label} per minute")
    bottom.set_ylabel("ms")
    bottom.set_xlabel("minutes into the measured window")
    bottom.set_ylim(bottom=0)
    for axis in (top, bottom):
        axis.legend(fontsize="small")
    for axis in (top, middle, bottom):
        axis.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return True
