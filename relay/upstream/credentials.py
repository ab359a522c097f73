"""Upstream credentials behind one small interface: the headers to send to Azure.

The client's own credentials are never forwarded; these are the relay's. Values are never
part of a repr, a log line or an error message. A credential is started once at start-up
and shared by every session and backend that uses the same configuration: an Entra token is
fetched and refreshed in the background, never per session on the hot path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import structlog

from relay.ops.config import DEFAULT_KEY_ENV, CredentialConfig
from relay.ops.redaction import SECRETS
from relay.ops.watch import watch_file

_log = structlog.get_logger("relay.upstream")


class UpstreamCredential(Protocol):
    async def start(self) -> None:
        """Get ready (first token, refresh task). Failures are logged, not raised."""
        ...

    async def close(self) -> None: ...

    async def headers(self) -> dict[str, str]:
        """Auth headers for one new upstream connection; CredentialUnavailable if none."""
        ...

    @property
    def usable(self) -> bool:
        """Whether a new session could authenticate upstream right now."""
        ...

    def describe(self) -> dict[str, Any]:
        """State for the status page: never the secret itself."""
        ...


class ApiKeyCredential:
    """An Azure resource key, sent as the `api-key` header."""

    __slots__ = ("_key", "_env")

    def __init__(self, key: str, env: str = "") -> None:
        self._key = key
        self._env = env

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def headers(self) -> dict[str, str]:
        return {"api-key": self._key}

    @property
    def usable(self) -> bool:
        return True

    def describe(self) -> dict[str, Any]:
        return {"type": "api-key", "env": self._env, "usable": True}

    def __repr__(self) -> str:
        return "ApiKeyCredential(key=***)"


class ApiKeyFileCredential(ApiKeyCredential):
    """An Azure resource key read from a file (a mounted Secret, a Key Vault CSI volume),
    read again when the file changes: a rotated key is used by the next session, with no
    restart. Until a changed file holds a key again (mid-update, emptied), the last key
    stays in use."""

    __slots__ = ("_path", "_task")

    def __init__(self, path: Path) -> None:
        super().__init__(read_secret_file(path))  # ValueError: a start-up problem
        self._path = path
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            watch_file(self._path, self.reload), name=f"key file {self._path}"
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def describe(self) -> dict[str, Any]:
        return {"type": "api-key", "file": str(self._path), "usable": True}

    def __repr__(self) -> str:
        return f"ApiKeyFileCredential(file={str(self._path)!r}, key=***)"

    async def reload(self) -> bool:
        """Read the key again (the file changed); True if a new key is in use."""
        try:
            key = read_secret_file(self._path)
        except ValueError as exc:
            _log.error("upstream_key_reload_failed", file=str(self._path), error=str(exc))
            return False
        if key == self._key:
            return False
        self._key = key
        _log.info("upstream_key_reloaded", file=str(self._path))
        return True


def read_secret_file(path: Path, what: str = "key file") -> str:
    """The secret in ``path`` (surrounding whitespace aside), registered with the log filter;
    ValueError saying what is wrong, never the content."""
    try:
        secret = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {path} cannot be read ({type(exc).__name__})") from None
    if not secret:
        raise ValueError(f"{what} {path} is empty")
    SECRETS.register(secret)
    return secret


def build_credential(
    config: CredentialConfig,
    environ: Mapping[str, str],
    on_refresh_failure: Callable[[], None] = lambda: None,
) -> UpstreamCredential:
    """Raises ValueError naming what is missing from the environment (or the key file)."""
    if config.type == "entra":
        from relay.upstream.entra import EntraCredential

        return EntraCredential(config, environ, on_refresh_failure=on_refresh_failure)
    if config.file is not None:
        return ApiKeyFileCredential(config.file)
    name = config.env or DEFAULT_KEY_ENV
    key = environ.get(name, "").strip()
    if not key:
        raise ValueError(f"environment variable {name} is not set or empty")
    SECRETS.register(key)
    return ApiKeyCredential(key, name)
