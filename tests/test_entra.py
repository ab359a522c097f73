"""EntraCredential: azure-identity's real ManagedIdentityCredential against a fake App Service
identity endpoint on 127.0.0.1, with time driven by hand (tests/entra_fake.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import structlog
from azure.identity.aio import (
    ClientSecretCredential,
    DefaultAzureCredential,
    ManagedIdentityCredential,
    WorkloadIdentityCredential,
)

from relay.errors import CredentialUnavailable
from relay.ops.config import CredentialConfig
from relay.upstream.credentials import build_credential
from relay.upstream.entra import EntraCredential, error_text, refresh_delay, retry_delay
from tests.entra_fake import IDENTITY_HEADER, PATH, FakeIdentityEndpoint, FakeTime

RESOURCE = "https://cognitiveservices.azure.com"
CLIENT_ID = "00000000-0000-0000-0000-00000000c11d"
START = 1_900_000_000.0  # fake epoch seconds: later than now, so azure-identity keeps tokens
MakeCredential = Callable[..., EntraCredential]


class Calls:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime(START)


@pytest.fixture
async def endpoint(
    aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch, fake_time: FakeTime
) -> AsyncIterator[FakeIdentityEndpoint]:
    fake = FakeIdentityEndpoint(fake_time.clock)
    server = await aiohttp_server(fake.app())
    # What App Service sets; ManagedIdentityCredential picks its protocol from these.
    monkeypatch.setenv("IDENTITY_ENDPOINT", str(server.make_url(PATH)))
    monkeypatch.setenv("IDENTITY_HEADER", IDENTITY_HEADER)
    for var in ("IDENTITY_SERVER_THUMBPRINT", "IMDS_ENDPOINT", "MSI_ENDPOINT", "MSI_SECRET"):
        monkeypatch.delenv(var, raising=False)
    yield fake
    fake.release()  # hung requests end before the server stops


@pytest.fixture
async def make_credential(
    endpoint: FakeIdentityEndpoint, fake_time: FakeTime
) -> AsyncIterator[MakeCredential]:
    created: list[EntraCredential] = []

    def make(refresh_before_seconds: float = 300.0, **kwargs: Any) -> EntraCredential:
        config = CredentialConfig(
            type="entra",
            method="managed-identity",
            client_id=CLIENT_ID,
            refresh_before_seconds=refresh_before_seconds,
        )
        options: dict[str, Any] = {
            "clock": fake_time.clock,
            "sleep": fake_time.sleep,
            # azure-core retries a 500 three times, sleeping 1.6 and 3.2 s in between; the
            # credential has its own backoff, and these tests count every request.
            "credential_options": {"retry_total": 0},
            **kwargs,
        }
        credential = EntraCredential(config, {}, **options)
        created.append(credential)
        return credential

    yield make
    for credential in created:
        await credential.close()


# --- the first token -----------------------------------------------------------------------


async def test_an_endpoints_error_quoting_its_header_is_shown_without_it(
    endpoint: FakeIdentityEndpoint, make_credential: MakeCredential
) -> None:
    """`last_error` is shown in /status, which no log filter passes: the App Service
    identity header an endpoint's error quoted was shown as it was."""
    endpoint.failing = True
    endpoint.failure_message = f"header {IDENTITY_HEADER} refused"
    credential = make_credential()
    await credential.start()
    assert IDENTITY_HEADER not in credential.describe()["last_error"]
    assert "header [REDACTED] refused" in credential.describe()["last_error"]


async def test_first_token_fetched_at_start(
    endpoint: FakeIdentityEndpoint, make_credential: MakeCredential, fake_time: FakeTime
) -> None:
    credential = make_credential()
    assert credential.describe()["usable"] is False
    await credential.start()
    assert endpoint.requests == [
        {"api-version": "2019-08-01", "resource": RESOURCE, "client_id": CLIENT_ID}
    ]
    assert endpoint.bad_headers == 0
    assert await credential.headers() == bearer(endpoint.issued[0])
    assert credential.usable
    assert credential.describe() == {
        "type": "entra",
        "method": "managed-identity",
        "usable": True,
        "expires_in_seconds": 3600,
        "refresh_failures": 0,
        "last_error": None,
    }
    assert await fake_time.next_sleep() == 3300  # the refresh is due 300 s before expiry


