"""The certificate watch on files alone: what a poll does with each state of the pair."""

import datetime
import os

import trustme
from structlog.testing import capture_logs

from relay.edge.tls import CertificateWatch, server_ssl_context
from relay.ops.config import TlsConfig


def _write(leaf: trustme.LeafCert, tls: TlsConfig) -> None:
    leaf.cert_chain_pems[0].write_to_path(str(tls.cert_file))
    leaf.private_key_pem.write_to_path(str(tls.key_file))


def test_a_pair_is_loaded_once_a_missing_file_waited_out_and_a_bad_one_reported_once(tmp_path):
    ca = trustme.CA()
    tls = TlsConfig(cert_file=tmp_path / "tls.crt", key_file=tmp_path / "tls.key")
    first = ca.issue_cert(
        "relay.test", not_after=datetime.datetime(2031, 1, 1, tzinfo=datetime.UTC)
    )
    _write(first, tls)
    expiries: list[float] = []
    watch = CertificateWatch(server_ssl_context(tls), tls, expiries.append)
    assert expiries == [datetime.datetime(2031, 1, 1, tzinfo=datetime.UTC).timestamp()]
    assert not watch.poll()  # nothing changed

    with capture_logs() as logs:
        os.unlink(tls.key_file)  # mid-update: the key not there yet
        assert not watch.poll()
        assert logs == []
        other = ca.issue_cert("relay.test")
        other.private_key_pem.write_to_path(str(tls.key_file))  # not the certificate's key
        assert not watch.poll()
        assert not watch.poll()  # the same bad pair is reported once
        assert [line["event"] for line in logs] == ["tls_certificate_reload_failed"]
        _write(other, tls)
        assert watch.poll()
    assert len(expiries) == 2
    assert logs[-1]["event"] == "tls_certificate_loaded"
