"""Fixtures for the runtime's own tests, against the session's real etcd + kube-apiserver."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dynvol.testing.controlplane import ControlPlane
from dynvol_kube import APIConflict, APIError, APINotFound, Client, Resource

CRDS = Resource(
    "apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
    namespaced=False,
)  # fmt: skip
GROUP = "kube-tests.dynvol.example"
WIDGETS = Resource(GROUP, "v1", "widgets", "Widget")


@pytest.fixture(params=["session", "library"])
async def client(
    request: pytest.FixtureRequest, kube_client: Any, control_plane: ControlPlane
) -> AsyncIterator[Client]:
    """dynvol's client, once with its own session (what the services use) and once over
    the harness's kubernetes_asyncio ApiClient (which the harness closes)."""
    if request.param == "library":
        yield Client.wrap(kube_client)
        return
    own = await Client.from_kubeconfig(control_plane.kubeconfig)
    try:
        yield own
    finally:
        await own.close()


@pytest.fixture
async def widgets(client: Client) -> AsyncIterator[Resource]:
    """A schema-free namespaced resource of the tests' own, made for each test.

    Made fresh so that the apiserver's watch cache for it starts at today's
    resourceVersion: a watch from an older one is then answered with a real 410 Gone.
    """
    name = f"{WIDGETS.plural}.{GROUP}"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": name},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": WIDGETS.plural, "singular": "widget", "kind": WIDGETS.kind},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }
    await _gone(client, name)
    with contextlib.suppress(APIConflict):
        await client.create(CRDS, crd)
    try:
        deadline = time.monotonic() + 60
        while True:
            status = (await client.get(CRDS, name)).get("status") or {}
            if any(
                c.get("type") == "Established" and c.get("status") == "True"
                for c in status.get("conditions") or ()
            ):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"CRD {name} was not established")
            await asyncio.sleep(0.1)
        # Served only once discovery knows it (a list proves it), and watched only once
        # its watch cache is up: until then a watch is answered 429 "storage is
        # (re)initializing" while lists go to etcd. A one-second watch proves that.
        while True:
            try:
                listed = await client.list(WIDGETS)
                version = listed["metadata"]["resourceVersion"]
                async for _ in client.watch(WIDGETS, resource_version=version, timeout_seconds=1):
                    break
                break
            except APIError as exc:
                if exc.status not in (404, 429) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        yield WIDGETS
    finally:
        await _gone(client, name)


async def _gone(client: Client, name: str) -> None:
    with contextlib.suppress(APINotFound):
        await client.delete(CRDS, name)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            await client.get(CRDS, name)
        except APINotFound:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"CRD {name} was not deleted")
