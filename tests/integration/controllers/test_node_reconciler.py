"""The node reconciler against the real apiserver, with pods bound to made-up nodes.

Each test runs the controller's claim slicer as well (:func:`standalone_slicer`), since
the node reconciler reads its claims from its node's slice, as it does in a cluster.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dynvol.testing.slots import node_reconciler_without_kubelet
from dynvol_controllers import NodeReconciler, standalone_slicer
from dynvol_core import constants as c
from dynvol_core.dispatch import credentials_secret_name, label_value
from dynvol_kube import APINotFound, Client, Manager
from dynvol_kube.resources import CLAIM_SLICES, CLAIMS, MOUNTS, NAMESPACES, PODS, SECRETS
from dynvol_providers.registry import load_registry

from .controller_support import Objects, eventually, list_items

# The claim slices the node reconcilers read, kept as ``dynvol controller`` keeps them.
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("slicer")]


def _node_reconciler(client: Client, node: str, **kw: Any) -> NodeReconciler:
    return node_reconciler_without_kubelet(
        client,
        node,
        shared_idle_grace=kw.pop("shared_idle_grace", 1.0),
        dmp_delete_grace=0,
        registry=load_registry(),
        **kw,
    )


@contextlib.asynccontextmanager
async def running(*reconcilers: NodeReconciler) -> AsyncIterator[None]:
    started = []
    try:
        for r in reconcilers:
            await r.start()
            started.append(r)
        yield
    finally:
        for r in reversed(started):
            await r.close()


async def _dmps(client: Client, class_name: str) -> list[dict[str, Any]]:
    items = await list_items(
        client,
        PODS,
        namespace=c.DEFAULT_SYSTEM_NAMESPACE,
        label_selector=f"{c.LABEL_CLASS}={label_value(class_name)}",
    )
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


async def _dvms(client: Client, namespace: str) -> list[dict[str, Any]]:
    return await list_items(client, MOUNTS, namespace=namespace)


async def _the_one_mount(client: Client, namespace: str) -> dict[str, Any]:
    """Wait until ``namespace`` has exactly one DynamicVolumeMount; it."""

    async def one_mount() -> list[dict[str, Any]] | None:
        dvms = await _dvms(client, namespace)
        return dvms if len(dvms) == 1 else None

    (dvm,) = await eventually(one_mount)
    return dvm


async def _cleanup_system(client: Client, class_name: str) -> None:
    selector = f"{c.LABEL_CLASS}={label_value(class_name)}"
    for pod in await list_items(
        client, PODS, namespace=c.DEFAULT_SYSTEM_NAMESPACE, label_selector=selector
    ):
        with contextlib.suppress(APINotFound):
            await client.delete(
                PODS, pod["metadata"]["name"], namespace=c.DEFAULT_SYSTEM_NAMESPACE, grace_seconds=0
            )
    for secret in await list_items(
        client,
        SECRETS,
        namespace=c.DEFAULT_SYSTEM_NAMESPACE,
        label_selector=f"{c.LABEL_COMPONENT}={c.COMPONENT_CREDENTIALS},{selector}",
    ):
        with contextlib.suppress(APINotFound):
            await client.delete(
                SECRETS, secret["metadata"]["name"], namespace=c.DEFAULT_SYSTEM_NAMESPACE
            )


@pytest.fixture
async def other_namespace(client: Client) -> AsyncIterator[str]:
    name = f"t-{secrets.token_hex(5)}"
    await client.create(NAMESPACES, {"metadata": {"name": name}})
    try:
        yield name
    finally:
        await client.delete(NAMESPACES, name)


async def test_claims_become_mounts_and_dmps(
    client: Client, objects: Objects, system_namespace: str, other_namespace: str
) -> None:
    ns = objects.namespace
    spc = f"s3-{objects.suffix}"
    node_a, node_b = f"node-a-{objects.suffix}", f"node-b-{objects.suffix}"
    await objects.secret("creds", {"access-key-id": "id1", "secret-access-key": "key1"})
    await objects.storage_class(spc, secret="creds")
    web = {"app": "web"}
    await objects.pod("p1", labels=web, node=node_a, class_name=spc)
    await objects.pod("p2", labels=web, node=node_a, class_name=spc, policy="shared")
    await objects.pod("p3", labels=web, node=node_a, class_name=spc, policy="shared")
    await objects.pod("p4", labels=web, node=node_b, class_name=spc)
    await objects.pod("p5", labels={"app": "other"}, node=node_b, class_name=spc)
    await objects.pod("plain", labels=web, node=node_b)  # not opted in
    # Same labels in another namespace: the claim must never reach it.
    await client.create(
        PODS,
        {
            "metadata": {"name": "foreign", "labels": web},
            "spec": {
                "nodeName": node_a,
                "containers": [{"name": "a", "image": "x"}],
                "volumes": [
                    {
                        "name": c.VOLUME_NAME,
                        "csi": {
                            "driver": c.DRIVER_NAME,
                            "readOnly": True,
                            "volumeAttributes": {
                                c.VOLUME_ATTR_CLASS: spc,
                                c.VOLUME_ATTR_POLICY: "independent",
                            },
                        },
                    }
                ],
            },
        },
        namespace=other_namespace,
    )
    a = _node_reconciler(client, node_a)
    b = _node_reconciler(client, node_b)
    try:
        async with running(a, b):
            await objects.claim("web-data", selector=web)

            async def four_mounts() -> list[dict[str, Any]] | None:
                dvms = await _dvms(client, ns)
                return dvms if len(dvms) == 4 else None

            dvms = await eventually(four_mounts)
            assert sorted(d["spec"]["podName"] for d in dvms) == ["p1", "p2", "p3", "p4"]
            assert not await _dvms(client, other_namespace)
            for dvm in dvms:
                owner = dvm["metadata"]["ownerReferences"][0]
                assert (owner["kind"], owner["name"]) == ("Pod", dvm["spec"]["podName"])
                assert dvm["spec"]["mountpoint"] == "/data"

            async def three_dmps() -> list[dict[str, Any]] | None:
                dmps = await _dmps(client, spc)
                return dmps if len(dmps) == 3 else None

            dmps = await eventually(three_dmps)
            policies = sorted(
                (p["spec"]["nodeName"], p["metadata"]["labels"][c.LABEL_POLICY]) for p in dmps
            )
            assert policies == [
                (node_a, "independent"),
                (node_a, "shared"),
                (node_b, "independent"),
            ]
            shared = next(p for p in dmps if p["metadata"]["labels"][c.LABEL_POLICY] == "shared")
            assert {d["spec"]["dmpName"] for d in dvms if d["spec"]["podName"] in ("p2", "p3")} == {
                shared["metadata"]["name"]
            }
            container = shared["spec"]["containers"][0]
            assert container["securityContext"]["privileged"] is True
            # The class asks 10m/50Mi for its mounts; the agent's own share comes on top.
            assert container["resources"]["requests"] == {"cpu": "30m", "memory": "178Mi"}

            # Credentials: every DMP mounts the class's one copy, which the controller
            # keeps (test_cluster_controller); the node plugin writes no Secret itself.
            copy_name = credentials_secret_name(spc)
            for dmp in dmps:
                volumes = {v["name"]: v for v in dmp["spec"]["volumes"]}
                assert volumes["credentials"]["secret"]["secretName"] == copy_name
            written = await list_items(
                client,
                SECRETS,
                namespace=system_namespace,
                label_selector=f"{c.LABEL_COMPONENT}={c.COMPONENT_CREDENTIALS}",
            )
            assert [s["metadata"]["name"] for s in written] == []

            # Editing the claim updates its mounts in place.
            await client.patch(
                CLAIMS,
                "web-data",
                {"spec": {"mountpoint": "/moved", "readOnly": True}},
                namespace=ns,
            )

            async def edited() -> bool:
                dvms = await _dvms(client, ns)
                return len(dvms) == 4 and all(
                    d["spec"]["mountpoint"] == "/moved" and d["spec"]["readOnly"] for d in dvms
                )

            await eventually(edited)

            # Relabelling p1 out removes its mount and its independent DMP.
            p1_dmp = next(d["spec"]["dmpName"] for d in dvms if d["spec"]["podName"] == "p1")
            await client.patch(PODS, "p1", {"metadata": {"labels": {"app": "moved"}}}, namespace=ns)

            async def p1_gone() -> bool:
                names = {d["spec"]["podName"] for d in await _dvms(client, ns)}
                dmp_names = {p["metadata"]["name"] for p in await _dmps(client, spc)}
                return names == {"p2", "p3", "p4"} and p1_dmp not in dmp_names

            await eventually(p1_gone)

            # A DMP deleted while needed comes back (a new pod, same name).
            p4_dmp = next(p for p in await _dmps(client, spc) if p["spec"]["nodeName"] == node_b)
            await client.delete(
                PODS, p4_dmp["metadata"]["name"], namespace=system_namespace, grace_seconds=0
            )

            async def p4_dmp_back() -> bool:
                for pod in await _dmps(client, spc):
                    if pod["metadata"]["name"] == p4_dmp["metadata"]["name"]:
                        return pod["metadata"]["uid"] != p4_dmp["metadata"]["uid"]
                return False

            await eventually(p4_dmp_back)

            # A DMP that failed is replaced too.
            failed = next(p for p in await _dmps(client, spc) if p["spec"]["nodeName"] == node_b)
            await client.patch(
                PODS,
                failed["metadata"]["name"],
                {"status": {"phase": "Failed"}},
                namespace=system_namespace,
                subresource="status",
            )

            async def replaced() -> bool:
                for pod in await _dmps(client, spc):
                    if pod["metadata"]["name"] == failed["metadata"]["name"]:
                        return pod["metadata"]["uid"] != failed["metadata"]["uid"]
                return False

            await eventually(replaced)

            # Deleting the claim removes every mount; the idle shared DMP goes after grace.
            await client.delete(CLAIMS, "web-data", namespace=ns)

            async def all_gone() -> bool:
                return not await _dvms(client, ns) and not await _dmps(client, spc)

            await eventually(all_gone, within=30)
            assert a.passes > 0
            assert b.passes > 0
    finally:
        for name in ("p1", "p2", "p3", "p4", "p5", "plain"):
            await objects.delete_pod(name)
        await objects.delete_pod("foreign", other_namespace)
        await _cleanup_system(client, spc)


async def test_a_node_without_its_claim_slice_keeps_its_mounts_until_it_has_one(
    client: Client, objects: Objects, system_namespace: str, slicer: Manager
) -> None:
    """Before the controller writes a node's slice (a first install, an upgrade of the
    node plugins before the controller, a slice deleted by hand), the node cannot tell its
    pods' claims from none: it changes nothing, rather than unmounting everything."""
    ns = objects.namespace
    spc = f"hold-{objects.suffix}"
    node = f"node-hold-{objects.suffix}"
    await objects.storage_class(spc)
    await objects.pod("p1", labels={"app": "held"}, node=node, class_name=spc)
    reconciler = _node_reconciler(client, node)
    try:
        async with running(reconciler):
            await objects.claim("held", selector={"app": "held"})

            dvm = await _the_one_mount(client, ns)
            # The controller goes, and so does the slice.
            await slicer.close()
            await client.delete(CLAIM_SLICES, node)

            async def saw_it_go() -> bool:
                return not len(reconciler.view.claims.store)

            await eventually(saw_it_go)
            before = reconciler.passes
            reconciler.nudge()

            async def passed() -> bool:
                return reconciler.passes > before

            await eventually(passed)
            (still,) = await _dvms(client, ns)
            assert still["metadata"]["uid"] == dvm["metadata"]["uid"]
            assert not still["metadata"].get("deletionTimestamp")
            assert await _dmps(client, spc)
            # A controller again: the slice comes back and the same mount stays.
            again = standalone_slicer(client)
            await again.start()
            try:

                async def sliced() -> bool:
                    return bool(len(reconciler.view.claims.store))

                await eventually(sliced)
                before = reconciler.passes
                reconciler.nudge()
                await eventually(passed)
                (kept,) = await _dvms(client, ns)
                assert kept["metadata"]["uid"] == dvm["metadata"]["uid"]
                assert not kept["metadata"].get("deletionTimestamp")
            finally:
                await again.close()
    finally:
        await objects.delete_pod("p1")
        await _cleanup_system(client, spc)


