"""Helpers for the controller integration tests (objects, polling)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dynvol_controllers.admission import OptIn, injected_mount, injected_volume
from dynvol_core import constants as c
from dynvol_kube import APINotFound, Client
from dynvol_kube.resources import CLAIMS, CLASSES, PODS, SECRETS

SYSTEM_NAMESPACE = c.DEFAULT_SYSTEM_NAMESPACE


async def eventually(
    check: Callable[[], Awaitable[Any]], *, within: float = 20.0, interval: float = 0.1
) -> Any:
    """Await ``check()`` until it returns a truthy value (returned) or fail after timeout."""
    deadline = time.monotonic() + within
    last: Any = None
    while True:
        try:
            last = await check()
        except AssertionError as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s; last: {last!r}")
        await asyncio.sleep(interval)


def pod_manifest(
    name: str,
    *,
    labels: dict[str, str],
    node: str | None,
    class_name: str | None = None,
    policy: str = c.POLICY_INDEPENDENT,
    annotations: dict[str, str] | None = None,
    tolerations: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A pod; with ``class_name`` it carries the volume and mount the webhook injects."""
    container: dict[str, Any] = {"name": "app", "image": "registry.invalid/app:1"}
    spec: dict[str, Any] = {"containers": [container], "terminationGracePeriodSeconds": 0}
    if tolerations:
        spec["tolerations"] = tolerations
    if node:
        spec["nodeName"] = node
    if class_name:
        opt_in = OptIn(class_name, "/dynamic", policy)
        spec["volumes"] = [injected_volume(opt_in)]
        container["volumeMounts"] = [injected_mount(opt_in)]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "annotations": annotations or {}},
        "spec": spec,
    }


class Objects:
    """Creates test objects and deletes them all afterwards (no GC runs here)."""

    def __init__(self, client: Client, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self.classes: list[str] = []
        self.secrets: list[tuple[str, str]] = []
        self.suffix = secrets.token_hex(3)

    async def secret(self, name: str, data: dict[str, str], namespace: str | None = None) -> Any:
        ns = namespace or self.namespace
        body = {"metadata": {"name": name, "namespace": ns}, "type": "Opaque", "stringData": data}
        obj = await self.client.create(SECRETS, body, namespace=ns)
        self.secrets.append((ns, name))
        return obj

    async def storage_class(
        self,
        name: str,
        *,
        provider: str = "s3",
        secret: str | None = None,
        allowed_namespaces: list[str] | None = None,
        parameters: dict[str, str] | None = None,
    ) -> Any:
        params = {
            c.PARAM_MOUNT_CPU_REQUEST: "10m",
            c.PARAM_MOUNT_MEMORY_REQUEST: "50Mi",
            **(parameters or {}),
        }
        if secret:
            params[c.PARAM_SECRET_NAME] = secret
            params[c.PARAM_SECRET_NAMESPACE] = self.namespace
        # The claims these tests make point at 127.0.0.1 (see claim()).
        spec: dict[str, Any] = {
            "provider": provider,
            "parameters": params,
            "connection": {"allowLoopback": True},
        }
        if allowed_namespaces is not None:
            spec["allowedNamespaces"] = allowed_namespaces
        obj = await self.client.create(
            CLASSES,
            {
                "apiVersion": c.API_VERSION,
                "kind": c.KIND_CLASS,
                "metadata": {"name": name},
                "spec": spec,
            },
        )
        self.classes.append(name)
        return obj

    async def claim(
        self,
        name: str,
        *,
        selector: dict[str, str],
        mountpoint: str = "/data",
        provider: str = "s3",
        config: dict[str, Any] | None = None,
        namespace: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Any:
        spec: dict[str, Any] = {
            "storageProvider": provider,
            "mountpoint": mountpoint,
            "selector": {"matchLabels": selector},
        }
        block = {"s3": "s3Config", "nfs": "nfsConfig", "rclone": "rcloneConfig"}.get(
            provider, "config"
        )
        spec[block] = (
            config
            if config is not None
            else {"bucket": "dynvol-test", "endpoint": "http://127.0.0.1:9"}
        )
        spec.update(extra or {})
        ns = namespace or self.namespace
        return await self.client.create(
            CLAIMS,
            {
                "apiVersion": c.API_VERSION,
                "kind": c.KIND_CLAIM,
                "metadata": {"name": name, "namespace": ns},
                "spec": spec,
            },
            namespace=ns,
        )

    async def pod(self, name: str, **kw: Any) -> Any:
        return await self.client.create(PODS, pod_manifest(name, **kw), namespace=self.namespace)

    async def delete_pod(self, name: str, namespace: str | None = None) -> None:
        with contextlib.suppress(APINotFound):
            await self.client.delete(
                PODS, name, namespace=namespace or self.namespace, grace_seconds=0
            )

    async def cleanup(self) -> None:
        for name in self.classes:
            try:
                await self.client.patch(CLASSES, name, {"metadata": {"finalizers": None}})
                await self.client.delete(CLASSES, name)
            except APINotFound:
                pass
        for ns, name in self.secrets:
            with contextlib.suppress(APINotFound):
                await self.client.delete(SECRETS, name, namespace=ns)


async def list_items(client: Client, resource: Any, **kw: Any) -> list[dict[str, Any]]:
    """All items of a list call."""
    page = await client.list(resource, **kw)
    items: list[dict[str, Any]] = page.get("items") or []
    return items
