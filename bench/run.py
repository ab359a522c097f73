"""`make bench`: the relay against the physical limit (direct), a real proxy (nginx), the
floor for Python (a bare picows relay) and what a team would pick instead (LiteLLM).

For each scenario and session count, every path is measured in turn, direct first; a path
that stops keeping real time is not taken to higher counts. With --repeat N, each point is
measured N times (all paths once, then all again) and the medians are reported. Results: a
printed table, a JSON file and a PNG plot in ``--out`` (default ``bench/results/``). See
docs/performance.md.

    python -m bench.run                     # the default run, ~10 minutes on 2 cores
    python -m bench.run --quick             # 3 to 8 minutes
    python -m bench.run --repeat 3          # medians of three runs of every point
    python -m bench.run --paths direct,relay --relay-args="--workers auto"
    python -m bench.run --profile           # also py-spy the relay (saturation, or: paced)
    python -m bench.run --soak 600          # relay RSS, fds and latency over 10 minutes
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import report, soak
from bench.measure import ProcessTree
from bench.paths import (
    PREVIEW_CLIENT_PATH,
    REALTIME_PATH,
    REPO_DIR,
    UPSTREAM_KEY_ENV,
    BenchPath,
    Child,
    DirectPath,
    Endpoint,
    LitellmPath,
    NginxPath,
    PathError,
    PicowsPath,
    RelayPath,
    announced_ports,
    find_nginx,
)
from bench.profile import Recorder, format_summary, summarize
from bench.runner import Context, QuietGate, run_point
from bench.scenarios import Scenario, default_plan, paced, quick_plan, saturation
from bench.soak import DEFAULT_SESSIONS as SOAK_SESSIONS

ALL_PATHS = ("direct", "nginx", "relay", "relay-w2", "relay-preview", "picows", "litellm")
# The side-by-side of issue 14; picows and litellm are skipped, with a message, where they
# are not installed. relay-w2 and relay-preview compare the relay with itself: --paths.
DEFAULT_PATHS = "direct,nginx,relay,picows,litellm"
# A path "falls behind" at a session count when fewer than this share keep real time.
KEEPS_UP_SHARE = 0.95
# A point during which other processes used more than this many cores is measured again once.
BUSY_CORES = report.BUSY_CORES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a run of under a minute")
    parser.add_argument(
        "--paths", default=DEFAULT_PATHS, help=f"comma-separated, from {', '.join(ALL_PATHS)}"
    )
    parser.add_argument("--scenarios", help="only scenarios whose name contains one of these")
    parser.add_argument("--sessions", help="override the paced session counts, e.g. 100,300")
    parser.add_argument("--duration", type=float, help="override every measured window (s)")
    parser.add_argument(
        "--relay-args", default="", help="extra arguments for `relay serve` (the relay path)"
    )
    parser.add_argument("--sessions-per-generator", type=int, default=500)
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=20.0,
        help="seconds to wait per point for other processes to go quiet (total budget 6x)",
    )
    parser.add_argument("--out", type=Path, default=REPO_DIR / "bench" / "results")
    parser.add_argument(
        "--profile",
        nargs="?",
        const="saturation",
        choices=("saturation", "paced"),
        help="afterwards, py-spy the relay under saturation (default) or 200 x 20 ms paced",
    )
    parser.add_argument(
        "--gc-log", action="store_true", help="record the relay's GC pauses in each window"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="measure every point N times and report the medians (and the added p99's range)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the path on CPU 0, the generators and the echo upstream on the other CPUs",
    )
    parser.add_argument(
        "--soak",
        type=float,
        metavar="SECONDS",
        help=f"instead of the plan: {SOAK_SESSIONS} paced sessions (or --sessions N) of "
        "20 ms frames through the relay (or each of --paths) for SECONDS, sampling its RSS, "
        "fds and frames/s, and the added p99 of every second",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.soak is not None:
        if args.soak < 60:
            parser.error("--soak needs at least 60 seconds")
        if args.sessions and "," in args.sessions:
            parser.error("--soak runs one session count: --sessions N")
        if args.repeat != 1 or args.quick or args.profile or args.duration:
            parser.error("--soak does not combine with --repeat, --quick, --profile, --duration")
    return args


def build_plan(args: argparse.Namespace) -> list[Scenario]:
    plan = quick_plan() if args.quick else default_plan()
    if args.scenarios:
        wanted = [w.strip() for w in args.scenarios.split(",")]
        plan = [s for s in plan if any(w in s.name for w in wanted)]
    if args.sessions:
        counts = tuple(int(n) for n in args.sessions.split(","))
        plan = [replace(s, sessions=counts) if s.kind == "paced" else s for s in plan]
    if args.duration:
        plan = [replace(s, duration_s=args.duration) for s in plan]
    return plan


def build_paths(args: argparse.Namespace, upstream_key: str) -> list[BenchPath]:
    extra = shlex.split(args.relay_args)
    makers: dict[str, Callable[[], BenchPath]] = {
        "direct": lambda: DirectPath(),
        "nginx": lambda: NginxPath(),
        "relay": lambda: RelayPath("relay", upstream_key, extra_args=extra, gc_log=args.gc_log),
        "relay-w2": lambda: RelayPath(
            "relay-w2",
            upstream_key,
            extra_args=["--workers", "2", *extra],
            needs_option="--workers",
        ),
        "relay-preview": lambda: RelayPath(
            "relay-preview", upstream_key, extra_args=extra, client_path=PREVIEW_CLIENT_PATH
        ),
        "picows": lambda: PicowsPath(upstream_key),
        "litellm": lambda: LitellmPath(upstream_key),
    }
    names = [n.strip() for n in args.paths.split(",") if n.strip()]
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise SystemExit(f"bench: unknown paths {unknown}; choose from {', '.join(ALL_PATHS)}")
    if "direct" not in names:
        names.insert(0, "direct")  # the baseline every added latency is measured against
    paths = [makers[name]() for name in names]
    for path in paths:
        if path.pending:
            print(f"bench: path {path.name}: {path.pending}", file=sys.stderr)
    return [p for p in paths if not p.pending]


def start_upstream(work: Path, key: str, *, tls: bool = False) -> tuple[Child, Endpoint]:
    """The echo upstream; with ``tls``, also its TLS listener (certificates from a fresh
    trustme CA, whose file the endpoint names), where trustme is installed."""
    env = {**os.environ, UPSTREAM_KEY_ENV: key}
    argv = [sys.executable, "-m", "bench.upstream", "--key-env", UPSTREAM_KEY_ENV]
    ca_file = _tls_files(work) if tls else None
    if ca_file is not None:
        argv += ["--tls-cert", str(work / "upstream.pem")]
    child = Child(argv, work / "upstream.log", env)
    labels = ("PORT", "TLS_PORT") if ca_file is not None else ("PORT",)
    try:
        ports = announced_ports(child, labels)
    except PathError as exc:
        child.stop()
        raise SystemExit(f"bench: the echo upstream did not start: {exc}") from None
    return child, Endpoint(
        "127.0.0.1",
        ports["PORT"],
        REALTIME_PATH,
        {"api-key": key},
        tls_port=ports.get("TLS_PORT"),
        ca_file=str(ca_file) if ca_file is not None else None,
    )


def _tls_files(work: Path) -> Path | None:
    """A CA and the upstream's certificate for 127.0.0.1 (work/upstream.pem, key included);
    the CA's file, or None without trustme (the `test` extra)."""
    try:
        import trustme
    except ImportError:
        print("bench: trustme is not installed: the echo upstream has no TLS", file=sys.stderr)
        return None
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(
        str(work / "upstream.pem")
    )
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    return work / "ca.pem"


