"""The relay's own TLS certificate renewed on disk: put in use without a restart, and its
expiry exported. A real process, real TLS (trustme), certificate files swapped as a
Kubernetes Secret volume swaps them (a new file moved into place)."""

from __future__ import annotations

import asyncio
import datetime
import os
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import trustme

from tests.helpers import read_until
from tests.processes import relay_process, simulator_config

KEY = "rk-tls-demo"
NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _install(leaf: trustme.LeafCert, directory: Path, *, key_of: trustme.LeafCert | None = None):
    """Write the pair to new files and move them into place (each move atomic)."""
    for name, blob in (
        ("tls.crt", leaf.cert_chain_pems[0].bytes()),
        ("tls.key", (key_of or leaf).private_key_pem.bytes()),
    ):
        staged = directory / f".{name}.new"
        staged.write_bytes(blob)
        os.replace(staged, directory / name)


def _expiring(ca: trustme.CA, days: int) -> trustme.LeafCert:
    return ca.issue_cert("127.0.0.1", not_after=NOW + datetime.timedelta(days=days))


async def _served_expiry(port: int, client_ssl: ssl.SSLContext) -> str:
    """The notAfter of the certificate a new connection is served."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ssl)
    try:
        peer: Any = writer.get_extra_info("peercert")
        return str(peer["notAfter"])
    finally:
        writer.close()


async def _next(lines: asyncio.Queue[dict[str, Any]], event: str) -> dict[str, Any]:
    """The next log line of ``event``. (A poll may catch a pair half moved, and fail once
    before the next loads it.)"""
    while (line := await lines.get())["event"] != event:
        pass
    return line


async def _expiry_metric(http: aiohttp.ClientSession, metrics_url: str) -> float:
    async with http.get(metrics_url) as scrape:
        text = await scrape.text()
    [line] = [s for s in text.splitlines() if s.startswith("relay_tls_certificate_expiry_")]
    return float(line.split()[-1])


def _days(days: int) -> float:
    return (NOW + datetime.timedelta(days=days)).timestamp()


async def test_a_renewed_certificate_is_served_to_new_connections_and_open_sessions_go_on(
    tmp_path,
):
    ca = trustme.CA()
    directory = tmp_path / "tls"
    directory.mkdir()
    _install(_expiring(ca, 10), directory)
    config = tmp_path / "relay.toml"
    config.write_text(
        simulator_config(KEY)
        + f'[server.tls]\ncert_file = "{directory / "tls.crt"}"\n'
        + f'key_file = "{directory / "tls.key"}"\n'
    )
    client_ssl = ssl.create_default_context()
    ca.configure_trust(client_ssl)
    log = bytearray()
    lines: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    env = {"RELAY_SIMULATOR_KEY": "sim-key"}
    async with (
        relay_process(config, env, stdout=log, lines=lines) as (_, base),
        aiohttp.ClientSession() as http,
        asyncio.timeout(60),  # a bound: each wait below is for a log line
    ):
        port = int(base.rsplit(":", 1)[1])
        started = [orjson.loads(line) for line in bytes(log).splitlines()]
        [metrics_url] = [line["url"] for line in started if line["event"] == "metrics_listening"]
        assert await _expiry_metric(http, metrics_url) == _days(10)
        before = await _served_expiry(port, client_ssl)
        url = f"wss://127.0.0.1:{port}/openai/v1/realtime?model=gpt-realtime"
        session = await http.ws_connect(url, headers={"api-key": KEY}, ssl=client_ssl)
        await read_until(session, "session.created")

        _install(_expiring(ca, 90), directory)
        loaded = await _next(lines, "tls_certificate_loaded")
        assert loaded["not_after"] == _days(90)
        assert await _served_expiry(port, client_ssl) != before
        assert await _expiry_metric(http, metrics_url) == _days(90)
        # The session opened before the renewal goes on over its own connection.
        await session.send_str('{"type":"session.update","session":{"type":"realtime"}}')
        await read_until(session, "session.updated")
        await session.close()

        # A certificate whose key is not in place yet is refused; the one in use stays.
        renewed = await _served_expiry(port, client_ssl)
        stray, final = _expiring(ca, 120), _expiring(ca, 180)
        _install(stray, directory, key_of=final)
        failed = await _next(lines, "tls_certificate_reload_failed")
        assert failed["error"].startswith("SSLError")
        assert await _served_expiry(port, client_ssl) == renewed
        assert await _expiry_metric(http, metrics_url) == _days(90)
        _install(final, directory)
        loaded = await _next(lines, "tls_certificate_loaded")
        assert loaded["not_after"] == _days(180)
        assert await _expiry_metric(http, metrics_url) == _days(180)
