"""The relay's own TLS certificate (`[server.tls]`): loaded at start, and again whenever its
files change, without a restart.

cert-manager (or any renewal) replaces the certificate a few weeks before it expires. Loaded
only at start, a renewal needed a rollout, which ends every live session on every replica,
and a missed one let the certificate expire under running relays. Now the files are polled
(their identity, as `ops.watch` does for the config: a Kubernetes Secret volume swaps a
symlink) and a new pair is loaded into the listener's `SSLContext`: new connections get the
new certificate, open sessions keep theirs. A pair that does not load (a certificate without
its key, mid-update) is logged and tried again when the files change; the old one stays in
use.

`relay_tls_certificate_expiry_timestamp_seconds` is the certificate in use's `notAfter`, so
an alert can fire on a certificate that is not being renewed, whatever the reason.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path

import structlog
from cryptography import x509

from relay.ops.config import TlsConfig
from relay.ops.logsetup import describe_error
from relay.ops.watch import POLL_SECONDS, Signature, signature

_log = structlog.get_logger("relay.tls")


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile=tls.cert_file, keyfile=tls.key_file)
    return context


def not_after(cert_file: Path) -> float:
    """When the first certificate in ``cert_file`` (the server's own) expires, in Unix time."""
    certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return certificate.not_valid_after_utc.timestamp()


class CertificateWatch:
    """Reloads ``context``'s certificate when ``tls``'s files change; ``expiry`` is told the
    `notAfter` of each certificate put in use."""

    def __init__(
        self,
        context: ssl.SSLContext,
        tls: TlsConfig,
        expiry: Callable[[float], None],
        *,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self._context = context
        self._tls = tls
        self._expiry = expiry
        self._poll_seconds = poll_seconds
        self._loaded = self._signatures()  # the pair server_ssl_context loaded
        try:
            expires = not_after(tls.cert_file)
        except (OSError, ValueError) as exc:  # loaded by OpenSSL, not readable here
            _log.warning("tls_certificate_expiry_unknown", error=describe_error(exc))
        else:
            expiry(expires)
            _log.info("tls_certificate_loaded", cert_file=str(tls.cert_file), not_after=expires)

    def _signatures(self) -> tuple[Signature | None, Signature | None]:
        return signature(self._tls.cert_file), signature(self._tls.key_file)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds)
            self.poll()

    def poll(self) -> bool:
        """Load the files if they changed since the pair in use was loaded; True if a new
        pair is in use."""
        now = self._signatures()
        if now == self._loaded or None in now:  # unchanged, or mid-update: a file is missing
            return False
        tls = self._tls
        try:
            # Into a context of its own first: a pair that fails half-way (a new certificate,
            # then a key that does not match it) would leave the listener's without a key.
            server_ssl_context(tls)
            expires = not_after(tls.cert_file)
            self._context.load_cert_chain(certfile=tls.cert_file, keyfile=tls.key_file)
        except (OSError, ValueError, ssl.SSLError) as exc:
            # Logged once per new state of the files; tried again when they change.
            _log.error(
                "tls_certificate_reload_failed",
                cert_file=str(tls.cert_file),
                error=describe_error(exc),
            )
            self._loaded = now
            return False
        self._loaded = now
        self._expiry(expires)
        _log.info("tls_certificate_loaded", cert_file=str(tls.cert_file), not_after=expires)
        return True
