"""Command line: serve, simulate, talk, check-config, hash-key."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import orjson
import structlog

from relay.edge.auth import hash_key
from relay.errors import ConfigError
from relay.ops.config import RelayConfig, load_config, masked_config
from relay.ops.logsetup import configure_logging
from relay.ops.workers import worker_count
from relay.talk import command as talk
from relay.upstream.backends import build_credentials

DEFAULT_CONFIG = "config/local.toml"
T = TypeVar("T")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args, os.environ))
    except ConfigError as exc:
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
        "--workers",
        type=worker_count,
        default=1,
        help="processes sharing the port (SO_REUSEPORT); 'auto' = one per CPU (default: 1)",
    )
    serve.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by the supervisor
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
    simulate.set_defaults(func=_simulate)

    talk.add_parser(commands)

    check = commands.add_parser("check-config", help="validate a config, print it masked")
    check.add_argument("file")
    check.set_defaults(func=_check_config)

    hashing = commands.add_parser("hash-key", help="read a relay key on stdin, print its hash")
    hashing.set_defaults(func=_hash_key)
    return parser


def _serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    overrides = dict(environ)
    if args.host:
        overrides["RELAY_SERVER__HOST"] = f'"{args.host}"'
    if args.port is not None:
        overrides["RELAY_SERVER__PORT"] = str(args.port)
    config = load_config(args.config, overrides)
    configure_logging(config.logging.level, config.logging.format)
    from relay.server import run_server

    if args.worker is not None:
        structlog.contextvars.bind_contextvars(worker=args.worker)
        _run(run_server(config, environ, worker=True))
        return 0
    if args.workers > 1:
        from relay.ops.workers import Supervisor

        async def supervise() -> int:
            cli_overrides = {k: v for k, v in overrides.items() if k not in environ}
            supervisor = Supervisor(
                config, args.config, environ, args.workers, overrides=cli_overrides
            )
            return await supervisor.run(on_ready=lambda url: _banner(config, url))

        return _run(supervise())
    _run(run_server(config, environ, on_ready=lambda url: _banner(config, url)))
    return 0


def _run(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed (it is a dependency on Linux and macOS): the
    relay's cost is per frame, and most of it is the event loop's I/O."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _banner(config: RelayConfig, url: str) -> None:
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
    print("\n".join(lines) + "\n", file=sys.stderr, flush=True)


def _http_url(ws_url: str) -> str:
    return "http" + ws_url.removeprefix("ws")


def _simulate(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    key = environ.get(args.key_env, "").strip()
    if not key:
        raise ConfigError([f"environment: {args.key_env} must hold the key to accept"])
    configure_logging()
    from relay.simulator import SimulatorOptions, start_simulator

    async def run() -> None:
        simulator = await start_simulator(
            SimulatorOptions(api_keys=frozenset([key]), speed=args.speed), args.host, args.port
        )
        print(f"simulated Azure realtime service on {simulator.url}", file=sys.stderr, flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await simulator.close()

    _run(run())
    return 0


def _check_config(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    config = load_config(args.file, environ)
    sys.stdout.buffer.write(orjson.dumps(masked_config(config), option=orjson.OPT_INDENT_2))
    sys.stdout.write("\n")
    try:
        build_credentials(config, environ)
    except ConfigError as exc:
        print("warning: secrets missing from this environment:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
    return 0


def _hash_key(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    key = getpass.getpass("relay key: ") if sys.stdin.isatty() else sys.stdin.readline()
    key = key.strip()
    if not key:
        print("relay: no key on stdin", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0
