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
# The proxy every other path's costs are divided by (this machine's speed varies from day
# to day; ratios to nginx in the same run do not).
REFERENCE = "nginx"
# The figures given as ratios to the reference's at the same scenario and N.
RATIO_FIELDS = (
    "cpu_us_per_frame",
    "cpu_ms_per_setup",
    "rss_per_session_kib",
    "peak_growth_per_session_mib",
)
# Scenarios whose figures are about memory: the memory table shows them.
MEMORY_KINDS = ("idle", "large")
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


def add_ratios(points: Sequence[dict[str, Any]]) -> None:
    """Each point's RATIO_FIELDS over nginx's at the same scenario and N, in ``vs_nginx``
    (None where either is missing or nginx's is not above zero)."""
    reference = {(p["scenario"], p["sessions"]): p for p in points if p["path"] == REFERENCE}
    for point in points:
        base = reference.get((point["scenario"], point["sessions"]))
        point["vs_nginx"] = {
            name: _ratio(point.get(name), base.get(name) if base else None) for name in RATIO_FIELDS
        }


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0:
        return None
    return round(value / reference, 2)


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
    setups = [p for p in points if p["kind"] == "setup"]
    points = [p for p in points if p["kind"] != "setup"]
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
    text = "\n".join(lines)
    for title, (headers, rows) in _extra_tables(setups, points):
        text += f"\n\n{title}\n" + _grid(headers, rows)
    return text


def markdown(points: Sequence[dict[str, Any]]) -> str:
    """A shorter table in Markdown, for docs/performance.md (with repeats: the medians, and
    the added p99's min-max)."""
    repeated = any(p.get("added_p99_range_ms") for p in points)
    setups = [p for p in points if p["kind"] == "setup"]
    points = [p for p in points if p["kind"] != "setup"]
    lines = [
        "| scenario | N | path | added p50 / p99 / p99.9 ms "
        + ("| added p99 min–max " if repeated else "")
        + "| rtt p99 ms | CPU us/frame (kernel) | × nginx | RSS KiB/session | peak MiB "
        "| keeps real time | cores: gen / proxy |",
        "|---|---:|---|---|" + ("---|" if repeated else "") + "---:|---|---:|---:|---:|---:|---|",
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
            _times(point, "cpu_us_per_frame"),
            _num(point["rss_per_session_kib"], 1),
            _num(peak, 1),
            _realtime_cell(point),
            f"{_num(point['generator_cores'])} / {_num(point['proxy_cores'])}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    for title, (headers, rows) in _extra_tables(setups, points):
        text += f"\n\n**{title}**\n\n" + _markdown_grid(headers, rows)
    return text


def _times(point: dict[str, Any], name: str) -> str:
    """A figure's ratio to nginx's, as "2.5×", or "-"."""
    ratio = point.get("vs_nginx", {}).get(name)
    return "-" if ratio is None else f"{ratio:.2f}×"


def _extra_tables(
    setups: Sequence[dict[str, Any]], points: Sequence[dict[str, Any]]
) -> list[tuple[str, tuple[list[str], list[list[str]]]]]:
    """The set-up and memory tables (title, headers, rows), where the run has such points."""
    tables = []
    if setups:
        tables.append(
            ("Session set-up (connect to session.created, then close)", setup_rows(setups))
        )
    memory = [p for p in points if p["kind"] in MEMORY_KINDS and p["path"] != "direct"]
    if memory:
        tables.append(("Memory", memory_rows(memory)))
    return tables


def setup_rows(points: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The set-up table: set-ups per second, set-up time, the proxy's CPU per set-up."""
    headers = [
        "connectors",
        "path",
        "set-ups/s",
        "set-up p50 / p99 ms",
        "added p99 ms",
        "CPU ms/set-up",
        "× nginx",
        "failed",
    ]
    rows = []
    for point in points:
        rtt = point["rtt_ms"]
        rows.append(
            [
                str(point["sessions"]),
                point["path"],
                _num(point.get("setups_per_s"), 1),
                f"{_num(rtt.get('p50'))} / {_num(rtt.get('p99'))}",
                _num(point.get("added_ms", {}).get("p99")),
                _num(point.get("cpu_ms_per_setup"), 3),
                _times(point, "cpu_ms_per_setup"),
                str(sum(point["connect_errors"].values())),
            ]
        )
    return headers, rows


def memory_rows(points: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The memory table: RSS per open session, and the peak growth per session (what a
    large event costs), each with its ratio to nginx's."""
    headers = [
        "scenario",
        "N",
        "path",
        "RSS KiB/session",
        "× nginx",
        "peak growth MiB/session",
        "× nginx",
        "kept up",
    ]
    rows = []
    for point in points:
        kept = point["realtime_sessions"]
        if kept is None:
            echoed = point["samples"] > 0 and not point["connect_errors"]
            kept_cell = "yes" if echoed else "no"
        else:
            kept_cell = f"{kept}/{point['connected']}"
        rows.append(
            [
                point["scenario"],
                str(point["sessions"]),
                point["path"],
                _num(point.get("rss_per_session_kib"), 1),
                _times(point, "rss_per_session_kib"),
                _num(point.get("peak_growth_per_session_mib"), 2),
                _times(point, "peak_growth_per_session_mib"),
                kept_cell,
            ]
        )
    return headers, rows


def _grid(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Fixed-width columns: names (up to and including "path") left-aligned, figures right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    names = headers.index("path") + 1

    def line(cells: Sequence[str]) -> str:
        return " ".join(
            f"{cell:{'<' if i < names else '>'}{widths[i]}}" for i, cell in enumerate(cells)
        ).rstrip()

    head = line(headers)
    return "\n".join([head, "-" * len(head), *(line(r) for r in rows)])


def _markdown_grid(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    align = ["---" if h in ("scenario", "path") else "---:" for h in headers]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [list(headers), align, *rows])


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