def run_plan(
    plan: list[Scenario], paths: list[BenchPath], ctx: Context, repeat: int = 1
) -> list[dict[str, Any]]:
    """Every point of the plan; with ``repeat`` > 1, each point is the medians of that many
    runs (all paths once, then all again, so slow drift affects every path alike)."""
    points: list[dict[str, Any]] = []
    for scenario in plan:
        behind: set[str] = set()
        for sessions in scenario.sessions:
            active = [p for p in paths if p.name not in behind]
            if all(p.name == "direct" for p in active) and len(paths) > 1:
                print(f"bench: {scenario.name}: every path fell behind; stopping the series")
                break
            runs: dict[str, list[dict[str, Any]]] = {p.name: [] for p in active}
            for round_ in range(repeat):
                if repeat > 1:
                    print(f"bench: {scenario.name} N={sessions}: run {round_ + 1} of {repeat}")
                done = [_run_quiet(path, scenario, sessions, ctx) for path in active]
                # Added latency against direct's run of the same round: paired differences.
                for point in done:
                    if point is not None:
                        point["repeat"] = round_ + 1
                report.add_added_latency([p for p in done if p is not None])
                for path, point in zip(active, done, strict=True):
                    if point is not None:
                        runs[path.name].append(point)
            for path in active:
                mine = runs[path.name]
                if not mine:
                    behind.add(path.name)
                    continue
                point = mine[0] if repeat == 1 else report.median_point(mine)
                points.append(point)
                if scenario.realtime and _fell_behind(point):
                    behind.add(path.name)
    return points


