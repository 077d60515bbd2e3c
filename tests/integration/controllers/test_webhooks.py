"""The admission webhooks, registered with the real apiserver and served on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest

from dynvol.testing import free_port
from dynvol_controllers import ControllerApp, DevCerts, ensure_dev_certs, register_webhooks
from dynvol_controllers.certificates import renew_serving_cert
from dynvol_core import constants as c
from dynvol_kube import APIError, Client
from dynvol_kube.resources import (
    MUTATING_WEBHOOKS,
    NAMESPACES,
    PODS,
    VALIDATING_WEBHOOKS,
)
from dynvol_providers.registry import load_registry

from .controller_support import Objects, eventually, pod_manifest

pytestmark = pytest.mark.integration

ANNOTATED = {
    c.ANNOTATION_STORAGE_PROVIDER_CLASS: "s3-sample",
    c.ANNOTATION_MOUNT_PATH_ROOT: "/dynamic",
}


@attrs.frozen
class Served:
    """The running controller and the CA its webhook certificate chains to."""

    app: ControllerApp
    ca: Path

    @property
    def controller(self) -> Any:
        return self.app.controller

    @property
    def url(self) -> str:
        assert self.app.webhook is not None
        return self.app.webhook.url


@pytest.fixture
async def webhook_app(
    client: Client, system_namespace: str, tmp_path: Path
) -> AsyncIterator[Served]:
    """dynvol controller in-process, with its webhooks registered with the apiserver."""
    certs = ensure_dev_certs(tmp_path / "certs")
    app = ControllerApp(
        client=client,
        tls_cert=str(certs.cert),
        tls_key=str(certs.key),
        webhook_port=free_port(),
        lease_name=f"dynvol-test-{secrets.token_hex(3)}",
        lease_namespace=system_namespace,
        lease_duration=3,
        renew_deadline=2,
        retry_period=0.5,
        registry=load_registry(),
    )
    name = f"dynvol-test-{secrets.token_hex(3)}"
    await app.start()
    try:
        assert app.webhook is not None
        await register_webhooks(client, ca_bundle=certs.ca_bundle, url=app.webhook.url, name=name)
        await _wait_for_webhooks(client)
        yield Served(app, certs.ca_cert)
    finally:
        for resource in (MUTATING_WEBHOOKS, VALIDATING_WEBHOOKS):
            with contextlib.suppress(APIError):
                await client.delete(resource, name)
        await app.close()


async def _wait_for_webhooks(client: Client) -> None:
    """The apiserver picks up new webhook configurations asynchronously; probe (dry run)."""
    ns = "default"
    probe = pod_manifest(
        f"probe-{secrets.token_hex(3)}", labels={}, node=None, annotations=ANNOTATED
    )

    async def mutated() -> bool:
        created = await client.request(
            "POST", PODS.path(namespace=ns), params={"dryRun": "All"}, body=probe
        )
        return any(v["name"] == c.VOLUME_NAME for v in created["spec"].get("volumes") or ())

    await eventually(mutated, within=30, interval=0.3)


def _container_mounts(pod: dict[str, Any], field: str = "containers") -> list[list[str]]:
    return [
        [m["mountPath"] for m in ctr.get("volumeMounts") or () if m["name"] == c.VOLUME_NAME]
        for ctr in pod["spec"].get(field) or ()
    ]


async def test_annotated_pod_gets_volume_and_mounts(
    client: Client, namespace: str, webhook_app: Served
) -> None:
    body = pod_manifest("annotated", labels={"app": "x"}, node=None, annotations=ANNOTATED)
    body["spec"]["containers"].append({"name": "second", "image": "registry.invalid/b:1"})
    body["spec"]["initContainers"] = [
        {"name": "setup", "image": "registry.invalid/i:1"},
        {"name": "sidecar", "image": "registry.invalid/s:1", "restartPolicy": "Always"},
    ]
    created = await client.create(PODS, body, namespace=namespace)
    stored = await client.get(PODS, "annotated", namespace=namespace)
    assert stored["metadata"]["uid"] == created["metadata"]["uid"]
    volume = next(v for v in stored["spec"]["volumes"] if v["name"] == c.VOLUME_NAME)
    assert volume["csi"] == {
        "driver": c.DRIVER_NAME,
        "readOnly": True,
        "volumeAttributes": {
            "mountPodDispatchPolicy": "independent",
            "storageProviderClass": "s3-sample",
        },
    }
    assert _container_mounts(stored) == [["/dynamic"], ["/dynamic"]]
    assert _container_mounts(stored, "initContainers") == [[], ["/dynamic"]]
    mount = next(
        m for m in stored["spec"]["containers"][0]["volumeMounts"] if m["name"] == c.VOLUME_NAME
    )
    assert mount["mountPropagation"] == "HostToContainer"
    assert mount["readOnly"] is True

    # Re-invocation (the apiserver's reinvocationPolicy, or a retry) changes nothing.
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "re-1",
            "operation": "CREATE",
            "namespace": namespace,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "object": stored,
        },
    }
    context = ssl.create_default_context(cafile=str(webhook_app.ca))
    async with (
        aiohttp.ClientSession() as session,
        session.post(webhook_app.url + "/mutate-pods", json=review, ssl=context) as response,
    ):
        answer = json.loads(await response.read())
    assert answer["response"]["allowed"] is True
    assert "patch" not in answer["response"]


async def test_pod_without_annotations_is_untouched(
    client: Client, namespace: str, webhook_app: Served
) -> None:
    body = pod_manifest("plain", labels={"app": "x"}, node=None)
    await client.create(PODS, body, namespace=namespace)
    stored = await client.get(PODS, "plain", namespace=namespace)
    assert not [v for v in stored["spec"].get("volumes") or () if v["name"] == c.VOLUME_NAME]
    assert _container_mounts(stored) == [[]]


async def test_root_path_conflict_is_refused(
    client: Client, namespace: str, webhook_app: Served
) -> None:
    body = pod_manifest("clash", labels={}, node=None, annotations=ANNOTATED)
    body["spec"]["volumes"] = [{"name": "scratch", "emptyDir": {}}]
    body["spec"]["containers"][0]["volumeMounts"] = [{"name": "scratch", "mountPath": "/dynamic"}]
    with pytest.raises(APIError, match="dynamic volume root"):
        await client.create(PODS, body, namespace=namespace)


async def test_namespace_opt_in(client: Client, namespace: str, webhook_app: Served) -> None:
    await client.patch(
        NAMESPACES,
        namespace,
        {
            "metadata": {
                "labels": {f"{c.GROUP}/inject": "enabled"},
                "annotations": {
                    c.ANNOTATION_STORAGE_PROVIDER_CLASS: "ns-default",
                    c.ANNOTATION_DISPATCH_POLICY: "shared",
                },
            }
        },
    )

    async def mutated() -> dict[str, Any] | None:
        name = f"ns-{secrets.token_hex(3)}"
        await client.create(PODS, pod_manifest(name, labels={}, node=None), namespace=namespace)
        stored = await client.get(PODS, name, namespace=namespace)
        volumes = [v for v in stored["spec"].get("volumes") or () if v["name"] == c.VOLUME_NAME]
        return volumes[0] if volumes else None

    # The webhook's namespace cache learns about the new labels through its watch.
    volume = await eventually(mutated, within=30, interval=0.3)
    assert volume["csi"]["volumeAttributes"] == {
        "storageProviderClass": "ns-default",
        "mountPodDispatchPolicy": "shared",
    }


async def test_validating_webhook_refuses_bad_claims(
    client: Client, objects: Objects, webhook_app: Served
) -> None:
    ns = objects.namespace
    with pytest.raises(APIError, match="unknown storage provider 'nosuch'"):
        await objects.claim("unknown", selector={"a": "b"}, provider="nosuch", config={"k": "v"})

    with pytest.raises(APIError, match="bucket"):
        await objects.claim("malformed", selector={"a": "b"}, config={"bucket": "Not_A_Bucket!"})
    with pytest.raises(APIError, match="selector"):
        await objects.claim("everything", selector={})

    spc = f"only-other-{objects.suffix}"
    await objects.storage_class(spc, allowed_namespaces=["somewhere-else"])

    async def class_seen() -> bool:
        # The webhook reads classes from its informer, a moment behind the create.
        return bool(webhook_app.controller.classes.store.get(spc))

    await eventually(class_seen)
    with pytest.raises(APIError, match="may not be used in namespace"):
        await objects.claim("pinned", selector={"a": "b"}, extra={"storageProviderClass": spc})

    # Overlapping mountpoints of claims that select the same (opted-in) pod.
    await objects.pod("target", labels={"app": "t"}, node="n1", class_name="s3-sample")

    async def seen() -> bool:
        return bool(webhook_app.controller.pods.store.get(f"{ns}/target"))

    await eventually(seen)
    await objects.claim("one", selector={"app": "t"}, mountpoint="/data")
    with pytest.raises(APIError, match="overlaps the mountpoint"):
        await objects.claim("two", selector={"app": "t"}, mountpoint="/data/nested")
    # Elsewhere it is fine.
    await objects.claim("three", selector={"app": "t"}, mountpoint="/other")
    await objects.delete_pod("target")


def _serial(pem_or_der: bytes | str) -> str:
    """The certificate's serial number, as openssl prints it."""
    pem = pem_or_der if isinstance(pem_or_der, str) else ssl.DER_cert_to_PEM_cert(pem_or_der)
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-serial"],
        input=pem,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return out.stdout.strip()


