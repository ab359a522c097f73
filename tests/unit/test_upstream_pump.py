import pytest

from relay.ops.config import CredentialConfig, DeploymentConfig
from relay.session.pump import Ending, close_for_client, close_for_upstream
from relay.upstream.dial import realtime_url, refusal_for_status, retry_after_seconds

CRED = CredentialConfig()


def test_ga_url_has_no_api_version():
    deployment = DeploymentConfig("relay-name", "https://res.openai.azure.com", CRED, "gpt-rt")
    url = realtime_url(deployment.endpoint, deployment)
    assert str(url) == "wss://res.openai.azure.com/openai/v1/realtime?model=gpt-rt"


def test_preview_url():
    deployment = DeploymentConfig(
        "old",
        "https://res.openai.azure.com/",
        CRED,
        protocol="preview",
        api_version="2025-04-01-preview",
    )
    url = realtime_url(deployment.endpoint, deployment)
    assert str(url) == (
        "wss://res.openai.azure.com/openai/realtime?api-version=2025-04-01-preview&deployment=old"
    )


def test_plain_http_endpoint_and_path_prefix():
    deployment = DeploymentConfig("d", "http://127.0.0.1:9000/gateway", CRED)
    assert str(realtime_url(deployment.endpoint, deployment)) == (
        "ws://127.0.0.1:9000/gateway/openai/v1/realtime?model=d"
    )


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://res.openai.azure.com/openai/v1/",  # as Azure's GA docs write it
        "https://res.openai.azure.com/openai/v1",
        "https://res.openai.azure.com/openai/",
        "https://res.openai.azure.com/openai/v1/realtime",
        "https://res.openai.azure.com//",
    ],
)
def test_an_endpoint_with_the_api_path_is_normalised_at_load(endpoint):
    deployment = DeploymentConfig("d", endpoint, CRED)
    assert deployment.endpoint == deployment.backends[0].endpoint == "https://res.openai.azure.com"
    assert str(realtime_url(deployment.endpoint, deployment)) == (
        "wss://res.openai.azure.com/openai/v1/realtime?model=d"
    )
    preview = DeploymentConfig("d", endpoint, CRED, protocol="preview", api_version="2024-12-17")
    assert str(realtime_url(preview.backends[0].endpoint, preview)) == (
        "wss://res.openai.azure.com/openai/realtime?api-version=2024-12-17&deployment=d"
    )


@pytest.mark.parametrize(
    "endpoint", ["res.openai.azure.com", "https://", "https://res.openai.azure.com/?x=1"]
)
def test_an_endpoint_that_is_not_a_base_url_is_refused(endpoint):
    with pytest.raises(ValueError, match="endpoint must be an http"):
        DeploymentConfig("d", endpoint, CRED)


@pytest.mark.parametrize(
    ("status", "retry_after", "expected_status", "code"),
    [
        (401, None, 502, "upstream_auth_failed"),
        (403, None, 502, "upstream_auth_failed"),
        (429, "7", 429, "upstream_rate_limited"),
        (500, None, 502, "upstream_error"),
        (503, None, 502, "upstream_error"),
        (404, None, 502, "upstream_error"),
        (200, None, 502, "upstream_not_websocket"),
    ],
)
def test_handshake_status_mapping(status, retry_after, expected_status, code):
    refusal = refusal_for_status(status, retry_after)
    assert (refusal.status, refusal.code) == (expected_status, code)
    if status == 429:
        assert refusal.retry_after == "7"


def test_429_without_retry_after_still_says_when():
    assert refusal_for_status(429, None).retry_after == "1"


@pytest.mark.parametrize(
    ("ending", "to_upstream", "to_client"),
    [
        (Ending("client", 1000, "bye"), (1000, "bye"), (1011, "upstream connection lost")),
        (Ending("client", 4001, "app"), (4001, "app"), (1011, "upstream connection lost")),
        (Ending("client", 1006, "lost", clean=False), (1001, "client went away"), None),
        (Ending("client", 1005, ""), (1000, ""), None),
        (Ending("upstream", 1000, "done"), None, (1000, "done")),
        (Ending("upstream", 4000, "x"), None, (4000, "x")),
        (Ending("upstream", 1006, "lost", clean=False), None, (1011, "upstream connection lost")),
        # A close frame without a status (1005, "no status received") is a normal close: it
        # was passed on as an error (1011), or as the client going away.
        (Ending("upstream", 1005, ""), None, (1000, "")),
        (
            Ending("relay", 1001, "shutting down"),
            (1001, "relay closed the session"),
            (1001, "shutting down"),
        ),
    ],
)
def test_close_code_mapping(ending, to_upstream, to_client):
    if to_upstream is not None:
        assert close_for_upstream(ending) == to_upstream
    if to_client is not None:
        assert close_for_client(ending) == to_client


def test_transcription_urls_name_no_deployment():
    ga = DeploymentConfig("t", "https://res.openai.azure.com", CRED, "az-t", kind="transcription")
    assert str(realtime_url(ga.endpoint, ga)) == (
        "wss://res.openai.azure.com/openai/v1/realtime?intent=transcription"
    )
    preview = DeploymentConfig(
        "t", "https://res.openai.azure.com", CRED, protocol="preview", kind="transcription"
    )
    assert str(realtime_url(preview.endpoint, preview)) == (
        "wss://res.openai.azure.com/openai/realtime?api-version=2025-04-01-preview"
        "&intent=transcription"
    )


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("7", "7"),
        ("0.2", "1"),
        ("-3", "1"),
        ("nan", "5"),
        ("Wed, 21 Oct 2026 07:28:00 GMT", "5"),
        # An upstream's nonsense took a backend out for a year (or crashed the request).
        ("inf", "300"),
        ("-inf", "1"),
        ("1e308", "300"),
        ("31536000", "300"),
    ],
)
def test_retry_after_is_whole_seconds_within_bounds(header, seconds):
    assert retry_after_seconds(header) == seconds