@contextlib.asynccontextmanager
async def _one_pod_claimed(
    client: Client, objects: Objects, app: str, **settings: Any
) -> AsyncIterator[tuple[NodeReconciler, str]]:
    """A class, one pod ``p1`` of it on a made-up node, that node's reconciler (with
    ``settings``) running and a claim selecting the pod; the reconciler and the class."""
    spc = f"{app}-{objects.suffix}"
    node = f"node-{app}-{objects.suffix}"
    await objects.storage_class(spc)
    await objects.pod("p1", labels={"app": app}, node=node, class_name=spc)
    reconciler = _node_reconciler(client, node, **settings)
    try:
        async with running(reconciler):
            await objects.claim(app, selector={"app": app})
            yield reconciler, spc
    finally:
        await objects.delete_pod("p1")
        await _cleanup_system(client, spc)


async def test_a_mount_deleted_by_hand_is_made_again_at_the_next_list(
    client: Client, objects: Objects, system_namespace: str
) -> None:
    """The node does not watch its mounts (only writes and lists them): a mount someone
    else deletes comes back at the node's next list of them."""
    ns = objects.namespace
    async with _one_pod_claimed(client, objects, "again", mounts_relist=0.5) as (reconciler, _):
        dvm = await _the_one_mount(client, ns)
        assert not reconciler.view.mounts.watch_ends, "the node watched its mounts"
        lists = reconciler.view.mounts.lists
        await client.delete(MOUNTS, dvm["metadata"]["name"], namespace=ns)

        async def made_again() -> bool:
            items = await _dvms(client, ns)
            return len(items) == 1 and items[0]["metadata"]["uid"] != dvm["metadata"]["uid"]

        await eventually(made_again)
        assert reconciler.view.mounts.lists > lists
        assert not reconciler.view.mounts.watch_ends


