"""The cluster's certificate authority and the certificates it signs, on ``cryptography``.

One CA signs every serving and client certificate of the cluster (apiserver, kubelets,
the components' client identities) and the webhook's serving certificate for tests.
Keys are ECDSA P-256 (quick to make, accepted by every Kubernetes component).

Neighbours: :mod:`dynvol.testing.cluster.controlplane` and
:mod:`dynvol.testing.cluster.nodes` ask for the certificates they need.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertificateAuthority"]

_VALIDITY = datetime.timedelta(days=365)


def _name(common_name: str, organisations: Sequence[str] = ()) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organisations]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


@attrs.define(kw_only=True)
class CertificateAuthority:
    """A CA in ``dir`` (``ca.crt``, ``ca.key``); made on first use, reused after."""

    dir: Path
    #: The CA certificate's subject (when it is made).
    common_name: str = "dynvol-multinode-ca"
    _key: ec.EllipticCurvePrivateKey | None = None
    _cert: x509.Certificate | None = None

    @property
    def cert_path(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def key_path(self) -> Path:
        return self.dir / "ca.key"

    def load_or_create(self) -> CertificateAuthority:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        if self.cert_path.exists() and self.key_path.exists():
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{self.key_path}: not an ECDSA key; remove {self.dir}")
            self._key = key
            self._cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            return self
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = _name(self.common_name)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        _write_key(self.key_path, key)
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._key, self._cert = key, cert
        return self

    def issue(
        self,
        name: str,
        *,
        common_name: str,
        organisations: Sequence[str] = (),
        hosts: Sequence[str] = (),
        server: bool = False,
    ) -> tuple[Path, Path]:
        """Write ``<name>.crt`` and ``<name>.key`` (a server certificate for ``hosts`` when
        ``server``, else a client certificate); returns their paths."""
        if self._key is None or self._cert is None:
            raise RuntimeError("call load_or_create() first")
        if server and not hosts:
            raise ValueError(f"{name}: a serving certificate needs at least one host")
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, organisations))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_encipherment=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    content_commitment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
        )
        if hosts:
            builder = builder.add_extension(_san(hosts), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_path, key_path = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        _write_key(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path

    def service_account_keys(self) -> tuple[Path, Path]:
        """An RSA key pair for ServiceAccount tokens (``sa.key``, ``sa.pub``), made once."""
        private, public = self.dir / "sa.key", self.dir / "sa.pub"
        if not (private.exists() and public.exists()):
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            _write_key(private, key)
            public.write_bytes(
                key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
        return private, public
