"""The command line as an operator meets it: one-line start-up errors (exit 2), check-config,
keys new, reload."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
import trustme

from relay.cli import _banner, main
from relay.edge.auth import hash_key
from tests.helpers import relay_config
from tests.processes import free_port

ROOT = Path(__file__).parent.parent
GOOD = """
[deployments.gpt-realtime]
endpoint = "https://res.openai.azure.com"
credential = { env = "AZ_TEST_KEY" }
[deployments.gpt-realtime.session]
audio.output.voice = "marin"
[teams.demo]
keys = ["sha256:7a5a002bd21c09c6da9c7275872a942d4107a5b52671e730c20eadf978a06ba5"]
deployments = ["gpt-realtime"]
"""


def run(capsys, *argv: str, environ: dict[str, str] | None = None) -> tuple[int, str, str]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(environ or {})
    try:
        code = main(list(argv))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    out, err = capsys.readouterr()
    return code, out, err


def test_keys_new_prints_a_fresh_key_once_and_its_hash_line(capsys):
    code, out, _ = run(capsys, "keys", "new", "--team", "support")
    assert code == 0
    lines = out.splitlines()
    key = lines[1].strip()
    assert key.startswith("rk-") and len(key) > 40
    assert "[teams.support]" in lines[2]
    assert lines[3].strip() == f'"{hash_key(key)}"'
    _, again, _ = run(capsys, "keys", "new", "--team", "support")
    assert again.splitlines()[1].strip() != key


def test_check_config_is_strict_about_secrets_only_when_asked(capsys, tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text(GOOD)
    code, out, err = run(capsys, "check-config", str(path))
    assert code == 0 and '"voice": "marin"' in out
    assert "AZ_TEST_KEY is not set or empty" in err
    code, _, err = run(capsys, "check-config", "--strict", str(path))
    assert code == 2
    assert err == (
        "relay: environment: deployments.gpt-realtime.credential: "
        "environment variable AZ_TEST_KEY is not set or empty\n"
    )
    code, _, err = run(capsys, "check-config", "--strict", str(path), environ={"AZ_TEST_KEY": "k"})
    assert (code, err) == (0, "")


def test_tls_files_that_cannot_be_loaded_are_named_before_start(capsys, tmp_path):
    """A missing or broken certificate, key or upstream CA bundle passed check-config
    --strict, then `relay serve` died with a traceback naming no file (a wrong Secret mount
    crash-looped the pod)."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key, bundle = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)
    ca.cert_pem.write_to_path(bundle)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    environ = {"AZ_TEST_KEY": "k"}
    path = tmp_path / "relay.toml"

    def check(tls: str, ca_file: str, *, strict: bool = True) -> tuple[int, str]:
        path.write_text(
            f'[server]\ntls = {{ cert_file = "{tls[0]}", key_file = "{tls[1]}" }}\n'
            f'[upstream]\nca_file = "{ca_file}"\n' + GOOD
        )
        argv = ("check-config", "--strict", str(path)) if strict else ("check-config", str(path))
        code, _, err = run(capsys, *argv, environ=environ)
        return code, err

    assert check((cert, key), bundle) == (0, "")
    code, err = check((tmp_path / "absent.pem", key), tmp_path / "absent-ca.pem")
    assert code == 2
    assert err.splitlines() == [
        "relay: invalid configuration:",
        f"  server.tls: cert_file {tmp_path}/absent.pem and key_file {key} cannot be "
        "loaded (No such file or directory)",
        f"  upstream.ca_file: {tmp_path}/absent-ca.pem cannot be loaded "
        "(No such file or directory)",
    ]
    code, err = check((garbage, key), bundle)
    assert code == 2 and "not PEM certificates and an unencrypted key that match" in err
    code, err = check((cert, garbage), garbage, strict=False)
    assert code == 0 and err.count("warning: ") == 2  # where the files are not: warnings
    # `relay serve` checks the same way: one line, exit 2, no traceback.
    code, _, err = run(capsys, "serve", "--config", str(path), environ=environ)
    assert code == 2 and "Traceback" not in err and "server.tls: cert_file" in err
    # A reload loads no TLS file (the certificate watcher does): a certificate half-written
    # by a rotation refused every reload, one revoking a leaked key included.
    from relay.ops.check import ConfigSource, check_config

    ConfigSource(path, environ).load(strict=True)
    checked = check_config(path, environ, strict=True, reloading=True)
    assert sum("server.tls: cert_file" in w for w in checked.warnings) == 1
    assert sum("not PEM CA certificates" in w for w in checked.warnings) == 1


