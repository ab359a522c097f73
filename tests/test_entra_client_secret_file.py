"""An Entra client secret read from a file and read again when it changes: azure-identity's
real ClientSecretCredential against a fake Entra token endpoint over real TLS (trustme)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import trustme
from aiohttp import web
from azure.identity._internal import utils as azure_identity_utils

from relay.ops.config import ConfigError, CredentialConfig, parse_config
from relay.upstream.credentials import build_credential
from relay.upstream.entra import EntraCredential
from tests.entra_fake import FakeClientCredentialsEndpoint

SCOPE = "https://cognitiveservices.azure.com/.default"


@pytest.fixture
async def entra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[FakeClientCredentialsEndpoint, dict]]:
    """The fake endpoint, serving TLS; and the options that make azure-identity use it.
    azure-identity asks its endpoint at most once in 30 s per credential: here a refresh
    right after another must reach the endpoint, to show which secret it presents."""
    monkeypatch.setattr(azure_identity_utils, "DEFAULT_TOKEN_REFRESH_RETRY_DELAY", 0)
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    fake = FakeClientCredentialsEndpoint("first-secret")
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    yield fake, {"authority": f"127.0.0.1:{port}", "connection_verify": str(ca_file)}
    await runner.cleanup()


def config(secret_file: Path) -> CredentialConfig:
    return CredentialConfig(
        type="entra",
        method="client-secret",
        client_id="app",
        tenant_id="tenant",
        client_secret_file=secret_file,
    )


async def started(secret_file: Path, options: dict[str, Any]) -> EntraCredential:
    credential = EntraCredential(config(secret_file), {}, credential_options=options)
    await credential.start()
    return credential


async def test_a_rotated_secret_is_used_once_the_endpoint_takes_it(entra, tmp_path: Path):
    fake, options = entra
    secret_file = tmp_path / "client-secret"
    secret_file.write_text("first-secret\n")
    credential = await started(secret_file, options)
    try:
        assert credential.usable
        assert fake.used == ["first-secret"]
        assert await credential.headers() == {"Authorization": f"Bearer {fake.issued[-1]}"}
        watch = credential._secret_watch
        assert watch is not None and not watch.done()  # polls the file (ops.watch)

        # The new secret is added in Entra, then written to the file.
        fake.accepted.add("second-secret")
        secret_file.write_text("second-secret")
        with structlog.testing.capture_logs() as logs:
            assert await credential.reload_secret() is True
        assert fake.used[-1] == "second-secret"
        assert await credential.headers() == {"Authorization": f"Bearer {fake.issued[-1]}"}
        assert [e["event"] for e in logs if "secret" in e["event"]] == [
            "entra_client_secret_reloaded"
        ]
        # The refreshes that follow use it; the old secret can be removed in Entra.
        fake.accepted.discard("first-secret")
        assert await credential.refresh() is True
        assert fake.used[-1] == "second-secret"
        # The same file again (touched, rewritten) changes nothing.
        secret_file.write_text("second-secret\n")
        assert await credential.reload_secret() is False
    finally:
        await credential.close()
    assert watch.done()


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("a-secret-entra-refuses", "ClientAuthenticationError: Microsoft Entra ID error"),
        ("", "is empty"),
    ],
    ids=["refused", "emptied"],
)
async def test_a_secret_that_does_not_work_leaves_the_old_one_in_use(
    entra, tmp_path: Path, content: str, error: str
):
    fake, options = entra
    secret_file = tmp_path / "client-secret"
    secret_file.write_text("first-secret")
    credential = await started(secret_file, options)
    try:
        held = await credential.headers()
        secret_file.write_text(content)
        with structlog.testing.capture_logs() as logs:
            assert await credential.reload_secret() is False
        [line] = [e for e in logs if e["event"] == "entra_client_secret_reload_failed"]
        assert error in line["error"]
        assert line["file"] == str(secret_file)
        assert "a-secret-entra-refuses" not in repr(logs)
        assert await credential.headers() == held
        assert await credential.refresh() is True
        assert fake.used[-1] == "first-secret"  # still the secret in use
    finally:
        await credential.close()


async def test_the_config_builds_it_from_the_file(tmp_path: Path):
    secret_file = tmp_path / "client-secret"
    secret_file.write_text("first-secret")
    credential = build_credential(config(secret_file), {})
    try:
        assert isinstance(credential, EntraCredential)
        described = credential.describe()
        assert described["client_secret_file"] == str(secret_file)
        assert "first-secret" not in repr(credential) + repr(described)
    finally:
        await credential.close()


async def test_a_missing_or_empty_file_stops_start_up(tmp_path: Path):
    with pytest.raises(ValueError, match="client secret file .*absent.* cannot be read"):
        EntraCredential(config(tmp_path / "absent"), {})
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ValueError, match="client secret file .*empty is empty"):
        EntraCredential(config(tmp_path / "empty"), {})


def test_the_secret_comes_from_the_environment_or_a_file_not_both():
    def problems(**credential: Any) -> list[str]:
        data = {
            "deployments": {
                "d": {"endpoint": "https://x.openai.azure.com", "credential": credential}
            },
            "teams": {"t": {"keys": [f"sha256:{'0' * 64}"], "deployments": ["d"]}},
        }
        try:
            parse_config(data, source="relay.toml")
        except ConfigError as exc:
            return exc.problems
        return []

    entra = {"type": "entra", "method": "client-secret", "client_id": "c", "tenant_id": "t"}
    expected = (
        "relay.toml: deployments.d.credential: method client-secret needs client_secret_env "
        "or client_secret_file (one)"
    )
    assert problems(**entra) == [expected]
    assert problems(**entra, client_secret_env="S", client_secret_file="/s") == [expected]
    assert problems(**entra, client_secret_file="/s") == []
    assert problems(type="entra", method="default", client_secret_file="/s") == [
        "relay.toml: deployments.d.credential: client_secret_file is for type entra, "
        "method client-secret only"
    ]
