"""Upstream credentials behind one small interface: the headers to send to Azure.

The client's own credentials are never forwarded; these are the relay's. Values are never
part of a repr, a log line or an error message. A credential is started once at start-up
and shared by every session and backend that uses the same configuration: an Entra token is
fetched and refreshed in the background, never per session on the hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from relay.ops.config import CredentialConfig
from relay.ops.redaction import SECRETS


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


def build_credential(
    config: CredentialConfig,
    environ: Mapping[str, str],
    on_refresh_failure: Callable[[], None] = lambda: None,
) -> UpstreamCredential:
    """Raises ValueError naming what is missing from the environment."""
    if config.type == "entra":
        from relay.upstream.entra import EntraCredential

        return EntraCredential(config, environ, on_refresh_failure=on_refresh_failure)
    key = environ.get(config.env, "").strip()
    if not key:
        raise ValueError(f"environment variable {config.env} is not set or empty")
    SECRETS.register(key)
    return ApiKeyCredential(key, config.env)
