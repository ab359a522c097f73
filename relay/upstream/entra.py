"""Entra ID tokens for the upstream: one cache per credential config, kept fresh in the background.

Refresh rules:
- ``start()`` fetches the first token. A failure is logged and counted, never raised: the
  relay starts, this credential is not usable, and the background task keeps trying.
- The background task replaces a token ``refresh_before_seconds`` before its ``expires_on``,
  but never sooner than half its remaining lifetime, so short-lived tokens are not refetched
  in a tight loop.
- One fetch at a time: the background task and every ``refresh()`` caller share the fetch in
  flight. ``headers()`` never fetches: it reads the cache, and raises CredentialUnavailable
  once the held token has expired.
- A failed fetch (an error, no answer within ``fetch_timeout``, or no newer token) keeps the
  held token while it is valid, logs ``entra_token_refresh_failed``, calls
  ``on_refresh_failure`` and retries after 1, 2, 4 ... 30 s, never later than the held
  token's expiry.
- azure-identity caches tokens as well. It only asks its endpoint again once the token is
  within 300 s of expiry, or past its ``refresh_on`` (half-life for tokens of 2 h or more),
  and not within 30 s of its last request; a failure of such an early refresh is swallowed
  and the cached token handed back. So an answer that is not a newer token counts as a failed
  refresh (``TokenNotRenewed``): the failure shows before the token runs out, not after. For
  the same reason a ``refresh_before_seconds`` above 300 gains nothing with tokens under 2 h.

A client secret may come from a file (``client_secret_file``, a mounted Secret), watched like
the config file: a changed secret is tried at once (a token fetched with it) and put in use
only if Entra takes it (``entra_client_secret_reloaded``); else the old one stays
(``entra_client_secret_reload_failed``). So the rotation needs no restart.

Tokens and secrets never appear in logs, reprs, ``describe()`` or error messages.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from azure.core.credentials import AccessToken
from azure.core.credentials_async import AsyncTokenCredential
from azure.identity.aio import (
    ClientSecretCredential,
    DefaultAzureCredential,
    ManagedIdentityCredential,
    WorkloadIdentityCredential,
)

from relay.errors import CredentialUnavailable
from relay.ops.config import CredentialConfig
from relay.ops.redaction import SECRETS
from relay.ops.watch import watch_file
from relay.upstream.credentials import read_secret_file

_log = structlog.get_logger("relay.upstream.entra")

BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0
FETCH_TIMEOUT_SECONDS = 30.0
_ERROR_MAX_CHARS = 200
# Error texts come from azure-identity and its endpoints: mask anything shaped like a token.
_TOKEN_LIKE = re.compile(r"eyJ[\w-]*\.[\w-]*\.[\w-]*|(?i:bearer)\s+\S+")


class TokenNotRenewed(Exception):
    """The token source answered with the token already held (azure-identity's own cache)."""


class ExpiredToken(Exception):
    """The token source answered with a token that has already expired."""


class FetchTimeout(TimeoutError):
    """The token source did not answer within the fetch timeout."""


def refresh_delay(remaining: float, refresh_before: float) -> float:
    """Seconds until a token with ``remaining`` seconds of validity should be replaced."""
    return max(remaining - refresh_before, remaining / 2, 0.0)


def retry_delay(failures: int, remaining: float | None) -> float:
    """Backoff after ``failures`` failed fetches in a row: 1, 2, 4 ... 30 s, and while a token
    is still valid, no later than its expiry."""
    delay = min(BACKOFF_FIRST_SECONDS * 2.0 ** min(failures - 1, 16), BACKOFF_MAX_SECONDS)
    if remaining is not None and remaining > 0:
        return min(delay, remaining)
    return delay


def error_text(exc: BaseException, secrets: tuple[str, ...] = ()) -> str:
    """The class name and first line of an error, token-shaped parts and ``secrets`` masked."""
    lines = str(exc).strip().splitlines()
    message = lines[0] if lines else ""
    for secret in secrets:
        message = message.replace(secret, "***")
    message = _TOKEN_LIKE.sub("***", message)
    # Shown in /status, which the log filter does not pass: the client secret a token
    # endpoint quotes back, and every other secret the relay knows, out here too.
    message = SECRETS.clean(message)
    if len(message) > _ERROR_MAX_CHARS:
        message = message[:_ERROR_MAX_CHARS] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def build_token_source(
    config: CredentialConfig,
    environ: Mapping[str, str],
    options: Mapping[str, Any],
    secret: str | None = None,
) -> AsyncTokenCredential:
    """The azure-identity credential for ``config.method``; ``options`` go to its constructor
    (and ``secret``, when given, to a client-secret one).

    Raises:
        ValueError: a setting or environment variable the method needs is missing.
    """
    # The header App Service's identity endpoint demands (azure-identity reads it from the
    # process's environment): a secret an error from that endpoint may quote.
    SECRETS.register(os.environ.get("IDENTITY_HEADER"), os.environ.get("MSI_SECRET"))
    if config.method == "managed-identity":
        return ManagedIdentityCredential(client_id=config.client_id, **options)
    if config.method == "workload-identity":
        return _workload_identity(config, environ, options)
    if config.method == "client-secret":
        return _client_secret(config, environ, options, secret)
    # Interactive credentials are excluded by default: a server has nobody to sign in.
    return DefaultAzureCredential(managed_identity_client_id=config.client_id, **options)


def _workload_identity(
    config: CredentialConfig, environ: Mapping[str, str], options: Mapping[str, Any]
) -> AsyncTokenCredential:
    tenant_id = config.tenant_id or environ.get("AZURE_TENANT_ID")
    client_id = config.client_id or environ.get("AZURE_CLIENT_ID")
    token_file = environ.get("AZURE_FEDERATED_TOKEN_FILE")
    needed = {
        "tenant_id (or AZURE_TENANT_ID)": tenant_id,
        "client_id (or AZURE_CLIENT_ID)": client_id,
        "environment variable AZURE_FEDERATED_TOKEN_FILE": token_file,
    }
    missing = [name for name, value in needed.items() if not value]
    if missing:
        raise ValueError(f"method workload-identity needs {', '.join(missing)}")
    return WorkloadIdentityCredential(
        tenant_id=tenant_id, client_id=client_id, token_file_path=token_file, **options
    )


def _client_secret(
    config: CredentialConfig,
    environ: Mapping[str, str],
    options: Mapping[str, Any],
    secret: str | None = None,
) -> AsyncTokenCredential:
    """A ClientSecretCredential with ``secret``, else the one the config names (its file or
    its environment variable)."""
    if not (config.tenant_id and config.client_id):
        raise ValueError("method client-secret needs client_id and tenant_id")
    if secret is None:
        if config.client_secret_file is not None:
            secret = read_secret_file(config.client_secret_file, "client secret file")
        elif config.client_secret_env:
            secret = environ.get(config.client_secret_env, "").strip()
            if not secret:
                raise ValueError(
                    f"environment variable {config.client_secret_env} is not set or empty"
                )
            SECRETS.register(secret)
        else:
            raise ValueError("method client-secret needs client_secret_env or client_secret_file")
    return ClientSecretCredential(config.tenant_id, config.client_id, secret, **options)


class EntraCredential:
    """An Entra ID bearer token for the upstream, shared by every session using this config.

    Args:
        config: which azure-identity credential, scope and refresh lead.
        environ: where secrets and AZURE_* settings are read (managed identity and the
            default chain read ``os.environ`` themselves, as azure-identity does).
        clock: epoch seconds, compared with tokens' ``expires_on``.
        token_source: used instead of building an azure-identity credential.
        on_refresh_failure: called once per failed fetch; must not block.
        sleep: how the background task waits (tests drive time with it).
        fetch_timeout: seconds one fetch may take before it counts as failed.
        credential_options: extra keyword arguments for the azure-identity credential.

    Raises:
        ValueError: the config's method lacks a setting or environment variable.
    """

    def __init__(
        self,
        config: CredentialConfig,
        environ: Mapping[str, str],
        *,
        clock: Callable[[], float] = time.time,
        token_source: AsyncTokenCredential | None = None,
        on_refresh_failure: Callable[[], None] = lambda: None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        fetch_timeout: float = FETCH_TIMEOUT_SECONDS,
        credential_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._on_refresh_failure = on_refresh_failure
        self._sleep = sleep
        self._fetch_timeout = fetch_timeout
        self._options = dict(credential_options or {})
        # A client secret from a file: the one in use, and the task watching the file.
        self._secret: str | None = None
        self._secret_watch: asyncio.Task[None] | None = None
        if token_source is None:
            if config.method == "client-secret" and config.client_secret_file is not None:
                self._secret = read_secret_file(config.client_secret_file, "client secret file")
            token_source = build_token_source(config, environ, self._options, self._secret)
        self._source = token_source
        self._token: AccessToken | None = None
        self._refresh_failures = 0
        self._last_error: str | None = None
        # The fetch in flight, shared by its callers; the background refresh loop.
        self._fetch: asyncio.Task[bool] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        """Fetch the first token (a failure is logged, not raised), then keep it fresh."""
        if self._task is not None or self._closed:
            return
        fetched = await self.refresh()
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(
            self._keep_fresh(0 if fetched else 1), name=f"entra-refresh-{self._config.method}"
        )
        path = self._config.client_secret_file
        if self._secret is not None and path is not None:
            self._secret_watch = loop.create_task(
                watch_file(path, self.reload_secret), name="entra-client-secret-file"
            )

    async def close(self) -> None:
        """Stop the background task and any fetch, close the azure-identity credential."""
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in (self._task, self._fetch, self._secret_watch) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._source.close()

    async def headers(self) -> dict[str, str]:
        """The bearer header from the cache; never fetches.

        Raises:
            CredentialUnavailable: no token, or the held one has expired.
        """
        token = self._token
        if token is None or token.expires_on <= self._clock():
            reason = self._last_error or "no token fetched yet"
            raise CredentialUnavailable(f"no valid Entra token ({reason})")
        return {"Authorization": f"Bearer {token.token}"}

    async def refresh(self) -> bool:
        """Fetch a new token now, or wait for the fetch already in flight.

        Concurrent callers share one request. A failure is logged and counted, not raised.
        Returns whether the fetch got a new token.
        """
        if self._closed:
            return False
        if self._fetch is None:
            self._fetch = asyncio.get_running_loop().create_task(
                self._fetch_token(), name="entra-token-fetch"
            )
            self._fetch.add_done_callback(self._fetch_done)
        # Shielded: a caller given up on (a session's handshake) must not cancel the others'.
        return await asyncio.shield(self._fetch)

    async def reload_secret(self) -> bool:
        """Read the client secret file again (it changed). The new secret is put in use once
        a token is fetched with it; until then (a file emptied mid-update, a secret the
        endpoint refuses) the old one stays. True if the new secret is in use."""
        path = self._config.client_secret_file
        if path is None or self._closed:
            return False
        try:
            secret = read_secret_file(path, "client secret file")
        except ValueError as exc:
            _log.error("entra_client_secret_reload_failed", file=str(path), error=str(exc))
            return False
        if secret == self._secret:
            return False
        source = build_token_source(self._config, {}, self._options, secret)
        try:
            token = await self._get_token(source)
            self._check(token)
        except Exception as exc:  # the old secret stays in use
            _log.error(
                "entra_client_secret_reload_failed",
                file=str(path),
                error=error_text(exc, (secret,)),
            )
            await source.close()
            return False
        fetch = self._fetch
        if fetch is not None:  # one made with the old source: let it end before closing that
            await asyncio.gather(asyncio.shield(fetch), return_exceptions=True)
        old, self._source, self._secret = self._source, source, secret
        self._record_success(token)
        _log.info("entra_client_secret_reloaded", file=str(path))
        await old.close()
        return True

    @property
    def usable(self) -> bool:
        return self._token is not None and self._token.expires_on > self._clock()

    def describe(self) -> dict[str, Any]:
        remaining = self._remaining()
        described: dict[str, Any] = {
            "type": "entra",
            "method": self._config.method,
            "usable": self.usable,
            "expires_in_seconds": round(remaining) if remaining and remaining > 0 else None,
            "refresh_failures": self._refresh_failures,
            "last_error": self._last_error,
        }
        if self._config.client_secret_file is not None:
            described["client_secret_file"] = str(self._config.client_secret_file)
        return described

    def __repr__(self) -> str:
        token = "***" if self._token is not None else None
        return f"EntraCredential(method={self._config.method!r}, token={token})"

    # --- background refresh ----------------------------------------------------------------

    async def _keep_fresh(self, failures: int) -> None:
        while True:
            held = self._token
            await self._sleep(self._next_delay(failures))
            if self._token is not held and self.usable:
                failures = 0  # a refresh() caller renewed it meanwhile: reschedule from that
                continue
            failures = 0 if await self.refresh() else failures + 1

    def _next_delay(self, failures: int) -> float:
        remaining = self._remaining()
        if failures == 0 and remaining is not None:
            return refresh_delay(remaining, self._config.refresh_before_seconds)
        return retry_delay(failures, remaining)

    def _remaining(self) -> float | None:
        return None if self._token is None else self._token.expires_on - self._clock()

    def _fetch_done(self, task: asyncio.Task[bool]) -> None:
        if self._fetch is task:
            self._fetch = None

    # --- one fetch -------------------------------------------------------------------------

    async def _fetch_token(self) -> bool:
        try:
            token = await self._get_token()
            self._check(token)
        except Exception as exc:  # whatever went wrong, keep the held token and retry later
            self._record_failure(exc)
            return False
        self._record_success(token)
        return True

    async def _get_token(self, source: AsyncTokenCredential | None = None) -> AccessToken:
        deadline = asyncio.timeout(self._fetch_timeout)
        try:
            async with deadline:
                return await (source or self._source).get_token(self._config.scope)
        except TimeoutError:
            if deadline.expired():
                raise FetchTimeout(f"no answer within {self._fetch_timeout:g} s") from None
            raise

    def _check(self, token: AccessToken) -> None:
        if token.expires_on <= self._clock():
            raise ExpiredToken("the token source answered with an expired token")
        if self._token is not None and token.token == self._token.token:
            raise TokenNotRenewed("the token source answered with the token already held")

    def _record_success(self, token: AccessToken) -> None:
        SECRETS.register_recent(token.token)
        self._token = token
        self._last_error = None
        _log.info(
            "entra_token_refreshed",
            method=self._config.method,
            expires_in_seconds=round(token.expires_on - self._clock()),
        )

    def _record_failure(self, exc: Exception) -> None:
        self._refresh_failures += 1
        held = (self._token.token,) if self._token is not None else ()
        self._last_error = error_text(exc, held)
        remaining = self._remaining()
        _log.warning(
            "entra_token_refresh_failed",
            method=self._config.method,
            error_class=type(exc).__name__,
            error=self._last_error,
            usable=self.usable,
            expires_in_seconds=round(remaining) if remaining and remaining > 0 else None,
        )
        try:
            self._on_refresh_failure()
        except Exception:  # a broken callback must not stop the refreshing
            _log.exception("entra_refresh_failure_callback_failed")