async def test_a_claim_edit_reaches_a_mount_the_dmp_wrote_to_since_and_keeps_its_writes(
    client: Client, objects: Objects, system_namespace: str
) -> None:
    """The node's copy of a mount is behind the DMP's writes (the finalizer, the status,
    which it does not watch): its in-place update conflicts, so it reads the mount and
    updates that version, keeping the DMP's finalizer."""
    ns = objects.namespace
    async with _one_pod_claimed(client, objects, "edited", mounts_relist=3600) as (_, _spc):
        dvm = await _the_one_mount(client, ns)
        name = dvm["metadata"]["name"]
        try:
            await client.patch(
                MOUNTS, name, {"metadata": {"finalizers": [c.FINALIZER_MOUNT]}}, namespace=ns
            )
            await client.patch(CLAIMS, "edited", {"spec": {"mountpoint": "/moved"}}, namespace=ns)

            async def moved() -> dict[str, Any] | None:
                (now,) = await _dvms(client, ns)
                return now if now["spec"]["mountpoint"] == "/moved" else None

            now = await eventually(moved)
            assert now["metadata"]["uid"] == dvm["metadata"]["uid"]
            assert now["metadata"]["finalizers"] == [c.FINALIZER_MOUNT]
        finally:
            await client.patch(MOUNTS, name, {"metadata": {"finalizers": None}}, namespace=ns)


