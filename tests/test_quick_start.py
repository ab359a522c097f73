"""The README's quick start: `relay serve` with config/local.toml, and the snippet it prints."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from pathlib import Path

import aiohttp

ROOT = Path(__file__).parent.parent


async def test_the_printed_snippet_talks_to_the_relay(tmp_path):
    # Outside `make`: no RELAY_SIMULATOR_KEY, the in-process simulator needs none.
    env = {
        **{k: v for k, v in os.environ.items() if k != "RELAY_SIMULATOR_KEY"},
        "RELAY_METRICS__PORT": "0",
        "RELAY_LOGGING__FORMAT": "json",
    }
    relay = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--config", str(ROOT / "config" / "local.toml"),
        "--port", "0",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )  # fmt: skip
    try:
        assert relay.stderr is not None
        banner = []
        while not banner or banner[-1] != "asyncio.run(main())":
            line = await relay.stderr.readline()
            assert line, "the relay exited before printing its banner:\n" + "\n".join(banner)
            banner.append(line.decode().rstrip("\n"))
        assert banner[0].startswith("realtime-relay is listening on ws://127.0.0.1:")
        assert any(line.startswith("Demo key (team demo): rk-local-demo") for line in banner)
        snippet = "\n".join(banner[banner.index("import asyncio") :])
        (tmp_path / "snippet.py").write_text(snippet)
        client = await asyncio.create_subprocess_exec(
            sys.executable, str(tmp_path / "snippet.py"), stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(client.communicate(), timeout=30)
        events = out.decode().split()
        assert client.returncode == 0
        assert events[0] == "session.created" and events[-1] == "response.done"
        assert "response.output_text.delta" in events
        await _talk_as_printed(relay.stderr, tmp_path)
    finally:
        relay.terminate()
        assert await relay.wait() == 0


async def _talk_as_printed(banner: asyncio.StreamReader, tmp_path: Path) -> None:
    """The banner's next lines: `relay talk` (run as printed) and the playground's URL."""
    lines = [(await banner.readline()).decode().rstrip("\n") for _ in range(3)]
    assert lines[0] == ""
    talk_prefix, playground_prefix = "Hear a spoken reply: ", "Or talk to it in a browser: "
    assert lines[1].startswith(talk_prefix) and lines[2].startswith(playground_prefix)
    out = tmp_path / "reply.wav"
    command = [*shlex.split(lines[1].removeprefix(talk_prefix)), "--out", str(out)]
    assert command[0] == ".venv/bin/relay"
    command[0] = str(Path(sys.executable).parent / "relay")  # the same venv, wherever it is
    talk = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE, cwd=ROOT)
    out_text, _ = await asyncio.wait_for(talk.communicate(), timeout=30)
    assert talk.returncode == 0
    assert (
        "assistant: You said: Hello, this is 3.0 seconds of simulated speech." in out_text.decode()
    )
    assert out.stat().st_size > 24000 * 2  # over a second of 24 kHz PCM16
    async with aiohttp.ClientSession() as http:
        async with http.get(lines[2].removeprefix(playground_prefix)) as page:
            assert page.status == 200 and "realtime-relay playground" in await page.text()
