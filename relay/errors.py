"""Errors the relay raises, by who is at fault.

    RelayError
    ├── ConfigError          the operator's config or environment is wrong (exit 2 at start-up)
    ├── StartupError         the relay cannot start as configured (a port taken; exit 2)
    ├── ClientRefused        the client's request is refused before the upgrade (HTTP status)
    │   └── RequestRejected  a bad request (HTTP 400) that can name the offending parameter
    ├── UpstreamRefused      the upstream could not be reached or refused us (HTTP status)
    └── CredentialUnavailable  no valid upstream credential right now (HTTP 503)

Refusals carry the HTTP status the client gets, a stable machine-readable ``code`` and a
message that is safe to show: never a key, token or upstream URL with credentials.
"""

from __future__ import annotations

import errno


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""


class ConfigError(RelayError):
    """One or more problems in the configuration, each naming its source and key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


class StartupError(RelayError):
    """The relay cannot start as configured; the message says what to change."""

    @classmethod
    def cannot_listen(cls, host: str, port: int, exc: OSError, setting: str) -> StartupError:
        """A port that is taken (or not ours to take), naming the setting that changes it."""
        reason = {
            errno.EADDRINUSE: "the port is in use by another process",
            errno.EACCES: "permission denied (ports below 1024 need privileges)",
            errno.EADDRNOTAVAIL: "the address is not one of this host's",
        }.get(exc.errno or 0, exc.strerror or str(exc))
        shown = f"[{host}]" if ":" in host else host
        return cls(f"cannot listen on {shown}:{port}: {reason}; change {setting}")


class HttpRefusal(RelayError):
    """A refusal answered with an HTTP status and a JSON body, before any upgrade."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        retry_after: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class ClientRefused(HttpRefusal):
    """The client's request is wrong: bad key, unknown deployment, bad route."""


class RequestRejected(ClientRefused):
    """A bad request (HTTP 400) that can name the offending parameter (``param``)."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(400, code, message)
        self.param = param


class RelayUnavailable(HttpRefusal):
    """The relay cannot take the request now (draining, out of file descriptors, its
    admission store unreachable): a server error, not the client's."""


class UpstreamRefused(HttpRefusal):
    """The upstream could not be reached, timed out, or refused the relay."""


class CredentialUnavailable(RelayError):
    """No valid upstream credential right now (e.g. every Entra token refresh failed)."""