async def test_a_mount_being_deleted_is_followed_until_gone_then_its_dmp_goes(
    client: Client, objects: Objects, system_namespace: str
) -> None:
    """A mount the node deletes waits for its DMP's finalizer; the node reads it by name
    until it is gone (no list comes in this test: an hour apart), then deletes the DMP
    that no mount names any more."""
    ns = objects.namespace
    claimed = _one_pod_claimed(client, objects, "follow", mounts_relist=3600)
    async with claimed as (reconciler, spc):
        try:

            async def mounted() -> tuple[dict[str, Any], dict[str, Any]] | None:
                dvms, dmps = await _dvms(client, ns), await _dmps(client, spc)
                return (dvms[0], dmps[0]) if len(dvms) == 1 and len(dmps) == 1 else None

            dvm, dmp = await eventually(mounted)
            name = dvm["metadata"]["name"]
            # What the DMP does when it takes a mount: hold it with the finalizer.
            await client.patch(
                MOUNTS, name, {"metadata": {"finalizers": [c.FINALIZER_MOUNT]}}, namespace=ns
            )
            lists = reconciler.view.mounts.lists
            await client.patch(PODS, "p1", {"metadata": {"labels": {"app": "gone"}}}, namespace=ns)

            async def being_deleted() -> bool:
                items = await _dvms(client, ns)
                return bool(items and items[0]["metadata"].get("deletionTimestamp"))

            await eventually(being_deleted)

            async def followed() -> bool:
                return reconciler._follower.followed == 1

            await eventually(followed)
            # Still named by a mount: the DMP stays.
            assert [p["metadata"]["uid"] for p in await _dmps(client, spc)] == [
                dmp["metadata"]["uid"]
            ]
            # The DMP has unmounted: it drops the finalizer, and the mount is gone.
            await client.patch(MOUNTS, name, {"metadata": {"finalizers": None}}, namespace=ns)

            async def dmp_gone() -> bool:
                return not await _dmps(client, spc)

            await eventually(dmp_gone)
            assert reconciler._follower.followed == 0
            assert f"{ns}/{name}" not in reconciler.view.mounts.store
            assert reconciler.view.mounts.lists == lists, "a list, not the follower, saw it"
        finally:
            with contextlib.suppress(APINotFound):
                for item in await _dvms(client, ns):
                    await client.patch(
                        MOUNTS, item["metadata"]["name"], {"metadata": {"finalizers": None}},
                        namespace=ns,
                    )  # fmt: skip


