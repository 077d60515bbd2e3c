"""The client's own transport against the real kube-apiserver: every way of authenticating
that :mod:`dynvol_kube.kubeconfig` reads, the fallback to kubernetes_asyncio's loader for a
credential plugin, and that a service process never imports the generated client."""

from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dynvol.testing.controlplane import ControlPlane
from dynvol_kube import APIError, APIForbidden, APINotFound, Client, KubeconfigError, Resource
from dynvol_kube import kubeconfig as kubeconfig_module

pytestmark = pytest.mark.integration

NAMESPACES = Resource("", "v1", "namespaces", "Namespace", namespaced=False)
SERVICE_ACCOUNTS = Resource("", "v1", "serviceaccounts", "ServiceAccount")
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")


def _write_kubeconfig(path: Path, plane: ControlPlane, user: dict[str, Any]) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {
                    "server": plane.server,
                    "certificate-authority-data": base64.b64encode(
                        plane.ca_file.read_bytes()
                    ).decode(),
                },
            }
        ],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "ctx",
    }
    path.write_text(json.dumps(config))
    return path


def _client_certificate(plane: ControlPlane, common_name: str, group: str) -> tuple[bytes, bytes]:
    """A client certificate from the apiserver's client CA (PEM certificate, PEM key)."""
    ca_key = serialization.load_pem_private_key(
        (plane.ca_file.parent / "ca.key").read_bytes(), None
    )
    ca_cert = x509.load_pem_x509_certificate(plane.ca_file.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, group),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _inline_copies() -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob("dynvol-kubeconfig-*"))


@pytest.fixture
async def admin(control_plane: ControlPlane) -> AsyncIterator[Client]:
    client = await Client.from_kubeconfig(control_plane.kubeconfig)
    try:
        yield client
    finally:
        await client.close()


async def _service_account_token(admin: Client, namespace: str, name: str) -> str:
    await admin.create(
        SERVICE_ACCOUNTS, {"metadata": {"name": name, "namespace": namespace}}, namespace=namespace
    )
    request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": 3600},
    }
    path = SERVICE_ACCOUNTS.path(namespace=namespace, name=name, subresource="token")
    answer = await admin.request("POST", path, body=request)
    token: str = answer["status"]["token"]
    return token


