"""Command line: serve, reload, simulate, talk, check-config, hash-key, keys new."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import signal
import sys
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson
import structlog

from relay.edge.auth import hash_key, new_key
from relay.errors import ConfigError, StartupError
from relay.ops.check import ConfigSource, check_config
from relay.ops.config import RelayConfig, masked_config
from relay.ops.descriptors import raise_limit
from relay.ops.logsetup import bind_process_fields, configure_logging, flush_logs
from relay.ops.redaction import SECRETS
from relay.ops.workers import worker_count
from relay.talk import command as talk

DEFAULT_CONFIG = "config/local.toml"
_log = structlog.get_logger("relay.cli")
# Without limits.max_sessions, a limit for fewer sessions than this is worth a warning.
_SESSIONS_EXPECTED = 500
T = TypeVar("T")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args, os.environ))
    except ConfigError as exc:
        shown = exc.problems[0] if len(exc.problems) == 1 else exc
        print(f"relay: {shown}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the relay")
    serve.add_argument(
        "--config",
        default=os.environ.get("RELAY_CONFIG", DEFAULT_CONFIG),
        help=f"TOML config file (default: $RELAY_CONFIG or {DEFAULT_CONFIG})",
    )
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides server.port)")
    serve.add_argument(
        "--metrics-port", type=int, help="metrics listener port (overrides metrics.port)"
    )
    serve.add_argument(
        "--workers",
        type=worker_count,
        default=1,
        help="processes sharing the port (SO_REUSEPORT); 'auto' = one per CPU (default: 1)",
    )
    serve.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by the supervisor
    # The config in force, which a worker starts with (`Supervisor.keep_in_force`); reloads
    # read --config.
    serve.add_argument("--start-config", help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)

    simulate = commands.add_parser("simulate", help="run the simulated Azure realtime service")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, default=8081)
    simulate.add_argument(
        "--key-env",
        default="RELAY_SIMULATOR_KEY",
        help="environment variable holding the api-key the simulator accepts",
    )
    simulate.add_argument(
        "--speed", type=float, default=1.0, help="audio pacing: 1 real time, 0 unpaced"
    )
    simulate.add_argument(
        "--max-session-seconds",
        type=float,
        default=3600.0,
        help="session lifetime, then session_expired and close 1001 (default: 3600, as Azure)",
    )
    simulate.add_argument(
        "--tool-trigger", help="a phrase that makes the simulated model call the first tool"
    )
    simulate.set_defaults(func=_simulate)

    reloading = commands.add_parser(
        "reload",
        help="have a running relay re-read its config (by its pid file, or its admin endpoint)",
    )
    reloading.add_argument(
        "--config",
        help="the running relay's config: checked first, and its server.pid_file used "
        "(default: $RELAY_CONFIG or config/local.toml; with --pid-file, none is checked)",
    )
    reloading.add_argument("--pid-file", help="the relay's pid file (default: server.pid_file)")
    reloading.add_argument(
        "--url", help="the relay's base URL: reload through POST /admin/reload instead"
    )
    reloading.add_argument(
        "--key-env",
        default="RELAY_ADMIN_KEY",
        help="with --url: environment variable holding an admin key (default: RELAY_ADMIN_KEY)",
    )
    reloading.set_defaults(func=_reload)

    talk.add_parser(commands)

    check = commands.add_parser("check-config", help="validate a config, print it masked")
    check.add_argument("file")
    check.add_argument(
        "--strict", action="store_true", help="missing secrets are problems, not warnings"
    )
    check.set_defaults(func=_check_config)

    hashing = commands.add_parser("hash-key", help="read a relay key on stdin, print its hash")
    hashing.set_defaults(func=_hash_key)

    keys = commands.add_parser("keys", help="relay keys").add_subparsers(
        required=True, metavar="ACTION"
    )
    new_key = keys.add_parser("new", help="make a fresh key; print it once, and its hash")
    new_key.add_argument("--team", required=True, help="the team the key is for")
    new_key.set_defaults(func=_new_key)
    return parser


def _serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    overrides = dict(environ)
    if args.host:
        overrides["RELAY_SERVER__HOST"] = f'"{args.host}"'
    if args.port is not None:
        overrides["RELAY_SERVER__PORT"] = str(args.port)
    if args.metrics_port is not None:
        overrides["RELAY_METRICS__PORT"] = str(args.metrics_port)
    source = ConfigSource(args.config, overrides)
    checked = check_config(args.start_config or args.config, overrides, strict=True)
    config = checked.config
    configure_logging(config.logging.level, config.logging.format)
    if args.worker is None:  # the supervisor has said it already
        for warning in checked.warnings:
            _log.warning("config_warning", warning=warning)
        _raise_descriptor_limit(config)  # workers inherit it
    from relay.server import run_server

    if args.worker is not None:
        bind_process_fields(worker=args.worker)
        _run(run_server(config, environ, source=source, worker=True))
        return 0
    if args.workers > 1:
        from relay.ops.workers import Supervisor

        async def supervise() -> int:
            cli_overrides = {k: v for k, v in overrides.items() if k not in environ}
            supervisor = Supervisor(config, source, environ, args.workers, overrides=cli_overrides)
            return await supervisor.run(on_ready=lambda url: _banner(config, url))

        return _run(supervise())
    _run(run_server(config, environ, source=source, on_ready=lambda url: _banner(config, url)))
    return 0


def _raise_descriptor_limit(config: RelayConfig) -> None:
    limit = raise_limit()
    sessions = limit.sessions
    _log.info(
        "descriptor_limit",
        soft=limit.soft,
        hard=limit.hard,
        raised_from=limit.was if limit.was != limit.soft else None,
        sessions=sessions,
    )
    wanted = config.limits.max_sessions or _SESSIONS_EXPECTED
    if sessions is not None and sessions < wanted:
        _log.warning(
            "descriptor_limit_low",
            sessions=sessions,
            wanted=wanted,
            hint="raise the hard open-files limit (ulimit -Hn; LimitNOFILE= in systemd, "
            "--ulimit nofile= in Docker); sessions past it are refused with 503",
        )


def _run(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed (it is a dependency on Linux and macOS): the
    relay's cost is per frame, and most of it is the event loop's I/O."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _banner(config: RelayConfig, url: str) -> None:
    """How to talk to a local relay, for the person who started it (`make run`). A relay
    in front of Azure, not on a terminal, says it in its JSON log alone (`relay_listening`):
    a plain line among the JSON ones is one a log pipeline cannot parse."""
    if not (config.uses_simulator or config.simulator.demo_key or sys.stderr.isatty()):
        return
    lines = [f"realtime-relay is listening on {url}"]
    deployment = next(iter(config.deployments))
    if config.uses_simulator:
        lines.append("Upstream: the built-in simulated Azure realtime service (no Azure needed).")
    key = config.simulator.demo_key
    if key:
        team = next(
            (t.name for t in config.teams.values() if hash_key(key) in t.keys), "(no team!)"
        )
        lines += [
            f"Demo key (team {team}): {key}",
            "",
            "Talk to it with the official openai SDK (.venv/bin/python):",
            "",
            "import asyncio",
            "from openai import AsyncOpenAI",
            "",
            "async def main():",
            f'    client = AsyncOpenAI(websocket_base_url="{url}/openai/v1", api_key="{key}")',
            f'    async with client.realtime.connect(model="{deployment}") as conn:',
            '        await conn.session.update(session={"type": "realtime", '
            '"output_modalities": ["text"]})',
            "        await conn.conversation.item.create(item={",
            '            "type": "message", "role": "user",',
            '            "content": [{"type": "input_text", "text": "Hello!"}]})',
            "        await conn.response.create()",
            "        async for event in conn:",
            "            print(event.type)",
            '            if event.type == "response.done":',
            "                break",
            "",
            "asyncio.run(main())",
            "",
            f"Hear a spoken reply: .venv/bin/relay talk examples/hello.wav --url {url}",
        ]
        if config.playground.enabled:
            lines.append(f"Or talk to it in a browser: {_http_url(url)}/playground")
    flush_logs()  # the start-up lines first: the banner is the last thing to read
    print("\n".join(lines) + "\n", file=sys.stderr, flush=True)


def _http_url(ws_url: str) -> str:
    return "http" + ws_url.removeprefix("ws")


def _simulate(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    key = environ.get(args.key_env, "").strip()
    if not key:
        raise ConfigError([f"environment: {args.key_env} must hold the key to accept"])
    configure_logging()
    SECRETS.register(key)
    from relay.simulator import SimulatorOptions, start_simulator

    async def run() -> None:
        simulator = await start_simulator(
            SimulatorOptions(
                api_keys=frozenset([key]),
                speed=args.speed,
                max_session_seconds=args.max_session_seconds,
                tool_trigger=args.tool_trigger,
            ),
            args.host,
            args.port,
        )
        print(f"simulated Azure realtime service on {simulator.url}", file=sys.stderr, flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await simulator.close()

    _run(run())
    return 0


def _check_config(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    checked = check_config(args.file, environ, strict=args.strict)
    sys.stdout.buffer.write(orjson.dumps(masked_config(checked.config), option=orjson.OPT_INDENT_2))
    sys.stdout.write("\n")
    for warning in checked.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _reload(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    if args.url:
        return _reload_by_url(args.url, environ.get(args.key_env, "").strip(), args.key_env)
    config_file = args.config or environ.get("RELAY_CONFIG") or None
    path: Path | None = Path(args.pid_file) if args.pid_file else None
    if config_file is not None or path is None:
        # Problems: exit 2 here. Secrets are the relay's, judged where it runs (it refuses a
        # reload that lacks them): here, where the operator's shell may lack them, warnings.
        config_file = config_file or DEFAULT_CONFIG
        checked = check_config(config_file, environ, strict=False)
        for warning in checked.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        path = path or checked.config.server.pid_file
    if path is None:
        raise StartupError(
            "no pid file to find the relay by: set server.pid_file, or pass --pid-file or --url"
        )
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot signal the relay in {path}: {exc}") from exc
    print(f"relay (pid {pid}) is reloading its config; its log says the outcome")
    return 0


def _reload_by_url(url: str, key: str, key_env: str) -> int:
    if not key:
        raise StartupError(f"--url needs an admin key in ${key_env}")
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url.rstrip("/") + "/admin/reload",
        method="POST",
        headers={"Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    except OSError as exc:
        raise StartupError(f"cannot reach the relay at {url}: {exc}") from exc
    print(body.decode("utf-8", "replace"))
    outcome = orjson.loads(body).get("outcome") if body.startswith(b"{") else None
    if outcome == "rejected":
        return 2  # as `--config` exits on a file with problems
    return 0 if outcome in ("applied", "unchanged", "passed_to_every_worker") else 1


def _hash_key(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    key = getpass.getpass("relay key: ") if sys.stdin.isatty() else sys.stdin.readline()
    key = key.strip()
    if not key:
        print("relay: no key on stdin", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


def _new_key(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    key = new_key()
    print(f"New relay key for team {args.team} (shown once: hand it over now, it is not stored):")
    print(f"  {key}")
    print(f"Add its hash to [teams.{args.team}] keys, then reload (`relay reload`):")
    print(f'  "{hash_key(key)}"')
    return 0