async def test_a_class_with_dmp_start_on_publish_runs_each_pods_dmp_before_any_claim(
    client: Client, objects: Objects, system_namespace: str
) -> None:
    """``dmp-start: OnPublish``: every published pod of the class gets its DMP at once (one
    per pod for ``independent``, one per node for ``shared``), with no claim; the first
    claim mounts through them; a pod's independent DMP goes with the pod."""
    spc = f"early-{objects.suffix}"
    node = f"node-e-{objects.suffix}"
    await objects.storage_class(spc, parameters={c.PARAM_DMP_START: c.DMP_START_ON_PUBLISH})
    web = {"app": "web"}
    await objects.pod("i1", labels=web, node=node, class_name=spc)
    await objects.pod("i2", labels=web, node=node, class_name=spc)
    await objects.pod("s1", labels=web, node=node, class_name=spc, policy="shared")
    reconciler = _node_reconciler(client, node)
    try:
        async with running(reconciler):

            async def three_dmps() -> list[dict[str, Any]] | None:
                dmps = await _dmps(client, spc)
                return dmps if len(dmps) == 3 else None

            dmps = await eventually(three_dmps)
            labels = [p["metadata"]["labels"] for p in dmps]
            by_policy = sorted((x[c.LABEL_POLICY], x.get(c.LABEL_POD, "")) for x in labels)
            assert by_policy == [
                (c.POLICY_INDEPENDENT, "i1"), (c.POLICY_INDEPENDENT, "i2"), (c.POLICY_SHARED, ""),
            ]  # fmt: skip
            assert await _dvms(client, objects.namespace) == []
            started = {p["metadata"]["name"]: p["metadata"]["uid"] for p in dmps}

            await objects.claim("web-data", selector=web)

            async def three_mounts() -> list[dict[str, Any]] | None:
                items = await _dvms(client, objects.namespace)
                return items if len(items) == 3 else None

            dvms = await eventually(three_mounts)
            assert {d["spec"]["dmpName"] for d in dvms} == set(started)
            now = {p["metadata"]["name"]: p["metadata"]["uid"] for p in await _dmps(client, spc)}
            assert now == started, "the claim reused the DMPs started before it"

            await objects.delete_pod("i2")

            async def i2s_dmp_gone() -> bool:
                pods = {p["metadata"]["labels"].get(c.LABEL_POD) for p in await _dmps(client, spc)}
                return pods == {"i1", None}

            await eventually(i2s_dmp_gone)
    finally:
        for dvm in await _dvms(client, objects.namespace):
            with contextlib.suppress(APINotFound):
                await client.patch(
                    MOUNTS, dvm["metadata"]["name"], {"metadata": {"finalizers": None}},
                    namespace=objects.namespace,
                )  # fmt: skip
                await client.delete(MOUNTS, dvm["metadata"]["name"], namespace=objects.namespace)
        for name in ("i1", "i2", "s1"):
            await objects.delete_pod(name)
        await _cleanup_system(client, spc)


