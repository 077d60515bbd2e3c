"""The webhook's serving certificate as dynvol keeps it itself: material, checks, issuing.

Pure decisions over one Secret's contents (no I/O): :func:`read_secret` parses the data of
Secret ``dynvol-webhook-tls`` into :class:`Material` (or says which field is unusable),
:func:`examine` says what is wrong with it for the webhook Service's names at a given
time, and :func:`renew` makes the material that replaces it. :mod:`.certkeeping` (the
neighbour) reads and writes the Secret and the webhook configurations on that basis.

The Secret holds, base64 as every Secret: ``tls.crt``/``tls.key`` (the serving certificate
and its key, type ``kubernetes.io/tls``), ``ca.crt`` (the bundle the apiserver trusts:
the current CA first, then a retiring CA while a rotation is under way) and ``ca.key``
(the current CA's key). One Secret, so that the CA and the certificate it signed change in
one conditional write and are never read torn apart; a second Secret would give no
isolation, as the same ServiceAccount reads and writes both.

Renewal: a certificate is renewed once less than ``renew_fraction`` (default 1/3) of its
lifetime is left, so a one-year serving certificate is renewed four months before it
expires and a ten-year CA three years before. A new CA is added to the bundle before any
certificate it signed is served, and the old CA stays in the bundle until the new serving
certificate has been in the Secret for ``ca_overlap`` (every replica has reloaded by then).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import ipaddress
import secrets
from collections.abc import Mapping, Sequence

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertificatePolicy",
    "Examination",
    "Material",
    "UnusableSecret",
    "certificate_pem",
    "examine",
    "needs_renewal",
    "read_bundle",
    "read_secret",
    "renew",
    "service_names",
]

SECRET_TYPE = "kubernetes.io/tls"
CERT_KEY = "tls.crt"
KEY_KEY = "tls.key"
CA_CERT_KEY = "ca.crt"
CA_KEY_KEY = "ca.key"

#: A Secret's data is at most 1 MiB; a certificate bundle of ours is a few KiB.
_MAX_FIELD = 64 * 1024
#: CAs of a foreign Secret kept as retiring while taking it over.
_MAX_RETIRING = 4


def service_names(service: str, namespace: str) -> tuple[str, str]:
    """The DNS names the apiserver uses for a webhook behind ``service`` in ``namespace``."""
    return (f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local")


@attrs.frozen(kw_only=True)
class CertificatePolicy:
    """Lifetimes and the renewal window (short ones in tests)."""

    ca_lifetime: dt.timedelta = dt.timedelta(days=3650)
    serving_lifetime: dt.timedelta = dt.timedelta(days=365)
    #: Renew once less than this fraction of a certificate's lifetime is left.
    renew_fraction: float = attrs.field(default=1 / 3)
    #: How long a retiring CA stays in the bundle after the new serving certificate.
    ca_overlap: dt.timedelta = dt.timedelta(hours=1)
    #: Certificates start this long before they are made: the apiserver checks them
    #: against its own clock, which may be slightly behind.
    backdate: dt.timedelta = dt.timedelta(minutes=5)

    @renew_fraction.validator
    def _check_fraction(self, _: object, value: float) -> None:
        if not 0 < value < 1:
            raise ValueError(f"renew_fraction must be between 0 and 1, not {value}")

    def __attrs_post_init__(self) -> None:
        if self.serving_lifetime <= dt.timedelta(0) or self.ca_lifetime <= dt.timedelta(0):
            raise ValueError("certificate lifetimes must be positive")
        if self.backdate < dt.timedelta(0) or self.ca_overlap < dt.timedelta(0):
            raise ValueError("backdate and ca_overlap must not be negative")
        if self.serving_lifetime >= self.ca_lifetime * self.renew_fraction:
            # Otherwise a serving certificate could outlive the CA's renewal point.
            raise ValueError("serving_lifetime must be shorter than the CA's renewal window")


PrivateKey = ec.EllipticCurvePrivateKey


@attrs.frozen(kw_only=True)
class Material:
    """What the Secret holds, parsed."""

    cert: x509.Certificate
    key: PrivateKey
    ca_cert: x509.Certificate
    ca_key: PrivateKey
    #: ``ca.crt``: the current CA first, then any retiring CA.
    bundle: tuple[x509.Certificate, ...]

    def secret_data(self) -> dict[str, str]:
        """The Secret's ``data`` (base64 of PEM)."""
        fields = {
            CERT_KEY: certificate_pem(self.cert),
            KEY_KEY: _pem_key(self.key),
            CA_CERT_KEY: b"".join(certificate_pem(c) for c in self.bundle),
            CA_KEY_KEY: _pem_key(self.ca_key),
        }
        return {k: base64.b64encode(v).decode() for k, v in fields.items()}

    def cert_pem(self) -> bytes:
        """The serving certificate (PEM)."""
        return certificate_pem(self.cert)

    def key_pem(self) -> bytes:
        """The serving key (PEM, unencrypted PKCS#8)."""
        return _pem_key(self.key)

    def bundle_pem(self) -> bytes:
        """The CA bundle (PEM), as the webhook configurations' caBundle carries it."""
        return b"".join(certificate_pem(c) for c in self.bundle)