async def test_headers_serve_the_cache_without_requests(
    endpoint: FakeIdentityEndpoint, make_credential: MakeCredential
) -> None:
    credential = make_credential()
    await credential.start()
    results = await asyncio.gather(*(credential.headers() for _ in range(200)))
    assert results == [bearer(endpoint.issued[0])] * 200
    assert len(endpoint.requests) == 1


async def test_start_with_failing_endpoint_is_not_usable(
    endpoint: FakeIdentityEndpoint, make_credential: MakeCredential, fake_time: FakeTime
) -> None:
    endpoint.failing = True
    failures = Calls()
    credential = make_credential(on_refresh_failure=failures)
    await credential.start()  # no exception: the relay starts, not ready
    assert not credential.usable
    assert failures.count == 1
    with pytest.raises(CredentialUnavailable, match="ClientAuthenticationError"):
        await credential.headers()
    assert credential.describe()["last_error"].startswith("ClientAuthenticationError: ")
    assert await fake_time.next_sleep() == 1

    endpoint.failing = False
    fake_time.wake()
    assert await fake_time.next_sleep() == 3300
    assert await credential.headers() == bearer(endpoint.issued[0])


async def test_hanging_endpoint_times_out(
    endpoint: FakeIdentityEndpoint, make_credential: MakeCredential, fake_time: FakeTime
) -> None:
    endpoint.hang()
    credential = make_credential(fetch_timeout=0.05)
    await credential.start()
    assert not credential.usable
    assert credential.describe()["last_error"] == "FetchTimeout: no answer within 0.05 s"
    assert await fake_time.next_sleep() == 1


# --- refreshing ----------------------------------------------------------------------------


async def test_refresh_ahead_of_expiry_serves_the_new_token(
    endpoint: FakeIdentityEndpoint, make_credential: MakeCredential, fake_time: FakeTime
) -> None:
    credential = make_credential()
    await credential.start()
    first_expiry = START + 3600
    assert await fake_time.pass_sleep() == 3300
    await endpoint.requests_reached(2)
    assert await fake_time.next_sleep() == 3300  # rescheduled from the new token
    assert fake_time.now < first_expiry
    assert await credential.headers() == bearer(endpoint.issued[1])
    assert credential.describe()["expires_in_seconds"] == 3600


async def test_short_lived_token_refreshed_at_half_life(
    endpoint: FakeIdentityEndpoint, make_credential: MakeCredential, fake_time: FakeTime
) -> None:
    endpoint.lifetime = 120  # shorter than refresh_before_seconds
    credential = make_credential()
    await credential.start()
    assert await fake_time.pass_sleep() == 60
    assert await fake_time.next_sleep() == 60
    assert len(endpoint.requests) == 2
    assert await credential.headers() == bearer(endpoint.issued[1])


async def test_concurrent_refresh_triggers_make_one_request(
    endpoint: FakeIdentityEndpoint, make_credential: MakeCredential, fake_time: FakeTime
) -> None:
    credential = make_credential()
    await credential.start()
    await fake_time.next_sleep()
    endpoint.hang()
    loop = asyncio.get_running_loop()
    triggers = [loop.create_task(credential.refresh()) for _ in range(10)]
    await endpoint.requests_reached(2)
    fake_time.wake()  # the background refresh comes due while the fetch is in flight
    await asyncio.sleep(0)  # one loop turn: lets the woken refresh task run (not a wait)
    endpoint.release()
    assert await asyncio.gather(*triggers) == [True] * 10
    assert await fake_time.next_sleep() == 3300
    assert len(endpoint.requests) == 2
    assert await credential.headers() == bearer(endpoint.issued[1])


async def test_refresh_failure_keeps_the_old_token(
    endpoint: FakeIdentityEndpoint, make_credential: MakeCredential, fake_time: FakeTime
) -> None:
    failures = Calls()
    credential = make_credential(on_refresh_failure=failures)
    await credential.start()
    endpoint.failing = True
    assert await fake_time.pass_sleep() == 3300
    assert await fake_time.next_sleep() == 1  # first retry
    assert failures.count == 1
    assert credential.usable
    assert await credential.headers() == bearer(endpoint.issued[0])
    described = credential.describe()
    assert described["refresh_failures"] == 1
    assert described["expires_in_seconds"] == 300
    assert described["last_error"].startswith("ClientAuthenticationError: ")


