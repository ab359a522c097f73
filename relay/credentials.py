"""Upstream credentials behind one small interface: the headers to send to Azure.

The client's own credentials are never forwarded; these are the relay's. Values are never
part of a repr, a log line or an error message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from relay.config import CredentialConfig, DeploymentConfig
from relay.errors import ConfigError


class UpstreamCredential(Protocol):
    async def headers(self) -> dict[str, str]:
        """Auth headers for one new upstream connection."""
        ...

    @property
    def usable(self) -> bool:
        """Whether a new session could authenticate upstream right now."""
        ...


class ApiKeyCredential:
    """An Azure resource key, sent as the `api-key` header."""

    __slots__ = ("_key",)

    def __init__(self, key: str) -> None:
        self._key = key

    async def headers(self) -> dict[str, str]:
        return {"api-key": self._key}

    @property
    def usable(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "ApiKeyCredential(key=***)"


def build_credential(config: CredentialConfig, environ: Mapping[str, str]) -> UpstreamCredential:
    key = environ.get(config.env, "").strip()
    if not key:
        raise ValueError(f"environment variable {config.env} is not set or empty")
    return ApiKeyCredential(key)


def build_credentials(
    deployments: Mapping[str, DeploymentConfig], environ: Mapping[str, str]
) -> dict[str, UpstreamCredential]:
    """One credential per deployment; every missing secret reported at once."""
    built: dict[str, UpstreamCredential] = {}
    problems: list[str] = []
    for name, deployment in deployments.items():
        try:
            built[name] = build_credential(deployment.credential, environ)
        except ValueError as exc:
            problems.append(f"environment: deployments.{name}.credential: {exc}")
    if problems:
        raise ConfigError(problems)
    return built
