"""The README's quick start: `relay serve` with config/local.toml, and the snippet it prints."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


async def test_the_printed_snippet_talks_to_the_relay(tmp_path):
    env = {
        **os.environ,
        "RELAY_SIMULATOR_KEY": "local-simulator-key",
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
    finally:
        relay.terminate()
        assert await relay.wait() == 0
