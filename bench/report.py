"""The figures of a run: added latency over direct, the printed table, JSON and the PNG plot."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

KEYS = ("p50", "p99", "p99.9")
# Other processes' cores during a point above which the table flags it with "!".
BUSY_CORES = 0.3
_COLUMNS = (
    ("scenario", 13, "<"),
    ("N", 5, ">"),
    ("path", 12, "<"),
    ("conn", 5, ">"),
    ("rtt p50", 8, ">"),
    ("p99", 7, ">"),
    ("p99.9", 7, ">"),
    ("added p50", 9, ">"),
    ("p99", 7, ">"),
    ("p99.9", 7, ">"),
    ("in/s", 7, ">"),
    ("out/s", 7, ">"),
    ("us/frame", 8, ">"),
    ("KiB/sess", 8, ">"),
    ("peak MiB", 8, ">"),
    ("realtime", 9, ">"),
    ("gen", 5, ">"),
    ("up", 5, ">"),
    ("proxy", 5, ">"),
    ("other", 6, ">"),
    ("irq", 5, ">"),
    ("gc ms", 5, ">"),
)


def add_added_latency(points: list[dict[str, Any]]) -> None:
    """Each point's round-trip percentiles minus direct's at the same scenario and N."""
    direct = {(p["scenario"], p["sessions"]): p for p in points if p["path"] == "direct"}
    for point in points:
        base = direct.get((point["scenario"], point["sessions"]))
        added: dict[str, float | None] = {key: None for key in KEYS}
        if base is not None and point["path"] != "direct":
            for key in KEYS:
                mine, theirs = point["rtt_ms"].get(key), base["rtt_ms"].get(key)
                if mine is not None and theirs is not None:
                    added[key] = round(mine - theirs, 4)
        point["added_ms"] = added


def median_point(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One point from several runs of it: the median of each figure (each percentile on
    its own), the min and max of the added p99, the connect errors of all runs, and the runs
    themselves under ``runs``. Each run's added latency is against the direct run of the
    same repeat, so the added figures are medians of paired differences."""
    merged: dict[str, Any] = _median_of(list(runs))
    merged["connect_errors"] = {}
    for run in runs:
        for reason, count in run["connect_errors"].items():
            merged["connect_errors"][reason] = merged["connect_errors"].get(reason, 0) + count
    added = [r["added_ms"]["p99"] for r in runs if r.get("added_ms", {}).get("p99") is not None]
    merged["added_p99_range_ms"] = [min(added), max(added)] if added else None
    merged["repeats"] = len(runs)
    merged["runs"] = list(runs)
    return merged


