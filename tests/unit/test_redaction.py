"""The secret filter every log line passes, and the logging set-up that runs it."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aiohttp
import orjson
import pytest
from yarl import URL

from relay.ops.logsetup import describe_error, redact_secrets, redact_url
from relay.ops.redaction import REDACTED, SecretFilter

KEY = "rk-some-relay-key-0123456789"


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        (f"GET /openai/v1/realtime?model=m&api_key={KEY} HTTP/1.1", "?model=m&api_key="),
        (f"/x?api-key={KEY}&key={KEY}&token={KEY}&sig={KEY}", "/x?api-key="),
        (f"/x?access_token={KEY}&client_secret={KEY}&Authorization=Bearer%20{KEY}", "/x?"),
        (f"<CIMultiDictProxy('api-key': '{KEY}', 'Host': 'azure')>", "'Host': 'azure'"),
        (f"{{'Authorization': 'Bearer {KEY}'}}", "'Authorization': '"),
        (f"b'GET / HTTP/1.1\\r\\napi-key: {KEY}\\r\\nHost: x'", "\\r\\nHost: x"),
        (f'{{"access_token": "{KEY}", "expires_in": 3599}}', '"expires_in": 3599'),
        (f"Authorization: Bearer {KEY}", "Authorization: "),
        (f"bearer {KEY}", "bearer "),
        (f"realtime, openai-insecure-api-key.{KEY}", "realtime, openai-insecure-api-key."),
        ("token eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl end", "token "),
        ("the secret ek_0123456789abcdef0123 end", "the secret "),
        (f"GET /openai/v1/realtime/{KEY} HTTP/1.1", "GET /openai/v1/realtime/"),
        (f"/openai/v1/realtime?model={KEY}", "?model="),
    ],
)
def test_patterns_catch_credentials_by_where_they_sit(text, kept):
    cleaned = SecretFilter().clean(text)
    assert KEY not in cleaned and "eyJzdWIi" not in cleaned and "ek_0123" not in cleaned
    assert REDACTED in cleaned and kept in cleaned


@pytest.mark.parametrize(
    "text",
    [
        "session_started",
        "invalid_api_key",
        "ws://127.0.0.1:8080/openai/v1/realtime?model=gpt-realtime&api-version=2025-04-01",
        "upstream_connect_failed backend=eastus code=upstream_auth_failed",
    ],
)
def test_ordinary_text_is_left_alone(text):
    assert SecretFilter().clean(text) == text


def test_known_values_are_caught_anywhere_and_short_ones_are_not_registered():
    secrets = SecretFilter()
    secrets.register("azure-key-value-123", "short")
    secrets.register_recent("entra-token-not-a-jwt-456")
    text = "azure-key-value-123|entra-token-not-a-jwt-456|short"
    assert secrets.clean(text) == f"{REDACTED}|{REDACTED}|short"


def test_known_values_are_caught_cut_short_and_in_what_goes_to_clients():
    secrets = SecretFilter()
    key = "AZKEYsecretA1b2C3d4E5f6G7h8I9j0K1"
    secrets.register(key)
    cut = f"1008 check the resource keys. key={key[:21]}"  # a close reason cut at its limit
    assert secrets.clean(cut) == f"1008 check the resource keys. key={REDACTED}"
    assert secrets.clean_known(cut) == secrets.clean(cut)
    assert secrets.clean_known({"message": f"got '{key[:20]}'"}) == {"message": f"got '{REDACTED}'"}
    assert secrets.known_in(cut.encode()) and secrets.suspect(cut)
    assert secrets.clean(f"the first {key[:12]} chars") == f"the first {key[:12]} chars"


async def test_a_requests_key_is_caught_in_its_own_task_only():
    secrets = SecretFilter()
    text = f"presented {KEY.replace('rk-', 'zz-')}"

    async def request() -> str:
        secrets.in_this_request(KEY.replace("rk-", "zz-"))
        return secrets.clean(text)

    async with asyncio.TaskGroup() as tasks:
        task = tasks.create_task(request())
    assert task.result() == f"presented {REDACTED}"
    assert secrets.clean(text) == text  # not remembered past its request


def test_values_that_are_not_json_are_rendered_as_cleaned_text():
    class Holder:
        def __repr__(self) -> str:
            return f"Holder(api-key: {KEY})"

    cleaned = SecretFilter().clean_value({"nested": [Holder(), 1, None], "n": 2.5})
    assert cleaned == {"nested": [f"Holder(api-key: {REDACTED}", 1, None], "n": 2.5}


def test_the_log_processor_cleans_every_value_and_leaves_plain_lines_alone():
    class Holder:
        def __repr__(self) -> str:
            return f"Holder(api-key: {KEY})"

    plain = {"event": "session_ended", "team": "alpha", "close_code": 1000, "ok": True}
    assert redact_secrets(None, "info", plain) == plain
    line = redact_secrets(None, "info", {"event": "x", "held": Holder(), "n": [1, {"k": "v"}]})
    assert line == {"event": "x", "held": f"Holder(api-key: {REDACTED}", "n": [1, {"k": "v"}]}
    line = redact_secrets(None, "info", {"event": f"GET /?token={KEY}", "code": 7})
    assert line == {"event": f"GET /?token={REDACTED}", "code": 7}


async def test_a_presented_key_cannot_hide_the_presenters_address():
    """A request's presented key is cleaned out of its lines; a client that presents its
    own address as the key must not hide it from the lines about its guesses."""
    from relay.ops.logsetup import SECRETS

    async def request() -> dict:
        SECRETS.in_this_request("203.0.113.77")
        line = {"event": "session_refused", "peer": "203.0.113.77", "note": "203.0.113.77"}
        return redact_secrets(None, "warning", line)

    async with asyncio.TaskGroup() as tasks:
        task = tasks.create_task(request())
    assert task.result() == {"event": "session_refused", "peer": "203.0.113.77", "note": REDACTED}


def test_a_handshake_error_is_described_by_class_and_status_only():
    info = aiohttp.RequestInfo(
        URL("wss://azure/openai/v1/realtime"),
        "GET",
        {"api-key": KEY},  # type: ignore[arg-type]
        URL("wss://azure/openai/v1/realtime"),
    )
    error = aiohttp.WSServerHandshakeError(info, (), status=401, message="Invalid status")
    assert KEY in repr(error)  # why it must never be logged as is
    assert describe_error(error) == "WSServerHandshakeError (HTTP 401)"
    assert describe_error(ConnectionRefusedError(111, "Connect call failed")) == (
        "ConnectionRefusedError: [Errno 111] Connect call failed"
    )
    assert describe_error(None) is None


def test_a_logged_url_is_cut_short_after_its_credentials_are_replaced():
    """A keyless client's 16 KB URL of quotes made two 32 KB lines a request."""
    url = URL("/x").with_query({"api-key": "secret-value", "q": '"' * 16000})
    logged = redact_url(url)
    assert logged.startswith("/x?api-key=REDACTED&q=") and "secret-value" not in logged
    assert len(logged) < 1100 and logged.endswith("more)")


