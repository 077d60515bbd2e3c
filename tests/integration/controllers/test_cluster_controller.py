"""The cluster controller: class in-use protection, claim status, Events, restarts."""

from __future__ import annotations

import base64
import contextlib
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dynvol.testing import Process
from dynvol.testing.slots import node_reconciler_without_kubelet
from dynvol_controllers import ControllerApp, NodeReconciler
from dynvol_core import constants as c
from dynvol_core.dispatch import credentials_secret_name, label_value
from dynvol_kube import APINotFound, Client
from dynvol_kube.resources import CLAIMS, CLASSES, EVENTS, MOUNTS, NODES, PODS, SECRETS
from dynvol_providers.registry import load_registry

from .controller_support import Objects, eventually, list_items, pod_manifest

pytestmark = pytest.mark.integration


@pytest.fixture
async def controller(client: Client, system_namespace: str) -> AsyncIterator[ControllerApp]:
    """The cluster controller in-process (no webhooks), leader-elected on its own Lease."""
    app = ControllerApp(
        client=client,
        lease_name=f"dynvol-test-{secrets.token_hex(3)}",
        lease_namespace=system_namespace,
        lease_duration=3,
        renew_deadline=2,
        retry_period=0.5,
        registry=load_registry(),
    )
    await app.start()
    try:
        yield app
    finally:
        await app.close()


@contextlib.asynccontextmanager
async def node_reconciler(client: Client, node: str) -> AsyncIterator[NodeReconciler]:
    reconciler = node_reconciler_without_kubelet(
        client, node, dmp_delete_grace=0, shared_idle_grace=0.5
    )
    await reconciler.start()
    try:
        yield reconciler
    finally:
        await reconciler.close()


async def _cleanup_dmps(client: Client, class_name: str) -> None:
    for pod in await list_items(
        client,
        PODS,
        namespace=c.DEFAULT_SYSTEM_NAMESPACE,
        label_selector=f"{c.LABEL_CLASS}={label_value(class_name)}",
    ):
        with contextlib.suppress(APINotFound):
            await client.delete(
                PODS, pod["metadata"]["name"], namespace=c.DEFAULT_SYSTEM_NAMESPACE, grace_seconds=0
            )


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in (obj.get("status") or {}).get("conditions") or ():
        if cond["type"] == type_:
            return dict(cond)
    return {}


async def test_class_in_use_is_held_until_unused(
    client: Client, objects: Objects, controller: ControllerApp
) -> None:
    spc = f"held-{objects.suffix}"
    await objects.storage_class(spc)

    async def finalized() -> bool:
        obj = await client.get(CLASSES, spc)
        return c.FINALIZER_CLASS_IN_USE in (obj["metadata"].get("finalizers") or ())

    await eventually(finalized)
    await objects.pod("user", labels={"app": "u"}, node="n-held", class_name=spc)
    await objects.claim("pinned", selector={"app": "u"}, extra={"storageProviderClass": spc})

    async def in_use() -> bool:
        obj = await client.get(CLASSES, spc)
        return (obj.get("status") or {}).get("inUse") == {"pods": 1, "claims": 1, "dmps": 0}

    await eventually(in_use)
    await client.delete(CLASSES, spc)

    async def blocked() -> bool:
        events = await list_items(
            client, EVENTS, namespace="default", field_selector=f"involvedObject.name={spc}"
        )
        return any(e["reason"] == "DeletionBlocked" for e in events)

    await eventually(blocked)
    held = await client.get(CLASSES, spc)
    assert held["metadata"].get("deletionTimestamp")
    await objects.delete_pod("user")
    # Still held by the claim that pins the class.
    await eventually(lambda: _still_there(client, spc))
    await client.delete(CLAIMS, "pinned", namespace=objects.namespace)

    async def gone() -> bool:
        try:
            await client.get(CLASSES, spc)
        except APINotFound:
            return True
        return False

    await eventually(gone)


async def _still_there(client: Client, name: str) -> bool:
    obj = await client.get(CLASSES, name)
    return bool(obj["metadata"].get("deletionTimestamp"))