async def test_restart_mid_way_converges_without_duplicates(
    client: Client, objects: Objects, system_namespace: str
) -> None:
    ns = objects.namespace
    spc = f"s3r-{objects.suffix}"
    node = f"node-r-{objects.suffix}"
    await objects.storage_class(spc)
    labels = {"app": "many"}
    names = [f"m{i}" for i in range(12)]
    for i, name in enumerate(names):
        await objects.pod(
            name,
            labels=labels,
            node=node,
            class_name=spc,
            policy="shared" if i % 2 else "independent",
        )
    try:
        first = _node_reconciler(client, node)
        await first.start()
        try:
            await objects.claim("many", selector=labels)

            async def some() -> bool:
                return len(await _dvms(client, ns)) >= 1

            await eventually(some)
        finally:
            await first.close()  # stopped mid-way
        second = _node_reconciler(client, node)
        async with running(second):

            async def converged() -> bool:
                dvms = await _dvms(client, ns)
                dmps = await _dmps(client, spc)
                return len(dvms) == 12 and len(dmps) == 7  # 6 independent + 1 shared

            await eventually(converged)
            dvms = await _dvms(client, ns)
            assert len({d["spec"]["podName"] for d in dvms}) == 12
            pass_count = second.passes
            plan = second.plan()
            assert not plan.has_actions, plan
            assert second.passes == pass_count
    finally:
        for name in names:
            await objects.delete_pod(name)
        await _cleanup_system(client, spc)


async def test_bad_claims_mount_nothing(
    client: Client, objects: Objects, system_namespace: str
) -> None:
    ns = objects.namespace
    spc = f"nfs-{objects.suffix}"
    node = f"node-x-{objects.suffix}"
    await objects.storage_class(spc, provider="nfs")
    labels = {"app": "bad"}
    await objects.pod("b1", labels=labels, node=node, class_name=spc)
    try:
        async with running(_node_reconciler(client, node)) as _:
            # Wrong provider for the pod's class: reported, not mounted.
            await objects.claim("mismatch", selector=labels, provider="s3")
            # A provider nobody installed: never mounted.
            await objects.claim(
                "unknown", selector=labels, provider="nosuch", config={"x": "y"}, mountpoint="/u"
            )
            # Overlapping mountpoints: only the older claim mounts.
            await objects.claim(
                "first",
                selector=labels,
                provider="nfs",
                mountpoint="/n",
                config={"server": "10.0.0.1", "path": "/export"},
            )
            await objects.claim(
                "second",
                selector=labels,
                provider="nfs",
                mountpoint="/n/x",
                config={"server": "10.0.0.1", "path": "/export"},
            )

            async def only_first() -> bool:
                dvms = await _dvms(client, ns)
                return [d["spec"]["claimName"] for d in dvms] == ["first"]

            await eventually(only_first)
            # And it stays that way.
            import asyncio

            await asyncio.sleep(0.5)
            assert [d["spec"]["claimName"] for d in await _dvms(client, ns)] == ["first"]
    finally:
        await objects.delete_pod("b1")
        await _cleanup_system(client, spc)


