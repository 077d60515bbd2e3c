"""The validity period of X.509 certificates, read from DER without a crypto library.

``kubectl dynvol doctor`` reports when the webhook's CA (the caBundle of its
configuration) and its serving certificate expire. Only the few DER elements on the way to
``tbsCertificate.validity`` are read: Certificate ::= SEQUENCE { tbsCertificate SEQUENCE {
[0] version OPTIONAL, serialNumber INTEGER, signature SEQUENCE, issuer SEQUENCE, validity
SEQUENCE { notBefore Time, notAfter Time }, ... }, ... } (RFC 5280 §4.1).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re

__all__ = ["CertificateError", "not_after", "pem_certificates"]

_PEM = re.compile(
    rb"-----BEGIN CERTIFICATE-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END CERTIFICATE-----"
)
_SEQUENCE, _INTEGER, _UTC_TIME, _GENERALIZED_TIME, _VERSION = 0x30, 0x02, 0x17, 0x18, 0xA0


class CertificateError(ValueError):
    """The bytes are not a certificate this reader understands."""


def pem_certificates(pem: bytes) -> list[bytes]:
    """The DER bytes of each ``CERTIFICATE`` block in ``pem``."""
    found = []
    for match in _PEM.finditer(pem):
        try:
            found.append(base64.b64decode(b"".join(match.group(1).split()), validate=True))
        except binascii.Error as exc:
            raise CertificateError(f"a PEM block is not base64: {exc}") from exc
    return found


def _element(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at ``at``."""
    if at + 2 > len(der):
        raise CertificateError("truncated")
    tag, length = der[at], der[at + 1]
    at += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or at + count > len(der):
            raise CertificateError("bad length")
        length = int.from_bytes(der[at : at + count], "big")
        at += count
    if at + length > len(der):
        raise CertificateError("truncated")
    return tag, at, at + length


def _time(tag: int, value: bytes) -> dt.datetime:
    try:
        raw = value.decode("ascii")
        if tag == _UTC_TIME:  # YYMMDDHHMMSSZ; RFC 5280: 50-99 are 19xx
            parsed = dt.datetime.strptime(raw, "%y%m%d%H%M%SZ")
            if parsed.year >= 2050:
                parsed = parsed.replace(year=parsed.year - 100)
        elif tag == _GENERALIZED_TIME:
            parsed = dt.datetime.strptime(raw, "%Y%m%d%H%M%SZ")
        else:
            raise CertificateError(f"validity time has tag {tag:#x}")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CertificateError(f"bad validity time: {exc}") from exc
    return parsed.replace(tzinfo=dt.UTC)


def not_after(der: bytes) -> dt.datetime:
    """When the certificate ``der`` expires; :raises CertificateError:."""
    tag, start, _ = _element(der, 0)
    if tag != _SEQUENCE:
        raise CertificateError("not a certificate (no outer SEQUENCE)")
    tag, at, tbs_end = _element(der, start)
    if tag != _SEQUENCE:
        raise CertificateError("not a certificate (no tbsCertificate)")
    tag, _, end = _element(der, at)
    if tag == _VERSION:
        at = end
    for expected in (_INTEGER, _SEQUENCE, _SEQUENCE):  # serial, signature, issuer
        tag, _, end = _element(der, at)
        if tag != expected:
            raise CertificateError(f"unexpected element {tag:#x} before validity")
        at = end
    tag, at, end = _element(der, at)
    if tag != _SEQUENCE or end > tbs_end:
        raise CertificateError("no validity")
    _, _, first_end = _element(der, at)  # notBefore
    tag, start, stop = _element(der, first_end)
    return _time(tag, der[start:stop])