def test_check_config_reports_every_problem_at_once(capsys, tmp_path):
    path = tmp_path / "relay.toml"
    broken = GOOD.replace('"marin"', "7").replace(
        "[teams.demo]", "[server]\nport = -1\n[teams.demo]"
    )
    path.write_text(broken)
    code, _, err = run(capsys, "check-config", str(path), environ={"RELAY_SERVR__PORT": "1"})
    assert code == 2
    problems = err.splitlines()[1:]
    assert problems == [
        "  environment: RELAY_SERVR__PORT: unknown variable (there is no setting 'servr')",
        f"  {path}: server: port must be between 0 and 65535",
        f"  {path}: deployments.gpt-realtime.session.audio.output.voice: the service refuses "
        "this default: Invalid value: 7. Supported values are: 'alloy', 'ash', 'ballad', "
        "'coral', 'echo', 'sage', 'shimmer', 'verse', 'marin', 'cedar'.",
    ]


def test_a_missing_file_names_the_path_tried(capsys, tmp_path):
    code, _, err = run(capsys, "serve", "--config", "nowhere.toml")
    assert code == 2
    assert (
        err == f"relay: nowhere.toml (from {Path.cwd()}): cannot read: No such file or directory\n"
    )


def test_reload_checks_the_file_but_leaves_secrets_to_the_relay(capsys, tmp_path):
    """`relay reload --config` refused (exit 2, nothing signalled) where the operator's shell
    lacked the relay's secrets, saying a variable was not set as if the relay had lost it.
    The relay judges its own environment when it reloads."""
    path = tmp_path / "relay.toml"
    pid_file = tmp_path / "relay.pid"
    path.write_text(f'[server]\npid_file = "{pid_file}"\n' + GOOD)
    reloads = []
    previous = signal.signal(signal.SIGHUP, lambda *_: reloads.append(1))
    try:
        pid_file.write_text(str(os.getpid()))
        code, out, err = run(capsys, "reload", "--config", str(path))
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert code == 0 and reloads == [1] and "is reloading" in out
    assert "warning: environment: deployments.gpt-realtime.credential" in err
    # With --pid-file and no --config, no file is checked (it was config/local.toml, which
    # the operator never named, and may not exist).
    previous = signal.signal(signal.SIGHUP, lambda *_: reloads.append(2))
    try:
        code, out, err = run(capsys, "reload", "--pid-file", str(pid_file))
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert (code, reloads, err) == (0, [1, 2], "")
    path.write_text(GOOD.replace('"marin"', "7"))  # a problem in the file: nothing signalled
    code, _, err = run(capsys, "reload", "--config", str(path))
    assert code == 2 and "voice" in err


def test_reload_without_a_pid_file_says_how_to_find_the_relay(capsys, tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text(GOOD)
    code, _, err = run(capsys, "reload", "--config", str(path), environ={"AZ_TEST_KEY": "k"})
    assert code == 2
    assert "set server.pid_file, or pass --pid-file or --url" in err


@pytest.mark.parametrize(
    ("flag", "setting"),
    [("--port", "server.port (--port)"), ("--metrics-port", "metrics.port (--metrics-port)")],
)
async def test_a_busy_port_is_one_line_naming_the_port_and_the_setting(flag, setting):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        other = "--metrics-port" if flag == "--port" else "--port"
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "serve", "--config", "config/local.toml",
            flag, str(port), other, str(free_port()),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )  # fmt: skip
        _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 2
    assert err.decode() == (
        f"relay: cannot listen on 127.0.0.1:{port}: the port is in use by another process; "
        f"change {setting}\n"
    )


def test_a_relay_in_front_of_azure_prints_no_banner_among_its_json_lines(capsys):
    _banner(relay_config("https://example.openai.azure.com"), "ws://127.0.0.1:8080")
    assert capsys.readouterr().err == ""  # pytest's captured stderr is no terminal
    _banner(relay_config("simulator"), "ws://127.0.0.1:8080")
    assert capsys.readouterr().err.startswith("realtime-relay is listening on ws://127.0.0.1:8080")