async def test_token_expires_when_refreshes_keep_failing_then_recovers(
    endpoint: FakeIdentityEndpoint, make_credential: MakeCredential, fake_time: FakeTime
) -> None:
    failures = Calls()
    credential = make_credential(on_refresh_failure=failures)
    await credential.start()
    expiry = START + 3600
    endpoint.failing = True
    await fake_time.pass_sleep()  # the refresh at 3300 s fails
    delays = []
    while True:
        delay = await fake_time.next_sleep()  # asked once the last fetch has failed
        if not credential.usable:
            break
        assert await credential.headers() == bearer(endpoint.issued[0])
        delays.append(delay)
        fake_time.wake()
    # Backoff doubling to 30 s; the last wait ends exactly at expiry, not after it.
    assert delays == [1, 2, 4, 8, 16, *[30] * 8, 29]
    assert fake_time.now == expiry
    assert failures.count == 15
    assert delay == 30
    with pytest.raises(CredentialUnavailable):
        await credential.headers()
    assert credential.describe()["usable"] is False
    assert credential.describe()["expires_in_seconds"] is None

    endpoint.failing = False
    fake_time.wake()
    assert await fake_time.next_sleep() == 3300
    assert await credential.headers() == bearer(endpoint.issued[1])
    assert credential.describe()["last_error"] is None
    assert credential.describe()["refresh_failures"] == 15


async def test_azure_identity_cache_answer_counts_as_not_renewed(
    endpoint: FakeIdentityEndpoint, make_credential: MakeCredential, fake_time: FakeTime
) -> None:
    # Without refresh_in (App Service sends none) azure-identity answers from its cache while
    # the token is far from expiry by the real clock: no request, the same token.
    endpoint.refresh_in = None
    failures = Calls()
    credential = make_credential(on_refresh_failure=failures)
    await credential.start()
    assert await fake_time.pass_sleep() == 3300
    assert await fake_time.next_sleep() == 1
    assert len(endpoint.requests) == 1
    assert failures.count == 1
    assert credential.describe()["last_error"].startswith("TokenNotRenewed: ")
    assert await credential.headers() == bearer(endpoint.issued[0])


async def test_broken_failure_callback_does_not_stop_refreshing(
    endpoint: FakeIdentityEndpoint, make_credential: MakeCredential, fake_time: FakeTime
) -> None:
    def broken() -> None:
        raise RuntimeError("metrics are down")

    endpoint.failing = True
    credential = make_credential(on_refresh_failure=broken)
    with structlog.testing.capture_logs() as logs:
        await credential.start()
    assert "entra_refresh_failure_callback_failed" in [e["event"] for e in logs]
    endpoint.failing = False
    await fake_time.pass_sleep()
    assert await fake_time.next_sleep() == 3300
    assert credential.usable


# --- secrets and shutdown ------------------------------------------------------------------