async def test_claim_status_follows_mounts(
    client: Client, objects: Objects, controller: ControllerApp
) -> None:
    ns = objects.namespace
    spc = f"st-{objects.suffix}"
    node = f"n-st-{objects.suffix}"
    await objects.storage_class(spc)
    nfs = f"nfs-{objects.suffix}"
    await objects.storage_class(nfs, provider="nfs")
    for i in range(3):
        await objects.pod(f"s{i}", labels={"app": "st"}, node=node, class_name=spc)
    await objects.pod("wrong", labels={"app": "st"}, node=node, class_name=nfs)
    try:
        async with node_reconciler(client, node):
            await objects.claim("status", selector={"app": "st"})

            async def mounts() -> list[dict[str, Any]] | None:
                items = await list_items(client, MOUNTS, namespace=ns)
                return items if len(items) == 3 else None

            dvms = await eventually(mounts)

            async def mounting() -> bool:
                claim = await client.get(CLAIMS, "status", namespace=ns)
                status = claim.get("status") or {}
                ready = _condition(claim, "Ready")
                return (
                    status.get("matchedPods") == 3
                    and status.get("mountedPods") == 0
                    and ready.get("reason") == "ProviderMismatch"
                    and "provides 'nfs'" in ready.get("message", "")
                    and ready.get("observedGeneration") == claim["metadata"]["generation"]
                )

            await eventually(mounting)
            # What the DMP agent does: report each mount Mounted.
            for dvm in dvms:
                await client.patch(
                    MOUNTS,
                    dvm["metadata"]["name"],
                    {"status": {"phase": "Mounted", "observedGeneration": 1}},
                    namespace=ns,
                    subresource="status",
                )
            await objects.delete_pod("wrong")

            async def ready() -> dict[str, Any] | None:
                claim = await client.get(CLAIMS, "status", namespace=ns)
                status = claim.get("status") or {}
                ok = (
                    status.get("mountedPods") == 3
                    and _condition(claim, "Ready").get("status") == "True"
                )
                return claim if ok else None

            claim = await eventually(ready)
            assert claim["status"]["dmpCount"] == 3
            assert len(claim["status"]["dmps"]) == 3
            assert _condition(claim, "Accepted")["status"] == "True"

            async def events() -> bool:
                items = await list_items(client, EVENTS, namespace=ns)
                reasons = {(e["involvedObject"]["kind"], e["reason"]) for e in items}
                return {
                    ("DynamicVolumeClaim", "Mounted"),
                    ("Pod", "Mounted"),
                    ("DynamicVolumeClaim", "ProviderMismatch"),
                } <= reasons

            await eventually(events)
    finally:
        for name in ("s0", "s1", "s2", "wrong"):
            await objects.delete_pod(name)
        await _cleanup_dmps(client, spc)


async def test_controller_killed_mid_way_converges(
    client: Client,
    objects: Objects,
    system_namespace: str,
    control_plane: Any,
    tmp_path: Path,
) -> None:
    ns = objects.namespace
    spc = f"kill-{objects.suffix}"
    lease = f"dynvol-kill-{objects.suffix}"
    argv = [
        sys.executable,
        "-m",
        "dynvol.cli",
        "controller",
        "--kubeconfig",
        str(control_plane.kubeconfig),
        "--no-webhooks",
        "--lease-name",
        lease,
        "--lease-namespace",
        system_namespace,
        "--lease-duration",
        "2",
        "--renew-deadline",
        "1.5",
        "--retry-period",
        "0.3",
    ]
    first = Process.start(argv, name="dynvol-controller-1", log=tmp_path / "first.log")
    second = None
    try:
        await objects.storage_class(spc)

        async def finalized() -> bool:
            obj = await client.get(CLASSES, spc)
            return c.FINALIZER_CLASS_IN_USE in (obj["metadata"].get("finalizers") or ())

        await eventually(finalized, within=30)
        first.kill()  # no graceful release: the successor waits for the Lease to expire
        await objects.claim("after-kill", selector={"app": "k"})
        await objects.pod("k0", labels={"app": "k"}, node="n-kill", class_name=spc)
        second = Process.start(argv, name="dynvol-controller-2", log=tmp_path / "second.log")

        async def status_written() -> bool:
            claim = await client.get(CLAIMS, "after-kill", namespace=ns)
            status = claim.get("status") or {}
            return status.get("matchedPods") == 1 and bool(_condition(claim, "Ready"))

        await eventually(status_written, within=30)
        claim = await client.get(CLAIMS, "after-kill", namespace=ns)
        types = [cond["type"] for cond in claim["status"]["conditions"]]
        assert sorted(types) == ["Accepted", "Ready"]  # no duplicates
        obj = await client.get(CLASSES, spc)
        assert obj["metadata"]["finalizers"].count(c.FINALIZER_CLASS_IN_USE) == 1
        assert second.stop(signum=signal.SIGTERM) == 0, second.log_tail()
    finally:
        first.stop()
        if second is not None:
            second.stop()
        await objects.delete_pod("k0")


