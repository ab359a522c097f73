"""One pass over a config: session defaults judged as the service would, secrets, exposure."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from relay.errors import ConfigError
from relay.ops.check import check_config, exposure_warnings
from relay.ops.config import parse_config
from relay.ops.watch import watch_file
from relay.session.schema import ga_path, preview_path

HASH = "sha256:" + "a" * 64
FILE = """
[server]
host = "{host}"
[deployments.ga]
endpoint = "https://res.openai.azure.com"
credential = {{ env = "AZ_KEY" }}
[deployments.ga.session]
{ga_session}
[deployments.preview]
endpoint = "https://res.openai.azure.com"
credential = {{ env = "AZ_KEY" }}
protocol = "preview"
[deployments.preview.session]
{preview_session}
[teams.t1]
keys = ["{hash}"]
deployments = ["ga", "preview"]
[teams.t1.session]
{team_session}
"""


def write(tmp_path: Path, ga="", preview="", team="", host="127.0.0.1") -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(
        FILE.format(ga_session=ga, preview_session=preview, team_session=team, hash=HASH, host=host)
    )
    return path


def problems(path: Path, environ=None, strict=True) -> list[str]:
    with pytest.raises(ConfigError) as info:
        check_config(path, {"AZ_KEY": "k"} if environ is None else environ, strict=strict)
    return info.value.problems


def test_session_defaults_the_service_would_refuse_are_all_reported(tmp_path):
    path = write(
        tmp_path,
        ga='audio.output.voice = 7\naudio.input.format = { type = "audio/wav" }\n'
        'audio.input.turn_detection = { type = "server_vad", threshold = 3 }',
        preview='audio.input.turn_detection = { type = "magic" }',
        team="max_output_tokens = 99999",
    )
    found = problems(path)
    refuses = f"{path}: {{}}: the service refuses this default: "
    assert found == [
        refuses.format("deployments.ga.session.audio.input.format.type")
        + "Invalid value: 'audio/wav'. Supported values are: 'audio/pcm', 'audio/pcmu', "
        "'audio/pcma'.",
        refuses.format("deployments.ga.session.audio.input.turn_detection.threshold")
        + "Invalid value: 3.",
        refuses.format("deployments.ga.session.audio.output.voice")
        + "Invalid value: 7. Supported values are: 'alloy', 'ash', 'ballad', 'coral', 'echo', "
        "'sage', 'shimmer', 'verse', 'marin', 'cedar'.",
        refuses.format("deployments.preview.session.audio.input.turn_detection.type")
        + "Invalid value: 'magic'. Supported values are: 'server_vad', 'semantic_vad'.",
        refuses.format("teams.t1.session.max_output_tokens (on deployment ga)")
        + "Invalid value: 99999.",
        refuses.format("teams.t1.session.max_output_tokens (on deployment preview)")
        + "Invalid value: 99999.",
    ]


def test_good_defaults_pass_in_both_dialects(tmp_path):
    path = write(
        tmp_path,
        ga='audio.output.voice = "marin"\noutput_modalities = ["text"]',
        preview='audio.output.format = { type = "audio/pcmu" }\naudio.output.voice = "ash"',
        team='instructions = "Be brief."',
    )
    checked = check_config(path, {"AZ_KEY": "k"}, strict=True)
    assert checked.warnings == []


def test_table_problems_and_default_problems_come_in_one_report(tmp_path):
    path = write(tmp_path, ga="audio.output.voice = 7")
    path.write_text(path.read_text() + "\n[limits]\nmax_sessions = 0\n")
    found = problems(path)
    assert len(found) == 2
    assert found[0].endswith("limits: max_sessions must be greater than 0")
    assert "deployments.ga.session.audio.output.voice" in found[1]


def test_a_policy_path_that_names_no_field_is_refused(tmp_path):
    """A typo in a rule's path held nothing: the client set the voice or the transcription
    model the team meant to restrict, and `check-config --strict` said nothing."""
    path = write(tmp_path)
    path.write_text(
        path.read_text()
        + '[deployments.ga.policy]\nlocked = ["audio.input.transcripton.model", "instructions"]\n'
        'allowed_values = { "audio.output.voise" = ["alloy"], "audio.output.voice" = ["alloy"] }\n'
        "[teams.t1.policy]\n"
        'max_values = { "audio.output.speeed" = 1.2, "audio.output.speed" = 1.2 }\n'
        'locked = ["audio.input.turn_detection.eagerness", "audio.input.turn_detection.silence_duration_ms"]\n'
    )
    found = problems(path)
    assert found == [
        f"{path}: deployments.ga.policy.locked: 'audio.input.transcripton.model' is not a "
        "session field (the rule would hold nothing)",
        f"{path}: deployments.ga.policy.allowed_values: 'audio.output.voise' is not a session "
        "field (the rule would hold nothing)",
        f"{path}: teams.t1.policy.max_values: 'audio.output.speeed' is not a session field "
        "(the rule would hold nothing)",
    ]  # a field of either turn detection type is one


def test_missing_secrets_fail_only_when_strict(tmp_path):
    path = write(tmp_path)
    assert problems(path, {}) == [
        "environment: deployments.ga.credential: environment variable AZ_KEY is not set or empty",
        "environment: deployments.preview.credential: "
        "environment variable AZ_KEY is not set or empty",
    ]
    loose = check_config(path, {}, strict=False)
    assert len(loose.warnings) == 2


def test_listening_beyond_loopback_warns_about_origins_and_clear_text():
    data = {
        "server": {"host": "0.0.0.0"},
        "deployments": {"d": {"endpoint": "simulator"}},
        "teams": {"t": {"keys": [HASH], "deployments": ["d"]}},
    }
    warnings = exposure_warnings(parse_config(data, source="x"))
    assert [w.split(":")[0] for w in warnings] == [
        "server.host = '0.0.0.0' listens beyond loopback with every Origin allowed",
        "server.host = '0.0.0.0' listens beyond loopback without TLS and without a trusted proxy in front",
    ]
    data["server"] = {
        "host": "0.0.0.0",
        "allowed_origins": ["https://app.example.com"],
        "trusted_proxies": ["10.0.0.0/8"],
    }
    assert exposure_warnings(parse_config(data, source="x")) == []
    for host in ("127.0.0.1", "::1", "localhost"):
        data["server"] = {"host": host}
        assert exposure_warnings(parse_config(data, source="x")) == []


@pytest.mark.parametrize(
    "ga", ["audio.output.voice", "audio.input.turn_detection.type", "max_output_tokens"]
)
def test_ga_path_inverts_preview_path(ga):
    assert ga_path(preview_path(ga)) == ga


async def test_a_configmap_style_symlink_swap_is_noticed(tmp_path):
    """Kubernetes updates a ConfigMap volume by repointing `..data` at a new directory."""
    first, second = tmp_path / "..2026_1", tmp_path / "..2026_2"
    for folder, text in ((first, "a = 1\n"), (second, "a = 2\n")):
        folder.mkdir()
        (folder / "relay.toml").write_text(text)
        os.utime(folder / "relay.toml", ns=(0, 0))  # same mtime: only the inode differs
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "relay.toml").symlink_to("..data/relay.toml")
    changed = asyncio.Event()

    async def on_change() -> None:
        changed.set()

    watch = asyncio.ensure_future(watch_file(tmp_path / "relay.toml", on_change, poll_seconds=0.01))
    try:
        (tmp_path / "..data_tmp").symlink_to(second.name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")  # atomic, as kubelet does
        await asyncio.wait_for(changed.wait(), timeout=5)
    finally:
        watch.cancel()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "is not set or empty"),
        ("redis://:hunter2-password@127.0.0.1:19o03/0", "is not a Redis URL"),
        ("http://127.0.0.1:6379", "is not a Redis URL"),
        ("redis://:hunter2-password@127.0.0.1:6379/0", None),
        ("unix:///run/redis.sock", None),
    ],
)
def test_a_redis_url_is_checked_without_being_quoted(url, problem):
    """A malformed URL passed `check-config --strict` and then crashed `serve` with a
    traceback; the problem never quotes the URL (it may hold a password)."""
    from relay.ops.check import redis_url_problem

    found = redis_url_problem("RELAY_REDIS_URL", {"RELAY_REDIS_URL": url})
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found and "hunter2" not in found


def test_budgets_summed_in_the_process_are_warned_about(tmp_path):
    """With the memory backend a restart forgot a team's spend (over budget, then a new
    session after the restart), and every worker held its own budget: said, not silent."""
    path = write(tmp_path)
    budget = "[teams.t1.limits]\nmax_usd_per_day = 5.0\n"
    prices = "".join(f"[deployments.{d}.prices]\noutput_audio = 64.0\n" for d in ("ga", "preview"))
    path.write_text(path.read_text() + prices + budget)
    [warning] = check_config(path, {"AZ_KEY": "k"}, strict=True).warnings
    assert warning.startswith("teams t1 have spend budgets summed in the process")
    path.write_text(path.read_text() + '[admission]\nbackend = "redis"\n')
    environ = {"AZ_KEY": "k", "RELAY_REDIS_URL": "redis://127.0.0.1:6379"}
    assert check_config(path, environ, strict=True).warnings == []
