"""Development TLS material for the webhook server: a CA and a serving certificate.

``dynvol controller --dev-certs DIR`` uses :func:`ensure_dev_certs` so that a local
kube-apiserver can call the webhook on 127.0.0.1: it writes ``ca.crt``, ``tls.crt``,
``tls.key`` and ``ca-bundle.b64`` (the ``caBundle`` value for the webhook configurations).
Production clusters mount a certificate from cert-manager (or similar) instead and pass
``--tls-cert``/``--tls-key``. Uses the ``openssl`` command line tool.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import attrs

__all__ = ["DevCerts", "ensure_dev_certs", "renew_serving_cert"]


@attrs.frozen
class DevCerts:
    """Where the generated files are, and the caBundle to register."""

    dir: Path
    ca_cert: Path
    cert: Path
    key: Path

    @property
    def ca_bundle(self) -> str:
        """The CA certificate, base64-encoded, as ``webhooks[].clientConfig.caBundle``."""
        return base64.b64encode(self.ca_cert.read_bytes()).decode()


def _openssl(*args: str) -> None:
    result = subprocess.run(
        ["openssl", *args], capture_output=True, text=True, check=False, timeout=60
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def ensure_dev_certs(
    directory: str | os.PathLike[str],
    *,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    days: int = 365,
) -> DevCerts:
    """Create (or reuse, when all files exist) a CA and a serving cert for ``hosts``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    certs = DevCerts(d, d / "ca.crt", d / "tls.crt", d / "tls.key")
    if all(p.exists() for p in (certs.ca_cert, certs.cert, certs.key, d / "ca.key")):
        return certs
    ca_key = d / "ca.key"
    _openssl("genrsa", "-out", str(ca_key), "2048")
    _openssl(
        "req",
        "-x509",
        "-new",
        "-key",
        str(ca_key),
        "-sha256",
        "-days",
        str(days),
        "-subj",
        "/CN=dynvol-webhook-dev-ca",
        "-out",
        str(certs.ca_cert),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    _issue_serving_cert(d, hosts, days, key_out=certs.key, cert_out=certs.cert)
    ca_key.chmod(0o600)
    (d / "ca-bundle.b64").write_text(certs.ca_bundle + "\n")
    return certs


def renew_serving_cert(
    certs: DevCerts, *, hosts: Sequence[str] = ("127.0.0.1", "localhost"), days: int = 365
) -> None:
    """Issue a new key and serving certificate from the same CA, replacing the files.

    Each file is written aside and renamed into place, so a reader sees the old file or
    the new one, never half of one; the webhook server picks the pair up on its next
    handshake (:class:`dynvol_controllers.webhooks.ServingCertificate`).
    """
    with tempfile.TemporaryDirectory(dir=certs.dir) as tmp:
        key = Path(tmp) / "tls.key"
        cert = Path(tmp) / "tls.crt"
        _issue_serving_cert(certs.dir, hosts, days, key_out=key, cert_out=cert)
        os.replace(key, certs.key)
        os.replace(cert, certs.cert)


def _issue_serving_cert(
    d: Path, hosts: Sequence[str], days: int, *, key_out: Path, cert_out: Path
) -> None:
    sans = []
    for host in hosts:
        try:
            ipaddress.ip_address(host)
            sans.append(f"IP:{host}")
        except ValueError:
            sans.append(f"DNS:{host}")
    _openssl("genrsa", "-out", str(key_out), "2048")
    key_out.chmod(0o600)
    with tempfile.TemporaryDirectory() as tmp:
        csr = Path(tmp) / "tls.csr"
        ext = Path(tmp) / "ext.cnf"
        ext.write_text(
            "basicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            f"subjectAltName={','.join(sans)}\n"
        )
        _openssl("req", "-new", "-key", str(key_out), "-subj", f"/CN={hosts[0]}", "-out", str(csr))
        _openssl(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(d / "ca.crt"),
            "-CAkey",
            str(d / "ca.key"),
            "-CAcreateserial",
            "-days",
            str(days),
            "-sha256",
            "-extfile",
            str(ext),
            "-out",
            str(cert_out),
        )