async def test_tokens_never_in_logs_repr_describe_or_errors(
    endpoint: FakeIdentityEndpoint,
    make_credential: MakeCredential,
    fake_time: FakeTime,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # azure-identity's and azure-core's own logging too
    credential = make_credential()
    seen: list[str] = []
    with structlog.testing.capture_logs() as logs:
        await credential.start()
        seen += [repr(credential), str(credential.describe())]
        endpoint.failing = True
        await fake_time.pass_sleep()
        await fake_time.next_sleep()
        fake_time.now = START + 3600  # expired
        seen += [repr(credential), str(credential.describe())]
        with pytest.raises(CredentialUnavailable) as raised:
            await credential.headers()
        seen.append(str(raised.value))
    events = {e["event"]: e for e in logs}
    assert events["entra_token_refreshed"]["expires_in_seconds"] == 3600
    assert events["entra_token_refresh_failed"]["error_class"] == "ClientAuthenticationError"
    text = "\n".join([*seen, str(logs), caplog.text])
    assert endpoint.issued
    for token in endpoint.issued:
        assert token not in text
    assert "fake-entra-token" not in text
    assert IDENTITY_HEADER not in text


async def test_close_leaves_no_task_and_is_idempotent(
    endpoint: FakeIdentityEndpoint, make_credential: MakeCredential, fake_time: FakeTime
) -> None:
    credential = make_credential()
    await credential.start()
    endpoint.hang()
    await fake_time.pass_sleep()
    await endpoint.requests_reached(2)  # a refresh is in flight, and the background task
    await credential.close()
    await credential.close()
    leftover = [t for t in asyncio.all_tasks() if t.get_name().startswith("entra-")]
    assert leftover == []
    assert await credential.refresh() is False  # nothing starts after close


# --- building the azure-identity credential ------------------------------------------------


def entra_config(method: str, **fields: Any) -> CredentialConfig:
    return CredentialConfig(type="entra", method=method, **fields)  # type: ignore[arg-type]


def test_client_secret_without_its_env_var_names_it() -> None:
    config = entra_config(
        "client-secret", client_id="app", tenant_id="tenant", client_secret_env="RELAY_ENTRA_SECRET"
    )
    with pytest.raises(ValueError, match="RELAY_ENTRA_SECRET"):
        EntraCredential(config, {})
    with pytest.raises(ValueError, match="RELAY_ENTRA_SECRET"):
        build_credential(config, {"RELAY_ENTRA_SECRET": "  "})


def test_workload_identity_without_settings_names_them() -> None:
    with pytest.raises(ValueError, match="AZURE_TENANT_ID.*AZURE_FEDERATED_TOKEN_FILE"):
        EntraCredential(entra_config("workload-identity", client_id="app"), {})


@pytest.mark.parametrize(
    ("method", "fields", "environ", "expected"),
    [
        ("default", {"client_id": "mi"}, {}, DefaultAzureCredential),
        ("managed-identity", {}, {}, ManagedIdentityCredential),
        (
            "workload-identity",
            {},
            {"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c", "AZURE_FEDERATED_TOKEN_FILE": "/f"},
            WorkloadIdentityCredential,
        ),
        (
            "client-secret",
            {"client_id": "c", "tenant_id": "t", "client_secret_env": "SECRET"},
            {"SECRET": "s3cret-value"},
            ClientSecretCredential,
        ),
    ],
)
async def test_method_picks_the_azure_identity_credential(
    method: str, fields: dict[str, Any], environ: dict[str, str], expected: type
) -> None:
    credential = EntraCredential(entra_config(method, **fields), environ)
    try:
        assert isinstance(credential._source, expected)
        assert credential.describe()["method"] == method
        assert "s3cret" not in repr(credential)
    finally:
        await credential.close()


# --- the rules as pure functions -----------------------------------------------------------


@pytest.mark.parametrize(
    ("remaining", "refresh_before", "expected"),
    [(3600, 300, 3300), (400, 300, 200), (120, 300, 60), (0, 300, 0), (-5, 300, 0)],
)
def test_refresh_delay(remaining: float, refresh_before: float, expected: float) -> None:
    assert refresh_delay(remaining, refresh_before) == expected


@pytest.mark.parametrize(
    ("failures", "remaining", "expected"),
    [(1, None, 1), (2, None, 2), (5, None, 16), (6, None, 30), (5000, None, 30), (3, 2.5, 2.5)]
    + [(1, -3.0, 1), (6, 100.0, 30)],
)
def test_retry_delay(failures: int, remaining: float | None, expected: float) -> None:
    assert retry_delay(failures, remaining) == expected


def test_error_text_masks_tokens() -> None:
    jwt = "eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl"
    assert error_text(ValueError(f"got {jwt} back")) == "ValueError: got *** back"
    assert (
        error_text(ValueError("held tok-123 leaked"), ("tok-123",)) == "ValueError: held *** leaked"
    )
    assert error_text(ValueError("header Bearer abc.def")) == "ValueError: header ***"
    assert error_text(ValueError("first\nsecond")) == "ValueError: first"
    assert error_text(TimeoutError()) == "TimeoutError"
    assert len(error_text(ValueError("x" * 1000))) < 230