def _run_quiet(
    path: BenchPath, scenario: Scenario, sessions: int, ctx: Context
) -> dict[str, Any] | None:
    """One run; measured once more if other processes were busy, keeping the quieter."""
    point = _run_logged(path, scenario, sessions, ctx)
    if point is not None and point["other_cores"] > BUSY_CORES:
        print(f"bench: other processes used {point['other_cores']} cores; again")
        again = _run_logged(path, scenario, sessions, ctx)
        if again is not None and again["other_cores"] < point["other_cores"]:
            point = again
    return point


def _fell_behind(point: dict[str, Any]) -> bool:
    keeping: int = point["realtime_sessions"] or 0
    return keeping < KEEPS_UP_SHARE * int(point["sessions"])


def _run_logged(
    path: BenchPath, scenario: Scenario, sessions: int, ctx: Context
) -> dict[str, Any] | None:
    began = time.monotonic()
    print(f"bench: {scenario.name:<13} N={sessions:<5} {path.name:<12}", end=" ", flush=True)
    try:
        point = run_point(path, scenario, sessions, ctx)
    except (PathError, TimeoutError, RuntimeError, OSError) as exc:
        print(f"FAILED: {exc}")
        return None
    rtt, keeping = point["rtt_ms"], point["realtime_sessions"]
    print(
        f"p50 {rtt['p50']} ms  p99 {rtt['p99']} ms  "
        f"{'' if keeping is None else f'realtime {keeping}/{sessions}  '}"
        f"({time.monotonic() - began:.1f} s)"
    )
    return point


def run_profile(
    paths: list[BenchPath], ctx: Context, out: Path, quick: bool, kind: str
) -> str | None:
    """py-spy (native frames included) on the relay under saturation or paced load."""
    relay = next((p for p in paths if p.name == "relay"), None)
    if relay is None:
        return None
    recorder = Recorder(out)
    if not recorder.available():
        return "py-spy is not installed (pip install py-spy, or the bench extra)"
    seconds = 3.0 if quick else 6.0
    scenario = saturation(50, 4, seconds) if kind == "saturation" else paced(20, (200,), seconds)
    print(f"bench: profiling the relay under {scenario.name} with py-spy -> {out}")
    sessions = scenario.sessions[0]
    point = run_point(relay, scenario, sessions, ctx, during_window=recorder)
    if not recorder.wait():
        return f"py-spy wrote no profile; see {out.with_suffix('.log')}"
    text = (
        f"relay, {scenario.name}, {sessions} sessions, under py-spy: "
        f"{point['cpu_us_per_frame']} us/frame, "
        f"{point['proxy_system_share']} of it in the kernel\n" + format_summary(summarize(out))
    )
    out.with_suffix(".summary.txt").write_text(text + "\n")
    return text