def test_redact_url_replaces_credential_query_values():
    url = URL(f"/openai/v1/realtime?model=m&api_key={KEY}&Token={KEY}")
    assert redact_url(url) == "/openai/v1/realtime?model=m&api_key=REDACTED&Token=REDACTED"


_PROCESS = """
import logging, structlog
from relay.ops.logsetup import configure_logging
from relay.ops.redaction import SECRETS
configure_logging("debug", "json")
SECRETS.register("registered-upstream-key-789")
structlog.get_logger("relay.test").warning("ours", detail="registered-upstream-key-789")
try:
    raise ValueError("GET /x?api_key=%s HTTP/1.1")
except ValueError:
    logging.getLogger("aiohttp.server").exception("Error handling request")
logging.getLogger("asyncio").debug("from asyncio")
"""


def test_stdlib_and_structlog_lines_come_out_as_the_same_redacted_json():
    # A process of its own: logging is configured once per process, as `relay serve` does.
    run = subprocess.run(
        [sys.executable, "-c", _PROCESS % KEY], capture_output=True, check=True, timeout=60
    )
    assert run.stderr == b""
    ours, theirs, debug = [orjson.loads(line) for line in run.stdout.splitlines()]
    assert ours["event"] == "ours" and ours["detail"] == REDACTED
    assert theirs["logger"] == "aiohttp.server" and theirs["level"] == "error"
    assert "ValueError" in theirs["exception"] and KEY.encode() not in run.stdout
    assert (debug["logger"], debug["level"]) == ("asyncio", "debug")


def test_minting_many_client_secrets_never_pushes_out_the_relays_own_tokens():
    """Any client may mint client secrets by the dozen; they filled the 64 places that hold
    the relay's Entra token, which upstream words were then no longer cleaned of."""
    from relay.ops.redaction import MAX_RECENT

    secrets = SecretFilter()
    token = "entra-token-" + "t" * 40
    secrets.register_recent(token)
    for n in range(2 * MAX_RECENT):
        secrets.register_recent(f"ek_minted_{n:06d}_xxxxxxxx", minted=True)
    assert secrets.known_in(token.encode())
    assert secrets.clean_known({"message": token, token: 1}) == {
        "message": REDACTED,
        REDACTED: 1,
    }


def test_a_workers_index_stays_on_its_sessions_lines():
    """Each session starts a fresh log context; under --workers it lost the `worker` field,
    so a drain's lines could not be told apart by worker."""
    import structlog

    from relay.ops import logsetup

    try:
        logsetup.bind_process_fields(worker=1)
        structlog.contextvars.bind_contextvars(session_id="rs_earlier")
        logsetup.fresh_context()
        assert structlog.contextvars.get_contextvars() == {"worker": 1}
    finally:
        logsetup._PROCESS_FIELDS.clear()
        structlog.contextvars.clear_contextvars()


@pytest.mark.parametrize(
    "text",
    [
        "GET /openai/v1/realtime?model=m&a=;" + "key" * 5330,  # a keyless client's query
        '"' + "key" * 5330 + '"',
        "'" + "token" * 3200,
    ],
)
def test_a_long_run_of_a_credential_word_costs_the_filter_no_more_than_its_length(text):
    """The name patterns backtracked quadratically over a run of a credential word with no
    `=` or quote after it: 145-505 ms a 16 KB line, on the event loop, for one keyless
    request. Bounded names: a linear scan. A complexity check, not a performance target:
    against the same length of plain text in one process, best of three, with a wide
    margin (quadratic was 100x and more)."""
    import time

    def best(line: str) -> float:
        times = []
        for _ in range(3):
            began = time.perf_counter()
            secrets.clean(line)
            times.append(time.perf_counter() - began)
        return min(times)

    secrets = SecretFilter()
    baseline = best("x" * len(text) + "token")  # the triggers found: every pattern runs
    assert best(text) < 20 * baseline + 0.005