def _decoded(secret: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


async def _class_condition(client: Client, name: str, type_: str) -> dict[str, Any]:
    return _condition(await client.get(CLASSES, name), type_)


async def test_class_credentials_are_copied_to_the_system_namespace(
    client: Client, objects: Objects, system_namespace: str, controller: ControllerApp
) -> None:
    ns = objects.namespace
    spc = f"cred-{objects.suffix}"
    copy_name = credentials_secret_name(spc)
    await objects.secret("creds", {"access-key-id": "id1", "secret-access-key": "key1"})
    made = await objects.storage_class(spc, secret="creds")

    async def copy_holds(key: str) -> dict[str, Any] | None:
        try:
            copy = await client.get(SECRETS, copy_name, namespace=system_namespace)
        except APINotFound:
            return None
        want = {"access-key-id": "id1", "secret-access-key": key}
        return dict(copy) if _decoded(copy) == want else None

    async def copy_gone() -> bool:
        try:
            await client.get(SECRETS, copy_name, namespace=system_namespace)
        except APINotFound:
            return True
        return False

    async def credentials_are(status: str, reason: str) -> bool:
        cond = await _class_condition(client, spc, "CredentialsReady")
        return (cond.get("status"), cond.get("reason")) == (status, reason)

    copy = await eventually(lambda: copy_holds("key1"))
    meta = copy["metadata"]
    assert meta["ownerReferences"] == [
        {
            "apiVersion": c.API_VERSION,
            "kind": c.KIND_CLASS,
            "name": spc,
            "uid": made["metadata"]["uid"],
            "controller": True,
        }
    ]
    assert meta["labels"][c.LABEL_COMPONENT] == c.COMPONENT_CREDENTIALS
    assert meta["labels"][c.LABEL_CLASS] == label_value(spc)
    assert meta["annotations"][f"{c.GROUP}/source-secret"] == f"{ns}/creds"
    first_digest = meta["annotations"][f"{c.GROUP}/data-digest"]
    await eventually(lambda: credentials_are("True", "Copied"))

    # Rotation: a changed source reaches the copy (kubelet then refreshes the DMPs' files).
    await client.patch(
        SECRETS, "creds", {"stringData": {"secret-access-key": "key2"}}, namespace=ns
    )
    rotated = await eventually(lambda: copy_holds("key2"))
    assert rotated["metadata"]["annotations"][f"{c.GROUP}/data-digest"] != first_digest

    # A missing source is reported on the class and as an Event; the last copy stays, so
    # mounts that work keep working.
    await client.delete(SECRETS, "creds", namespace=ns)
    await eventually(lambda: credentials_are("False", "SecretNotFound"))
    cond = await _class_condition(client, spc, "CredentialsReady")
    assert f"{ns}/creds" in cond["message"]

    async def warned() -> bool:
        events = await list_items(
            client, EVENTS, namespace="default", field_selector=f"involvedObject.name={spc}"
        )
        return any(e["reason"] == "SecretNotFound" and e["type"] == "Warning" for e in events)

    await eventually(warned)
    assert await copy_holds("key2")

    # The Secret comes back: copied again.
    await objects.secret("creds", {"access-key-id": "id1", "secret-access-key": "key3"})
    await eventually(lambda: copy_holds("key3"))
    await eventually(lambda: credentials_are("True", "Copied"))

    # The class stops referencing a Secret: its copy goes, and so does the condition.
    await client.patch(
        CLASSES,
        spc,
        {"spec": {"parameters": {c.PARAM_SECRET_NAME: None, c.PARAM_SECRET_NAMESPACE: None}}},
    )
    await eventually(copy_gone)
    await eventually(lambda: _no_condition(client, spc, "CredentialsReady"))

    # Referencing it again copies it again; deleting the class deletes its copy.
    await client.patch(
        CLASSES,
        spc,
        {"spec": {"parameters": {c.PARAM_SECRET_NAME: "creds", c.PARAM_SECRET_NAMESPACE: ns}}},
    )
    await eventually(lambda: copy_holds("key3"))
    await client.delete(CLASSES, spc)
    await eventually(copy_gone)


async def _no_condition(client: Client, name: str, type_: str) -> bool:
    return not await _class_condition(client, name, type_)


async def test_deleted_node_releases_its_mounts(
    client: Client, objects: Objects, system_namespace: str, controller: ControllerApp
) -> None:
    ns = objects.namespace
    spc = f"lost-{objects.suffix}"
    lost, alive = f"n-lost-{objects.suffix}", f"n-alive-{objects.suffix}"
    await client.create(NODES, {"metadata": {"name": lost}})
    try:
        await objects.storage_class(spc)
        await objects.pod("on-lost", labels={"app": "l"}, node=lost, class_name=spc)
        await objects.pod("on-alive", labels={"app": "l"}, node=alive, class_name=spc)
        async with node_reconciler(client, lost), node_reconciler(client, alive):
            await objects.claim("lost", selector={"app": "l"})

            async def two_mounts() -> list[dict[str, Any]] | None:
                items = await list_items(client, MOUNTS, namespace=ns)
                return items if len(items) == 2 else None

            dvms = await eventually(two_mounts)
        # What each DMP does before it mounts: hold the mount until it has unmounted.
        for dvm in dvms:
            await client.patch(
                MOUNTS,
                dvm["metadata"]["name"],
                {"metadata": {"finalizers": [c.FINALIZER_MOUNT]}},
                namespace=ns,
            )
        await eventually(lambda: _cached(controller, lost))
        # The node goes (and with it any DMP that would have unmounted).
        await client.delete(NODES, lost)

        async def released() -> list[dict[str, Any]] | None:
            items = await list_items(client, MOUNTS, namespace=ns)
            return items if [d["spec"]["nodeName"] for d in items] == [alive] else None

        (survivor,) = await eventually(released)
        # The mount on the node that still exists is untouched.
        assert survivor["metadata"]["finalizers"] == [c.FINALIZER_MOUNT]
        assert not survivor["metadata"].get("deletionTimestamp")

        async def reported() -> bool:
            events = await list_items(
                client, EVENTS, namespace=ns, field_selector="involvedObject.name=on-lost"
            )
            return any(e["reason"] == "NodeLost" for e in events)

        await eventually(reported)
    finally:
        await _force_delete_mounts(client, ns)
        for name in ("on-lost", "on-alive"):
            await objects.delete_pod(name)
        await _cleanup_dmps(client, spc)
        with contextlib.suppress(APINotFound):
            await client.delete(NODES, lost)


async def test_deleted_node_loses_the_controller_replicas_on_it(
    client: Client, objects: Objects, system_namespace: str, controller: ControllerApp
) -> None:
    """The controller's own pods on a Node seen deleted are deleted at once, so the dead one
    leaves the webhook Service's endpoints before pod GC would remove it; nothing else is
    touched: not a pod with other labels beside it, not a look-alike in another namespace,
    not a replica on a Node that still exists."""
    replica = {"app.kubernetes.io/name": "dynvol", c.LABEL_COMPONENT: "controller"}
    assert controller.controller.replica_labels == replica
    lost, alive = f"n-gone-{objects.suffix}", f"n-here-{objects.suffix}"
    made: list[tuple[str, str]] = []

    async def pod(name: str, namespace: str, labels: dict[str, str], node: str) -> None:
        await client.create(PODS, pod_manifest(name, labels=labels, node=node), namespace=namespace)
        made.append((namespace, name))

    await client.create(NODES, {"metadata": {"name": lost}})
    await client.create(NODES, {"metadata": {"name": alive}})
    try:
        sfx = objects.suffix
        await pod(f"ctl-gone-{sfx}", system_namespace, replica, lost)
        await pod(f"ctl-here-{sfx}", system_namespace, replica, alive)
        await pod(f"other-gone-{sfx}", system_namespace, {**replica, c.LABEL_COMPONENT: "x"}, lost)
        await pod(f"tenant-gone-{sfx}", objects.namespace, replica, lost)

        async def all_cached() -> bool:
            store = controller.controller.pods.store
            return await _cached(controller, lost) and all(
                store.get(f"{ns}/{name}") is not None for ns, name in made
            )

        await eventually(all_cached)
        await client.delete(NODES, lost)

        async def gone() -> bool:
            try:
                await client.get(PODS, f"ctl-gone-{sfx}", namespace=system_namespace)
            except APINotFound:
                return True
            return False

        await eventually(gone)
        for ns, name in made[1:]:
            kept = await client.get(PODS, name, namespace=ns)
            assert not kept["metadata"].get("deletionTimestamp"), f"{ns}/{name} was kept"
        # Once pod GC (here: the test) removes the last pod bound to the deleted Node, the
        # controller forgets the Node (its memory of deleted Nodes does not grow forever).
        assert lost in controller.controller._gone_nodes
        for ns, name in made[2:]:
            await objects.delete_pod(name, namespace=ns)

        async def forgotten() -> bool:
            return lost not in controller.controller._gone_nodes

        await eventually(forgotten)
    finally:
        for ns, name in made:
            await objects.delete_pod(name, namespace=ns)
        for node in (lost, alive):
            with contextlib.suppress(APINotFound):
                await client.delete(NODES, node)


async def _force_delete_mounts(client: Client, ns: str) -> None:
    """Drop every DynamicVolumeMount in ``ns``, finalizers and all (test clean-up)."""
    for dvm in await list_items(client, MOUNTS, namespace=ns):
        with contextlib.suppress(APINotFound):
            await client.patch(
                MOUNTS, dvm["metadata"]["name"], {"metadata": {"finalizers": None}}, namespace=ns
            )
            await client.delete(MOUNTS, dvm["metadata"]["name"], namespace=ns)


async def _cached(app: ControllerApp, node: str) -> bool:
    return app.controller.nodes.store.get(node) is not None


async def test_mount_stuck_on_a_node_that_is_gone_is_released(
    client: Client, objects: Objects, system_namespace: str, controller: ControllerApp
) -> None:
    # The node went while no controller ran (or never registered): a mount being deleted
    # there whose DMP is gone has nobody left to drop its finalizer.
    ns = objects.namespace
    spc = f"stuck-{objects.suffix}"
    node = f"n-stuck-{objects.suffix}"
    await objects.storage_class(spc)
    for name in ("a", "b"):
        await objects.pod(name, labels={"app": "s"}, node=node, class_name=spc)
    try:
        async with node_reconciler(client, node):
            await objects.claim("stuck", selector={"app": "s"})

            async def two_mounts() -> list[dict[str, Any]] | None:
                items = await list_items(client, MOUNTS, namespace=ns)
                return items if len(items) == 2 else None

            dvms = await eventually(two_mounts)

            async def two_dmps() -> bool:
                pods = await list_items(
                    client,
                    PODS,
                    namespace=system_namespace,
                    label_selector=f"{c.LABEL_CLASS}={label_value(spc)}",
                )
                return len(pods) == 2

            await eventually(two_dmps)
        by_pod = {d["spec"]["podName"]: d for d in dvms}
        for dvm in dvms:
            await client.patch(
                MOUNTS,
                dvm["metadata"]["name"],
                {"metadata": {"finalizers": [c.FINALIZER_MOUNT]}},
                namespace=ns,
            )
        # a's DMP is gone; b's still runs (it will unmount b itself).
        await client.delete(
            PODS, by_pod["a"]["spec"]["dmpName"], namespace=system_namespace, grace_seconds=0
        )
        for dvm in dvms:
            await client.delete(MOUNTS, dvm["metadata"]["name"], namespace=ns)

        async def only_b_left() -> list[dict[str, Any]] | None:
            items = await list_items(client, MOUNTS, namespace=ns)
            return items if [d["spec"]["podName"] for d in items] == ["b"] else None

        (left,) = await eventually(only_b_left)
        assert left["metadata"]["finalizers"] == [c.FINALIZER_MOUNT]
        assert left["metadata"].get("deletionTimestamp")
    finally:
        await _force_delete_mounts(client, ns)
        for name in ("a", "b"):
            await objects.delete_pod(name)
        await _cleanup_dmps(client, spc)