NOT_READY = {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"}
UNREACHABLE = {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"}


async def test_dmps_inherit_tolerations_and_get_their_priority_and_pull_secrets(
    client: Client, objects: Objects, system_namespace: str
) -> None:
    spc = f"s3t-{objects.suffix}"
    node = f"node-t-{objects.suffix}"
    await objects.storage_class(spc)
    labels = {"app": "tolerant"}
    gpu = {"key": "example.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    draining = {
        "key": "example.com/draining",
        "operator": "Equal",
        "value": "soon",
        "effect": "NoExecute",
        "tolerationSeconds": 30,
    }
    await objects.pod(
        "t1", labels=labels, node=node, class_name=spc, policy="shared", tolerations=[gpu]
    )
    reconciler = _node_reconciler(client, node, dmp_image_pull_secrets=("registry-a", "registry-b"))
    try:
        async with running(reconciler):
            await objects.claim("tolerant", selector=labels)

            async def one_dmp() -> dict[str, Any] | None:
                dmps = await _dmps(client, spc)
                return dmps[0] if len(dmps) == 1 else None

            dmp = await eventually(one_dmp)
            spec = dmp["spec"]
            assert spec["tolerations"] == [gpu, NOT_READY, UNREACHABLE]
            assert spec["imagePullSecrets"] == [{"name": "registry-a"}, {"name": "registry-b"}]
            # The apiserver's priority admission resolved the shipped PriorityClass.
            assert spec["priorityClassName"] == c.DEFAULT_DMP_PRIORITY_CLASS
            assert spec["priority"] == 1_000_000_000
            assert spec["preemptionPolicy"] == "Never"

            # A second pod tolerates a NoExecute taint the DMP does not: the running DMP
            # gets that toleration added in place (same pod), without a time limit.
            await objects.pod(
                "t2",
                labels=labels,
                node=node,
                class_name=spc,
                policy="shared",
                tolerations=[draining],
            )
            widened = {k: v for k, v in draining.items() if k != "tolerationSeconds"}

            async def widened_in_place() -> dict[str, Any] | None:
                dmps = await _dmps(client, spc)
                if len(dmps) != 1 or widened not in dmps[0]["spec"]["tolerations"]:
                    return None
                return dmps[0]

            after = await eventually(widened_in_place)
            assert after["metadata"]["uid"] == dmp["metadata"]["uid"]
            assert after["spec"]["tolerations"] == [gpu, NOT_READY, UNREACHABLE, widened]

            # Settled: no further writes, no duplicate tolerations.
            async def settled() -> bool:
                return not reconciler.plan().has_actions

            await eventually(settled)
            (final,) = await _dmps(client, spc)
            assert final["spec"]["tolerations"] == after["spec"]["tolerations"]
    finally:
        for name in ("t1", "t2"):
            await objects.delete_pod(name)
        await _cleanup_system(client, spc)


async def test_a_crash_looping_dmp_is_replaced_within_its_budget(
    client: Client, objects: Objects, system_namespace: str
) -> None:
    spc = f"s3c-{objects.suffix}"
    node = f"node-c-{objects.suffix}"
    await objects.storage_class(spc)
    labels = {"app": "crashy"}
    await objects.pod("c1", labels=labels, node=node, class_name=spc)
    reconciler = _node_reconciler(client, node, dmp_crash_replacements=2)

    async def the_dmp() -> dict[str, Any] | None:
        dmps = await _dmps(client, spc)
        return dmps[0] if len(dmps) == 1 else None

    async def crash_loop(dmp: dict[str, Any], *, reported: bool = True) -> None:
        """What kubelet reports after the DMP's container exited a second time: at once
        ``terminated`` with a restart behind it, and CrashLoopBackOff once the back-off is
        over (``reported``)."""
        container = dmp["spec"]["containers"][0]
        state: dict[str, Any] = (
            {"waiting": {"reason": c.CRASH_LOOP_BACK_OFF, "message": "back-off 10s"}}
            if reported
            else {"terminated": {"exitCode": 137, "reason": "Error"}}
        )
        status = {
            "name": container["name"],
            "image": container["image"],
            "imageID": "",
            "ready": False,
            "restartCount": 1 if not reported else 2,
            "state": state,
        }
        await client.patch(
            PODS, dmp["metadata"]["name"],
            {"status": {"phase": "Running", "containerStatuses": [status]}},
            namespace=system_namespace, subresource="status",
        )  # fmt: skip

    try:
        async with running(reconciler):
            await objects.claim("crashy", selector=labels)
            dmp = await eventually(the_dmp)
            name = dmp["metadata"]["name"]
            for reported in (False, True):  # the budget: a new pod of the same name each time
                await crash_loop(dmp, reported=reported)
                old_uid = dmp["metadata"]["uid"]

                async def replaced(old_uid: str = old_uid) -> dict[str, Any] | None:
                    now = await the_dmp()
                    return now if now is not None and now["metadata"]["uid"] != old_uid else None

                dmp = await eventually(replaced)
                assert dmp["metadata"]["name"] == name
                assert "containerStatuses" not in dmp.get("status", {})
            # Over the budget: kubelet's back-off is left to restart it, the pod stays.
            await crash_loop(dmp)

            async def seen_looping() -> bool:
                return any(
                    p.crash_looping and p.uid == dmp["metadata"]["uid"]
                    for p in reconciler.view.cached_dmps()
                )

            await eventually(seen_looping)
            passes = reconciler.passes

            async def planned_again() -> bool:
                return reconciler.passes > passes

            reconciler.nudge()
            await eventually(planned_again)
            (still,) = await _dmps(client, spc)
            assert still["metadata"]["uid"] == dmp["metadata"]["uid"]
            assert [p.name for p in reconciler.plan().replace_dmps] == [name]
    finally:
        await objects.delete_pod("c1")
        await _cleanup_system(client, spc)