async def test_a_static_token_kubeconfig_uses_the_clients_own_session(
    control_plane: ControlPlane, admin: Client, namespace: str
) -> None:
    assert type(admin._transport).__name__ == "_Session"
    created = await admin.create(
        CONFIGMAPS, {"metadata": {"name": "cm"}, "data": {"a": "1"}}, namespace=namespace
    )
    patched = await admin.patch(CONFIGMAPS, "cm", {"data": {"b": "2"}}, namespace=namespace)
    assert patched["data"] == {"a": "1", "b": "2"}
    assert int(patched["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    with pytest.raises(APINotFound) as caught:
        await admin.get(CONFIGMAPS, "missing", namespace=namespace)
    assert caught.value.reason == "NotFound"
    assert caught.value.__cause__ is not None  # the HTTP library's own error
    events = admin.watch(
        CONFIGMAPS, namespace=namespace, resource_version=created["metadata"]["resourceVersion"],
        timeout_seconds=5,
    )  # fmt: skip
    kind, obj = await anext(events)
    await events.aclose()
    assert (kind, obj["metadata"]["name"]) == ("MODIFIED", "cm")


async def test_a_client_certificate_inline_and_from_files(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    cert, key = _client_certificate(control_plane, "dynvol-test-admin", "system:masters")
    (tmp_path / "client.crt").write_bytes(cert)
    (tmp_path / "client.key").write_bytes(key)
    users = {
        "inline": {
            "client-certificate-data": base64.b64encode(cert).decode(),
            "client-key-data": base64.b64encode(key).decode(),
        },
        # Relative paths are relative to the kubeconfig's directory.
        "files": {"client-certificate": "client.crt", "client-key": "client.key"},
    }
    for what, user in users.items():
        path = _write_kubeconfig(tmp_path / f"{what}.kubeconfig", control_plane, user)
        async with await Client.from_kubeconfig(path) as client:
            assert type(client._transport).__name__ == "_Session"
            listed = await client.list(NAMESPACES, limit=1)
            assert listed["kind"] == "NamespaceList", what
    # No temporary copy of the inline key is left behind.
    assert _inline_copies() == []


async def test_a_certificate_from_another_ca_is_refused(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    path = _write_kubeconfig(tmp_path / "k", control_plane, {"token": "whatever"})
    config = json.loads(path.read_text())
    other = x509.CertificateBuilder()  # a self-signed CA the apiserver's certificate is not from
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "another-ca")])
    now = dt.datetime.now(dt.UTC)
    ca = (
        other.subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    pem = ca.public_bytes(serialization.Encoding.PEM)
    config["clusters"][0]["cluster"]["certificate-authority-data"] = base64.b64encode(pem).decode()
    path.write_text(json.dumps(config))
    async with await Client.from_kubeconfig(path) as client:
        with pytest.raises(APIError) as caught:
            await client.list(NAMESPACES, limit=1)
    assert "certificate verify failed" in str(caught.value)


async def test_in_cluster_service_account_and_token_rotation(
    control_plane: ControlPlane,
    admin: Client,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = await _service_account_token(admin, namespace, "reader")
    sa_dir = tmp_path / "serviceaccount"
    sa_dir.mkdir()
    (sa_dir / "token").write_text(token)
    (sa_dir / "ca.crt").write_bytes(control_plane.ca_file.read_bytes())
    (sa_dir / "namespace").write_text(namespace)
    host, port = control_plane.server.removeprefix("https://").rsplit(":", 1)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    endpoint = kubeconfig_module.in_cluster(sa_dir)
    assert endpoint.namespace == namespace
    client = await Client.from_endpoint(endpoint)
    try:
        # The service account has no role: authenticated (403, not 401) as itself.
        with pytest.raises(APIForbidden) as caught:
            await client.list(CONFIGMAPS, namespace=namespace)
        assert f"system:serviceaccount:{namespace}:reader" in str(caught.value)
        # kubelet rotates the token file: the client reads it again (here at once).
        monkeypatch.setattr(kubeconfig_module, "TOKEN_REREAD_SECONDS", 0.0)
        (sa_dir / "token").write_text("not-a-token")
        with pytest.raises(APIError) as refused:
            await client.list(CONFIGMAPS, namespace=namespace)
        assert refused.value.status == 401
        (sa_dir / "token").write_text(token)
        with pytest.raises(APIForbidden):
            await client.list(CONFIGMAPS, namespace=namespace)
    finally:
        await client.close()


async def test_a_token_file_in_a_kubeconfig(
    control_plane: ControlPlane, admin: Client, namespace: str, tmp_path: Path
) -> None:
    token = await _service_account_token(admin, namespace, "filed")
    (tmp_path / "token").write_text(token + "\n")
    path = _write_kubeconfig(tmp_path / "k", control_plane, {"tokenFile": "token"})
    async with await Client.from_kubeconfig(path) as client:
        with pytest.raises(APIForbidden) as caught:
            await client.get(NAMESPACES, namespace)
    assert f"system:serviceaccount:{namespace}:filed" in str(caught.value)


async def test_a_credential_plugin_goes_through_kubernetes_asyncio(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    plugin = tmp_path / "credential-plugin"
    credential = {
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": {"token": control_plane.token},
    }
    plugin.write_text(f"#!/bin/sh\ncat <<'EOF'\n{json.dumps(credential)}\nEOF\n")
    plugin.chmod(0o755)
    user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": str(plugin),
            "interactiveMode": "Never",
        }
    }
    path = _write_kubeconfig(tmp_path / "k", control_plane, user)
    assert kubeconfig_module.from_kubeconfig_file(path) is None
    async with await Client.from_kubeconfig(path) as client:
        assert type(client._transport).__name__ == "_Library"
        listed = await client.list(NAMESPACES, limit=1)
    assert listed["kind"] == "NamespaceList"


async def test_a_bad_kubeconfig_names_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text(json.dumps({"current-context": "gone", "contexts": []}))
    with pytest.raises(KubeconfigError, match="contexts has no entry named 'gone'"):
        await Client.from_kubeconfig(path)


def test_services_do_not_import_the_generated_client(control_plane: ControlPlane) -> None:
    """The three services' modules, and a request through the client, in a fresh process:
    kubernetes_asyncio is never imported."""
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        import dynvol_dmp.agent, dynvol_csi.server, dynvol_controllers.app, dynvol.wiring
        from dynvol_kube import Client, Resource

        async def main():
            async with await Client.from_kubeconfig({str(control_plane.kubeconfig)!r}) as c:
                await c.list(Resource("", "v1", "namespaces", "Namespace", namespaced=False))

        asyncio.run(main())
        loaded = sorted(m for m in sys.modules if m.startswith("kubernetes_asyncio"))
        print(loaded)
        sys.exit(1 if loaded else 0)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
