"""The multi-node cluster's CA: certificates verify against it and say what they are for."""

from __future__ import annotations

import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dynvol.testing.cluster.pki import CertificateAuthority


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_a_serving_certificate_is_signed_by_the_ca_for_its_hosts(tmp_path: Path) -> None:
    ca = CertificateAuthority(dir=tmp_path / "pki").load_or_create()
    cert_path, key_path = ca.issue(
        "kubelet", common_name="node-1", hosts=("10.233.0.11", "node-1"), server=True
    )
    cert, root = _load(cert_path), _load(ca.cert_path)
    cert.verify_directly_issued_by(root)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.233.0.11")]
    assert san.get_values_for_type(x509.DNSName) == ["node-1"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    # The standard library (what the cluster's readiness checks use) accepts the pair.
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    ctx.load_cert_chain(str(cert_path), str(key_path))


def test_a_client_certificate_carries_the_user_and_groups(tmp_path: Path) -> None:
    ca = CertificateAuthority(dir=tmp_path).load_or_create()
    cert_path, _ = ca.issue(
        "node-1", common_name="system:node:node-1", organisations=("system:nodes",)
    )
    cert = _load(cert_path)
    cert.verify_directly_issued_by(_load(ca.cert_path))
    subject = cert.subject
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:node:node-1"
    assert [a.value for a in subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == [
        "system:nodes"
    ]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_the_ca_is_reused_once_made(tmp_path: Path) -> None:
    first = CertificateAuthority(dir=tmp_path).load_or_create()
    cert_path, _ = first.issue("admin", common_name="admin")
    again = CertificateAuthority(dir=tmp_path).load_or_create()
    later, _ = again.issue("other", common_name="other")
    root = _load(first.cert_path)
    _load(cert_path).verify_directly_issued_by(root)
    _load(later).verify_directly_issued_by(root)
    assert isinstance(again._key, ec.EllipticCurvePrivateKey)


def test_a_serving_certificate_without_hosts_is_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority(dir=tmp_path).load_or_create()
    with pytest.raises(ValueError, match="apiserver: a serving certificate needs"):
        ca.issue("apiserver", common_name="kube-apiserver", server=True)


def test_service_account_keys_are_made_once(tmp_path: Path) -> None:
    ca = CertificateAuthority(dir=tmp_path).load_or_create()
    private, public = ca.service_account_keys()
    before = private.read_bytes()
    ca.service_account_keys()
    assert private.read_bytes() == before
    assert b"BEGIN PUBLIC KEY" in public.read_bytes()