async def _healthz(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[bytes, bytes]:
    """One keep-alive GET /healthz on an open connection: (status line, peer cert DER)."""
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n")
    await writer.drain()
    status = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return status, der


async def test_serving_certificate_is_reloaded_without_a_restart(
    client: Client, namespace: str, webhook_app: Served, tmp_path: Path
) -> None:
    server = webhook_app.app.webhook
    assert server is not None
    certs = DevCerts(
        webhook_app.ca.parent,
        webhook_app.ca,
        Path(server.cert_file),
        Path(server.key_file),
    )
    context = ssl.create_default_context(cafile=str(certs.ca_cert))
    old_serial = _serial(certs.cert.read_text())

    # A connection made before the rotation ...
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=context)
    try:
        status, der = await _healthz(reader, writer)
        assert status.startswith(b"HTTP/1.1 200")
        assert _serial(der) == old_serial

        renew_serving_cert(certs)
        new_serial = _serial(certs.cert.read_text())
        assert new_serial != old_serial

        # ... keeps working with the certificate it was made with (nothing in flight drops),
        status, der = await _healthz(reader, writer)
        assert status.startswith(b"HTTP/1.1 200")
        assert _serial(der) == old_serial
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()

    # while every new connection gets the new one, from the same running server.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=context)
    try:
        status, der = await _healthz(reader, writer)
        assert status.startswith(b"HTTP/1.1 200")
        assert _serial(der) == new_serial
        assert der == ssl.PEM_cert_to_DER_cert(certs.cert.read_text())
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()
    assert server.certificate.reloads == 1

    # The apiserver still reaches the webhook (same CA): an annotated pod is mutated.
    async def mutated() -> bool:
        name = f"after-{secrets.token_hex(3)}"
        body = pod_manifest(name, labels={}, node=None, annotations=ANNOTATED)
        made = await client.create(PODS, body, namespace=namespace)
        return any(v["name"] == c.VOLUME_NAME for v in made["spec"].get("volumes") or ())

    await eventually(mutated, within=30, interval=0.3)

    # A half-written pair (a certificate without its key) keeps the last good one serving.
    (tmp_path / "other").mkdir()
    stray = ensure_dev_certs(tmp_path / "other")
    os.replace(stray.cert, certs.cert)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=context)
    try:
        _, der = await _healthz(reader, writer)
        assert _serial(der) == new_serial
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()