def certificate_pem(cert: x509.Certificate) -> bytes:
    """One certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class UnusableSecret(ValueError):
    """The Secret's data cannot be used; the message names the field."""


def _field(data: Mapping[str, object], name: str) -> bytes:
    raw = data.get(name)
    if not isinstance(raw, str) or not raw:
        raise UnusableSecret(f"data.{name}: missing")
    if len(raw) > _MAX_FIELD:
        raise UnusableSecret(f"data.{name}: longer than {_MAX_FIELD} characters")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise UnusableSecret(f"data.{name}: not base64") from None


def _key(data: Mapping[str, object], name: str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(_field(data, name), password=None)
    except UnusableSecret:
        raise
    except (ValueError, TypeError):
        raise UnusableSecret(f"data.{name}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UnusableSecret(f"data.{name}: not an EC private key")
    return key


def _certs(data: Mapping[str, object], name: str) -> tuple[x509.Certificate, ...]:
    try:
        certs = tuple(x509.load_pem_x509_certificates(_field(data, name)))
    except UnusableSecret:
        raise
    except ValueError:
        raise UnusableSecret(f"data.{name}: not PEM certificates") from None
    if not certs:
        raise UnusableSecret(f"data.{name}: no certificate")
    return certs


def read_secret(data: Mapping[str, object] | None) -> Material:
    """Parse a Secret's ``data``; raises :class:`UnusableSecret` naming the field."""
    if not isinstance(data, Mapping):
        raise UnusableSecret("data: missing")
    (cert, *_) = _certs(data, CERT_KEY)
    bundle = _certs(data, CA_CERT_KEY)
    return Material(
        cert=cert,
        key=_key(data, KEY_KEY),
        ca_cert=bundle[0],
        ca_key=_key(data, CA_KEY_KEY),
        bundle=bundle,
    )


def read_bundle(data: Mapping[str, object] | None) -> tuple[x509.Certificate, ...]:
    """The certificates of ``data["ca.crt"]``, or none when it does not parse."""
    if not isinstance(data, Mapping):
        return ()
    try:
        return _certs(data, CA_CERT_KEY)
    except UnusableSecret:
        return ()


def needs_renewal(
    not_before: dt.datetime, not_after: dt.datetime, now: dt.datetime, fraction: float
) -> bool:
    """Whether a certificate valid from ``not_before`` to ``not_after`` is due at ``now``:
    not yet valid, expired, or less than ``fraction`` of its lifetime left."""
    if now < not_before or now >= not_after:
        return True
    lifetime = not_after - not_before
    return (not_after - now) < lifetime * fraction


def _same_key(cert: x509.Certificate, key: PrivateKey) -> bool:
    return cert.public_key() == key.public_key()


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return constraints.ca


def _san_names(cert: x509.Certificate) -> set[str]:
    """The DNS names and IP addresses (as text) a certificate is valid for."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return set(san.get_values_for_type(x509.DNSName)) | ips


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@attrs.frozen
class Examination:
    """What is wrong with the material; empty tuples when it can stay."""

    #: Why the CA must be replaced (then the serving certificate too).
    ca: tuple[str, ...] = ()
    #: Why the serving certificate must be replaced.
    serving: tuple[str, ...] = ()
    #: The bundle carries a retiring CA that can go now.
    prune: bool = False

    @property
    def ok(self) -> bool:
        """Nothing to write."""
        return not (self.ca or self.serving or self.prune)

    @property
    def reasons(self) -> tuple[str, ...]:
        """Every problem, for the log."""
        return self.ca + self.serving + (("a retired CA is still in ca.crt",) if self.prune else ())


def examine(
    material: Material, names: Sequence[str], now: dt.datetime, policy: CertificatePolicy
) -> Examination:
    """Check the material for the webhook's ``names`` at ``now``."""
    ca, cert = material.ca_cert, material.cert
    ca_problems = []
    if not _is_ca(ca):
        ca_problems.append("data.ca.crt: its first certificate is not a CA")
    if not _same_key(ca, material.ca_key):
        ca_problems.append("data.ca.key: does not match the CA certificate")
    if needs_renewal(ca.not_valid_before_utc, ca.not_valid_after_utc, now, policy.renew_fraction):
        ca_problems.append("data.ca.crt: the CA expired or is due for renewal")
    if ca_problems:
        return Examination(ca=tuple(ca_problems))
    serving = []
    missing = sorted(set(names) - _san_names(cert))
    if missing:
        serving.append(f"data.tls.crt: not valid for {', '.join(missing)}")
    if not _signed_by(cert, ca):
        serving.append("data.tls.crt: not signed by the CA in data.ca.crt")
    if not _same_key(cert, material.key):
        serving.append("data.tls.key: does not match data.tls.crt")
    if needs_renewal(
        cert.not_valid_before_utc, cert.not_valid_after_utc, now, policy.renew_fraction
    ):
        serving.append("data.tls.crt: expired or due for renewal")
    retiring = material.bundle[1:]
    prune = bool(retiring) and (
        now - cert.not_valid_before_utc - policy.backdate >= policy.ca_overlap
        or any(c.not_valid_after_utc <= now or not _is_ca(c) for c in retiring)
    )
    return Examination(serving=tuple(serving), prune=prune and not serving)


_USAGE_OFF = {
    "digital_signature": False,
    "content_commitment": False,
    "key_encipherment": False,
    "data_encipherment": False,
    "key_agreement": False,
    "key_cert_sign": False,
    "crl_sign": False,
    "encipher_only": False,
    "decipher_only": False,
}
_CA_USAGE = x509.KeyUsage(**{**_USAGE_OFF, "key_cert_sign": True, "crl_sign": True})
_SERVING_USAGE = x509.KeyUsage(**{**_USAGE_OFF, "digital_signature": True})


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _new_ca(now: dt.datetime, policy: CertificatePolicy) -> tuple[x509.Certificate, PrivateKey]:
    key = _new_key()
    # A distinct subject per CA: during a rotation two CAs sit in one bundle, and chain
    # building must not confuse them.
    subject = _name(f"dynvol-webhook-ca-{now:%Y%m%d%H%M%S}-{secrets.token_hex(4)}")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - policy.backdate)
        .not_valid_after(now + policy.ca_lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _new_serving(
    ca: x509.Certificate,
    ca_key: PrivateKey,
    names: Sequence[str],
    now: dt.datetime,
    policy: CertificatePolicy,
) -> tuple[x509.Certificate, PrivateKey]:
    key = _new_key()
    not_after = min(now + policy.serving_lifetime, ca.not_valid_after_utc)
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - policy.backdate)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_SERVING_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def renew(
    material: Material | None,
    examination: Examination | None,
    names: Sequence[str],
    now: dt.datetime,
    policy: CertificatePolicy,
    *,
    trusted_before: Sequence[x509.Certificate] = (),
) -> Material:
    """The material to write instead of ``material`` (None: missing or unusable).

    A CA is kept unless ``examination`` faults it; a replaced CA that is still valid and
    was really the CA of ``material`` stays in the bundle as a retiring CA. When there is
    no usable material, ``trusted_before`` (the CAs of a Secret someone else wrote, e.g.
    cert-manager's ``ca.crt``) retire the same way: replicas may still serve what they
    signed.
    """
    if not names:
        raise ValueError("a serving certificate needs at least one name")
    keep_ca = material is not None and examination is not None and not examination.ca
    if material is not None and keep_ca:
        ca, ca_key = material.ca_cert, material.ca_key
        retiring = material.bundle[1:]
        if examination is not None and examination.prune:
            retiring = ()
        if examination is not None and not examination.serving:
            cert, key = material.cert, material.key
        else:
            cert, key = _new_serving(ca, ca_key, names, now, policy)
    else:
        ca, ca_key = _new_ca(now, policy)
        retiring = ()
        if (
            material is not None
            and _is_ca(material.ca_cert)
            and _same_key(material.ca_cert, material.ca_key)
            and material.ca_cert.not_valid_after_utc > now
        ):
            # Still trusted by the apiserver, and maybe still served by a replica.
            retiring = (material.ca_cert,)
        elif material is None:
            retiring = tuple(c for c in trusted_before if _is_ca(c))[:_MAX_RETIRING]
        cert, key = _new_serving(ca, ca_key, names, now, policy)
    retiring = tuple(c for c in retiring if c.not_valid_after_utc > now)
    return Material(cert=cert, key=key, ca_cert=ca, ca_key=ca_key, bundle=(ca, *retiring))
