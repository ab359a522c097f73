"""The bench's report: ratios to nginx, and the set-up and memory tables (pure, no bench run)."""

from bench import report


def _point(path, scenario="paced 20 ms", kind="paced", sessions=200, **figures):
    point = {
        "path": path,
        "scenario": scenario,
        "kind": kind,
        "sessions": sessions,
        "connected": sessions,
        "connect_errors": {},
        "rtt_ms": {"p50": 1.0, "p99": 2.0, "p99.9": 3.0},
        "samples": 10,
        "frames_in_per_s": 100.0,
        "frames_out_per_s": 100.0,
        "cpu_us_per_frame": None,
        "rss_per_session_kib": None,
        "rss_peak_bytes": 0,
        "proxy_cpu_s": None if path == "direct" else 1.0,
        "proxy_system_share": None,
        "realtime_sessions": sessions if kind in ("paced", "idle") else None,
        "generator_cores": 0.1,
        "upstream_cores": 0.1,
        "proxy_cores": 0.1,
        "other_cores": 0.0,
        "interrupt_cores": 0.0,
    }
    return point | figures


def test_ratios_are_to_nginx_at_the_same_scenario_and_count():
    points = [
        _point("nginx", cpu_us_per_frame=10.0, rss_per_session_kib=20.0),
        _point("relay", cpu_us_per_frame=25.0, rss_per_session_kib=50.0),
        _point("relay", sessions=500, cpu_us_per_frame=30.0),
        _point("direct"),
    ]
    report.add_ratios(points)
    assert points[1]["vs_nginx"]["cpu_us_per_frame"] == 2.5
    assert points[1]["vs_nginx"]["rss_per_session_kib"] == 2.5
    assert points[0]["vs_nginx"]["cpu_us_per_frame"] == 1.0
    # No nginx at 500 sessions, and direct has no CPU of its own: no ratio.
    assert points[2]["vs_nginx"]["cpu_us_per_frame"] is None
    assert points[3]["vs_nginx"]["cpu_us_per_frame"] is None


def test_set_up_points_get_their_own_table_with_cpu_per_set_up():
    setup = {"kind": "setup", "scenario": "setup", "sessions": 16}
    points = [
        _point("nginx", **setup, setups_per_s=1500.0, cpu_ms_per_setup=0.2),
        _point("litellm", **setup, setups_per_s=8.0, cpu_ms_per_setup=11.0),
        _point("nginx", cpu_us_per_frame=10.0),
    ]
    points[1]["connect_errors"] = {"HTTP 403": 2}
    report.add_ratios(points)
    markdown = report.markdown(points)
    frames, _, setups = markdown.partition("**Session set-up")
    assert "| setup |" not in frames  # set-ups are not frames
    assert "| 16 | litellm | 8.0 | 1.00 / 2.00 | - | 11.000 | 55.00× | 2 |" in setups
    text = report.table(points)
    assert "Session set-up" in text and "55.00×" in text


def test_memory_table_shows_rss_and_peak_growth_per_session_against_nginx():
    large = {"kind": "large", "scenario": "large 8 MiB", "sessions": 4}
    points = [
        _point("direct", **large),
        _point("nginx", **large, rss_per_session_kib=20.0, peak_growth_per_session_mib=0.25),
        _point("relay", **large, rss_per_session_kib=60.0, peak_growth_per_session_mib=30.0),
    ]
    report.add_ratios(points)
    headers, rows = report.memory_rows([p for p in points if p["path"] != "direct"])
    assert headers[3:7] == ["RSS KiB/session", "× nginx", "peak growth MiB/session", "× nginx"]
    assert rows[1] == ["large 8 MiB", "4", "relay", "60.0", "3.00×", "30.00", "120.00×", "yes"]
    assert "**Memory**" in report.markdown(points)
