"""Fixtures for the controller tests: a dynvol client, the system namespace, objects.

Everything runs against the session's real etcd + kube-apiserver. No kubelet and no
kube-controller-manager run: pods are bound to made-up nodes by setting ``nodeName``, stay
Pending, and are deleted with grace 0; nothing garbage-collects owned objects.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dynvol_controllers import standalone_slicer
from dynvol_kube import APIConflict, Client, Manager
from dynvol_kube.resources import NAMESPACES

from .controller_support import SYSTEM_NAMESPACE, Objects


@pytest.fixture
async def client(kube_client: Any) -> AsyncIterator[Client]:
    """dynvol's own client over the harness's ApiClient."""
    return Client.wrap(kube_client)


@pytest.fixture
async def system_namespace(client: Client) -> str:
    """dynvol's system namespace (shared by the session; never deleted)."""
    with contextlib.suppress(APIConflict):
        await client.create(NAMESPACES, {"metadata": {"name": SYSTEM_NAMESPACE}})
    return SYSTEM_NAMESPACE


@pytest.fixture
async def objects(client: Client, namespace: str) -> AsyncIterator[Objects]:
    """Create classes, claims, pods and Secrets; classes and Secrets are removed after."""
    made = Objects(client, namespace)
    try:
        yield made
    finally:
        await made.cleanup()


@pytest.fixture
async def slicer(client: Client) -> AsyncIterator[Manager]:
    """The controller's claim slicer on its own (``standalone_slicer``), which keeps the
    nodes' claim slices as ``dynvol controller`` does; node reconcilers read them."""
    manager = standalone_slicer(client)
    await manager.start()
    try:
        yield manager
    finally:
        await manager.close()