def machine_meta(args: argparse.Namespace, elapsed: float, quiet_wait: float) -> dict[str, Any]:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    nginx = find_nginx()
    nginx_version = (
        subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
        if nginx
        else None
    )
    commit = _git("rev-parse", "--short", "HEAD").strip()
    # Uncommitted changes to relay/ mean the figures are not those of `commit` alone.
    changed = [line[3:] for line in _git("status", "--porcelain", "--", "relay").splitlines()]
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "aiohttp": version("aiohttp"),
        "uvloop": version("uvloop"),
        "nginx": nginx_version,
        "commit": commit,
        "relay_uncommitted": changed,
        "quick": args.quick,
        "repeat": args.repeat,
        "soak_s": args.soak,
        "pinned": args.pin,
        "relay_args": args.relay_args,
        "elapsed_s": round(elapsed, 1),
        "waited_for_quiet_s": round(quiet_wait, 1),
    }


def _git(*args: str) -> str:
    """A read-only git query; "" where git or the repository is missing."""
    try:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=REPO_DIR, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    _raise_fd_limit()
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else "-soak" if args.soak else ""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S") + suffix
    upstream_key = "bench-upstream-" + secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        work = Path(tmp)
        wants_tls = "litellm" in args.paths and not args.soak
        upstream, endpoint = start_upstream(work, upstream_key, tls=wants_tls)
        try:
            if args.soak and args.paths == DEFAULT_PATHS:
                args.paths = "direct,relay"
            paths = build_paths(args, upstream_key)
            ctx = Context(
                work=work,
                upstream=endpoint,
                upstream_tree=ProcessTree([upstream.pid]),
                quiet=QuietGate(per_point_s=args.wait_quiet, budget_s=6 * args.wait_quiet),
                sessions_per_generator=args.sessions_per_generator,
                pin=args.pin,
            )
            profile = None
            if args.soak:
                direct, *soaked = paths
                sessions = int(args.sessions) if args.sessions else SOAK_SESSIONS
                points = soak.run_soak(direct, soaked, args.soak, sessions, ctx)
                report.add_added_latency(points)
            else:
                points = run_plan(build_plan(args), paths, ctx, args.repeat)
            if args.profile:
                target = args.out / f"profile-{args.profile}-{stamp}.folded"
                profile = run_profile(paths, ctx, target, args.quick, args.profile)
        finally:
            upstream.stop()
    report.add_ratios(points)
    meta = machine_meta(args, time.monotonic() - began, ctx.quiet.waited_s)
    report.write_json(args.out / f"bench-{stamp}.json", meta, points)
    text = report.table(points)
    markdown = report.markdown(points)
    if args.soak:
        soaked_points = [p for p in points if "soak" in p]
        text += "".join("\n\n" + soak.text(p) for p in soaked_points)
        text += "\n\n" + soak.comparison(points)
        markdown += "".join("\n\n" + soak.markdown(p) for p in soaked_points)
        plotted = soak.plot(args.out / f"bench-{stamp}.png", soaked_points[-1])
    else:
        plotted = report.plot(args.out / f"bench-{stamp}.png", points)
    (args.out / f"bench-{stamp}.txt").write_text(text + "\n")
    (args.out / f"bench-{stamp}.md").write_text(markdown + "\n")
    print()
    print(text)
    if profile:
        print("\n" + profile)
    print(
        f"\nbench: {meta['date']}, {meta['cpus']} cores ({meta['cpu_model']}), "
        f"{meta['elapsed_s']} s; results in {args.out}/bench-{stamp}.{{json,txt,md"
        f"{',png' if plotted else ''}}}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