def _median_of(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    if not present:
        return None
    if all(isinstance(v, dict) for v in present):
        keys = list(dict.fromkeys(k for v in present for k in v))
        return {k: _median_of([v.get(k) for v in present]) for k in keys}
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        middle = statistics.median(present)
        if all(isinstance(v, int) for v in present) and middle == int(middle):
            return int(middle)
        return round(float(middle), 4)
    return present[0]


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cells(point: dict[str, Any]) -> list[str]:
    rtt, added = point["rtt_ms"], point.get("added_ms", {})
    realtime = point["realtime_sessions"]
    peak = point["rss_peak_bytes"] / 1048576 if point["proxy_cpu_s"] is not None else None
    return [
        point["scenario"],
        str(point["sessions"]),
        point["path"],
        str(point["connected"]),
        *(_num(rtt.get(k)) for k in KEYS),
        *(_num(added.get(k)) for k in KEYS),
        f"{point['frames_in_per_s']:.0f}",
        f"{point['frames_out_per_s']:.0f}",
        _num(point["cpu_us_per_frame"], 1),
        _num(point["rss_per_session_kib"], 1),
        _num(peak, 1),
        "-" if realtime is None else f"{realtime}/{point['connected']}",
        _num(point["generator_cores"]),
        _num(point["upstream_cores"]),
        _num(point["proxy_cores"]),
        _num(point["other_cores"]) + ("!" if point["other_cores"] > BUSY_CORES else ""),
        _num(point["interrupt_cores"]),
        _num(point["gc_pauses"]["max_ms"], 1) if "gc_pauses" in point else "-",
    ]


def _range(point: dict[str, Any], between: str = "..") -> str:
    """The added p99's min and max over the repeats of a point, or "-"."""
    span = point.get("added_p99_range_ms")
    return "-" if not span else f"{span[0]:.2f}{between}{span[1]:.2f}"


def table(points: Sequence[dict[str, Any]]) -> str:
    """The printed table: one row per scenario, session count and path (with repeats, the
    medians of the runs and a column with the added p99's range)."""
    columns = list(_COLUMNS)
    repeated = any(p.get("added_p99_range_ms") for p in points)
    if repeated:
        columns.insert(10, ("p99 min..max", 13, ">"))
    header = " ".join(f"{name:{align}{width}}" for name, width, align in columns)
    lines = [header, "-" * len(header)]
    for point in points:
        cells = _cells(point)
        if repeated:
            cells.insert(10, _range(point))
        lines.append(
            " ".join(
                f"{cell:{align}{width}}"
                for cell, (_, width, align) in zip(cells, columns, strict=True)
            )
        )
    return "\n".join(lines)


def markdown(points: Sequence[dict[str, Any]]) -> str:
    """A shorter table in Markdown, for docs/performance.md (with repeats: the medians, and
    the added p99's min-max)."""
    repeated = any(p.get("added_p99_range_ms") for p in points)
    lines = [
        "| scenario | N | path | added p50 / p99 / p99.9 ms "
        + ("| added p99 min–max " if repeated else "")
        + "| rtt p99 ms | CPU us/frame (kernel) | RSS KiB/session | peak MiB | keeps real time "
        "| cores: gen / proxy |",
        "|---|---:|---|---|" + ("---|" if repeated else "") + "---:|---|---:|---:|---:|---|",
    ]
    for point in points:
        added = point.get("added_ms", {})
        share = point["proxy_system_share"]
        cpu = _num(point["cpu_us_per_frame"], 1)
        if share is not None:
            cpu += f" ({share:.0%})"
        peak = point["rss_peak_bytes"] / 1048576 if point["proxy_cpu_s"] is not None else None
        cells = [
            point["scenario"],
            str(point["sessions"]),
            point["path"],
            " / ".join(_num(added.get(k)) for k in KEYS) if point["path"] != "direct" else "-",
            *([_range(point, " – ")] if repeated else []),
            _num(point["rtt_ms"].get("p99")),
            cpu,
            _num(point["rss_per_session_kib"], 1),
            _num(peak, 1),
            _realtime_cell(point),
            f"{_num(point['generator_cores'])} / {_num(point['proxy_cores'])}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _realtime_cell(point: dict[str, Any]) -> str:
    """Sessions keeping real time; with repeats that disagree, each run's in brackets."""
    realtime = point["realtime_sessions"]
    if realtime is None:
        return "-"
    cell = f"{realtime}/{point['connected']}"
    each = [run["realtime_sessions"] for run in point.get("runs", [])]
    if len(set(each)) > 1:
        cell += f" ({', '.join(str(n) for n in each)})"
    return cell


def write_json(target: Path, meta: dict[str, Any], points: Sequence[dict[str, Any]]) -> None:
    target.write_bytes(
        orjson.dumps({"meta": meta, "points": list(points)}, option=orjson.OPT_INDENT_2)
    )


def plot(target: Path, points: Sequence[dict[str, Any]]) -> bool:
    """Latency percentiles against sessions, one column per paced scenario; False if no
    matplotlib or nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scenarios = list(dict.fromkeys(p["scenario"] for p in points if p["kind"] == "paced"))
    if not scenarios:
        return False
    fig, axes = plt.subplots(2, len(scenarios), figsize=(6 * len(scenarios), 8), squeeze=False)
    paths = sorted({p["path"] for p in points}, key=lambda name: (name != "direct", name))
    styles = {"p50": "-", "p99": "--", "p99.9": ":"}
    for column, scenario in enumerate(scenarios):
        top, bottom = axes[0][column], axes[1][column]
        for index, name in enumerate(paths):
            mine = sorted(
                (p for p in points if p["scenario"] == scenario and p["path"] == name),
                key=lambda p: p["sessions"],
            )
            color = f"C{index}"
            for key, style in styles.items():
                _line(top, mine, "rtt_ms", key, color, style, f"{name} {key}")
                if name != "direct":
                    _line(bottom, mine, "added_ms", key, color, style, f"{name} {key}")
            _ranges(bottom, mine, color)
        top.set_title(f"{scenario}: round trip")
        bottom.set_title(f"{scenario}: added over direct")
        top.set_yscale("log")
        bottom.set_yscale("symlog", linthresh=0.1)
        counts = sorted({p["sessions"] for p in points if p["scenario"] == scenario})
        for axis in (top, bottom):
            axis.set_xscale("log")
            axis.set_xticks(counts, [str(n) for n in counts])
            axis.minorticks_off()
            axis.set_xlabel("concurrent sessions")
            axis.set_ylabel("ms")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return True


def _ranges(axis: Any, points: Sequence[dict[str, Any]], color: str) -> None:
    """The added p99's min-max over the repeats, as a bar at each session count."""
    for point in points:
        span = point.get("added_p99_range_ms")
        if span:
            axis.vlines(point["sessions"], span[0], span[1], color=color, alpha=0.4, lw=4)


def _line(
    axis: Any,
    points: Sequence[dict[str, Any]],
    field: str,
    key: str,
    color: str,
    style: str,
    label: str,
) -> None:
    xs = [p["sessions"] for p in points if p.get(field, {}).get(key) is not None]
    ys = [p[field][key] for p in points if p.get(field, {}).get(key) is not None]
    if xs:
        axis.plot(xs, ys, style, color=color, marker="o", markersize=3, label=label)
