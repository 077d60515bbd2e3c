"""Claim slices against the real apiserver: the controller's slicer writes each node the
claims that select its pods, and only when those change."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dynvol_kube import APINotFound, Client, Manager
from dynvol_kube.resources import CLAIM_SLICES, CLAIMS, NODES, PODS

from .controller_support import Objects, eventually

pytestmark = pytest.mark.integration


@pytest.fixture
def nodes() -> list[str]:
    tag = secrets.token_hex(3)
    return [f"slice-{tag}-{i}" for i in range(3)]


@pytest.fixture
async def cleanup(client: Client, nodes: list[str], namespace: str) -> AsyncIterator[None]:
    yield
    for raw in (await client.list(CLAIMS, namespace=namespace)).get("items") or ():
        with contextlib.suppress(APINotFound):
            await client.delete(CLAIMS, raw["metadata"]["name"], namespace=namespace)
    for node in nodes:
        with contextlib.suppress(APINotFound):
            await client.delete(CLAIM_SLICES, node)
        with contextlib.suppress(APINotFound):
            await client.delete(NODES, node)


async def _slice(client: Client, node: str) -> dict[str, Any] | None:
    try:
        return await client.get(CLAIM_SLICES, node)  # type: ignore[no-any-return]
    except APINotFound:
        return None


async def _names(client: Client, node: str) -> list[str] | None:
    obj = await _slice(client, node)
    if obj is None:
        return None
    return [e["name"] for e in obj["spec"]["claims"]]


async def _names_are(client: Client, node: str, want: list[str] | None) -> bool:
    return await _names(client, node) == want


async def test_each_node_gets_the_claims_of_its_pods_and_nothing_else(
    client: Client,
    objects: Objects,
    slicer: Manager,
    nodes: list[str],
    namespace: str,
    cleanup: None,
) -> None:
    a, b, c_node = nodes
    node_a = await client.create(NODES, {"metadata": {"name": a}})
    await objects.pod("web-a", labels={"app": "web"}, node=a, class_name="s3-sample")
    # Opted in, selected by no claim: its node gets an empty slice.
    await objects.pod("lone", labels={"app": "none-of-them"}, node=c_node, class_name="s3-sample")
    await objects.pod("web-b", labels={"app": "web"}, node=b, class_name="s3-sample")
    await objects.pod("db-b", labels={"app": "db"}, node=b, class_name="s3-sample")
    # Selected by the claim but not opted in: no mount can reach it, so no slice needs it.
    await objects.pod("web-c", labels={"app": "web"}, node=f"{c_node}-bare")
    web = await objects.claim("web", selector={"app": "web"})
    await objects.claim("db", selector={"app": "db"}, mountpoint="/db")
    await objects.claim("nobody", selector={"app": "none"}, mountpoint="/n")

    async def sliced() -> bool:
        return await _names(client, a) == ["web"] and await _names(client, b) == ["db", "web"]

    await eventually(sliced)
    await eventually(lambda: _names_are(client, c_node, []))
    # The node with only a pod that did not opt in needs no slice at all.
    assert await _slice(client, f"{c_node}-bare") is None
    slice_a = await _slice(client, a)
    assert slice_a is not None
    assert slice_a["spec"]["nodeName"] == a
    # Owned by its Node, so that it goes with it; b has no Node object, so no owner.
    assert slice_a["metadata"]["ownerReferences"][0]["uid"] == node_a["metadata"]["uid"]
    slice_b = await _slice(client, b)
    assert slice_b is not None
    assert "ownerReferences" not in slice_b["metadata"]
    (entry,) = slice_a["spec"]["claims"]
    assert entry["uid"] == web["metadata"]["uid"]
    assert entry["namespace"] == namespace
    assert entry["spec"] == web["spec"]

    # A claim status write changes no entry, so no slice is written.
    revision = slice_a["metadata"]["resourceVersion"]
    await client.patch(
        CLAIMS,
        "web",
        {"status": {"matchedPods": 2}},
        namespace=namespace,
        subresource="status",
    )
    # A spec edit does reach both slices of the claim (and b's keeps db).
    await client.patch(CLAIMS, "db", {"spec": {"readOnly": True}}, namespace=namespace)

    async def edited() -> bool:
        got = await _slice(client, b)
        return bool(got) and any(e["spec"].get("readOnly") for e in got["spec"]["claims"])

    await eventually(edited)
    slice_a = await _slice(client, a)
    assert slice_a is not None
    assert slice_a["metadata"]["resourceVersion"] == revision


async def test_slices_follow_pods_and_claims_and_are_put_back_when_tampered_with(
    client: Client,
    objects: Objects,
    slicer: Manager,
    nodes: list[str],
    namespace: str,
    cleanup: None,
) -> None:
    a, b, _ = nodes
    await objects.pod("p", labels={"app": "web"}, node=a, class_name="s3-sample")
    await objects.claim("web", selector={"app": "web"})
    await objects.claim("blue", selector={"color": "blue"}, mountpoint="/blue")

    async def names_are(node: str, want: list[str] | None) -> bool:
        return await _names(client, node) == want

    await eventually(lambda: names_are(a, ["web"]))
    # The pod's labels change: it leaves one claim and joins the other.
    await client.patch(
        PODS,
        "p",
        {"metadata": {"labels": {"app": "other", "color": "blue"}}},
        namespace=namespace,
    )
    await eventually(lambda: names_are(a, ["blue"]))
    # Someone edits the slice: the slicer puts it back.
    current = await _slice(client, a)
    assert current is not None
    await client.replace(CLAIM_SLICES, {**current, "spec": {"nodeName": a, "claims": []}})
    await eventually(lambda: names_are(a, ["blue"]))
    # Or deletes it: it comes back too.
    await client.delete(CLAIM_SLICES, a)
    await eventually(lambda: names_are(a, ["blue"]))
    # A second pod on another node; then the claim goes: both slices stay, empty, since
    # their nodes still have opted-in pods (a node without a slice would hold still).
    await objects.pod("q", labels={"color": "blue"}, node=b, class_name="s3-sample")
    await eventually(lambda: names_are(b, ["blue"]))
    await client.delete(CLAIMS, "blue", namespace=namespace)
    await eventually(lambda: names_are(a, []))
    await eventually(lambda: names_are(b, []))
    # The last opted-in pod of a node goes: so does its slice.
    await objects.claim("blue", selector={"color": "blue"}, mountpoint="/blue")
    await eventually(lambda: names_are(b, ["blue"]))
    await objects.delete_pod("q")
    await eventually(lambda: names_are(b, None))
