"""Matching claims to pods and planning a node's DynamicVolumeMounts and DMPs."""

from __future__ import annotations

import datetime as dt
import random
import re
import uuid
from collections.abc import Iterable
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynvol_core import constants as c
from dynvol_core.dispatch import (
    ANNOTATION_DATA_DIGEST,
    ANNOTATION_SOURCE_SECRET,
    DmpSpec,
    NodePlan,
    Reason,
    credential_secret_manifest,
    credentials_digest,
    credentials_secret_name,
    dmp_name,
    dmp_pod_manifest,
    dvm_name,
    label_value,
    match,
    mountpoints_overlap,
    plan_node,
)
from dynvol_core.models import (
    DynamicVolumeClaim,
    DynamicVolumeMount,
    InjectedVolume,
    PodInfo,
    StorageProviderClass,
)
from dynvol_core.paths import PodSlot, XvolsLayout

NODE = "node-1"
SYSTEM = "dynvol-system"
IMAGE = "ghcr.io/example/dynvol:test"
LAYOUT = XvolsLayout.default()
T0 = dt.datetime(2024, 10, 18, 8, 0, tzinfo=dt.UTC)
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def uid(seed: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, seed))


def spc(name: str = "s3-sample", provider: str = "s3", **spec: Any) -> StorageProviderClass:
    params = {
        c.PARAM_SECRET_NAME: "creds",
        c.PARAM_SECRET_NAMESPACE: "default",
        c.PARAM_MOUNT_CPU_REQUEST: "10m",
        c.PARAM_MOUNT_MEMORY_LIMIT: "50Mi",
    }
    return StorageProviderClass.from_object(
        {
            "metadata": {"name": name, "uid": uid(name)},
            "spec": {"provider": provider, "parameters": params, **spec},
        }
    )


def claim(
    name: str = "c1",
    namespace: str = "ns",
    *,
    mountpoint: str = "/data",
    labels: dict[str, str] | None = None,
    age: int = 0,
    **spec: Any,
) -> DynamicVolumeClaim:
    body: dict[str, Any] = {
        "mountpoint": mountpoint,
        "selector": {"matchLabels": labels or {"app": "web"}},
        **spec,
    }
    if not any(k in body for k in ("s3Config", "nfsConfig", "rcloneConfig", "config")):
        body["s3Config"] = {"bucket": "bucket-1", "endpoint": "http://127.0.0.1:9000"}
    return DynamicVolumeClaim.from_object(
        {
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": uid(f"{namespace}/{name}"),
                "creationTimestamp": (T0 + dt.timedelta(seconds=age)).isoformat(),
            },
            "spec": body,
        }
    )


def pod(
    name: str = "p1",
    namespace: str = "ns",
    *,
    node: str | None = NODE,
    cls: str | None = "s3-sample",
    policy: str = c.POLICY_INDEPENDENT,
    labels: dict[str, str] | None = None,
    **kw: Any,
) -> PodInfo:
    return PodInfo(
        namespace=namespace,
        name=name,
        uid=uid(f"pod/{namespace}/{name}"),
        node_name=node,
        labels=labels if labels is not None else {"app": "web"},
        phase="Running",
        volume=InjectedVolume(cls, policy) if cls else None,
        **kw,
    )


def slots_for(pods: Iterable[PodInfo]) -> dict[str, PodSlot]:
    return {
        p.uid: LAYOUT.slot(p.volume.class_name, uid(f"slot/{p.uid}"), p.uid)
        for p in pods
        if p.volume is not None
    }


def plan(
    pods: list[PodInfo],
    claims: list[DynamicVolumeClaim],
    classes: list[StorageProviderClass] | None = None,
    *,
    dvms: Iterable[DynamicVolumeMount] = (),
    dmps: Iterable[PodInfo] = (),
    slots: dict[str, PodSlot] | None = None,
) -> NodePlan:
    return plan_node(
        node_name=NODE,
        pods=pods,
        claims=claims,
        classes=classes if classes is not None else [spc()],
        slots=slots if slots is not None else slots_for(pods),
        system_namespace=SYSTEM,
        dmp_image=IMAGE,
        existing_dvms=dvms,
        existing_dmps=dmps,
        node_uid=uid("node"),
    )


def dmp_pod(spec: DmpSpec, phase: str = "Running") -> PodInfo:
    manifest = dmp_pod_manifest(spec)
    manifest["metadata"]["uid"] = uid(f"dmp/{spec.name}")
    manifest["status"] = {"phase": phase}
    return PodInfo.from_object(manifest)


def apply(
    result: NodePlan, dvms: Iterable[DynamicVolumeMount], dmps: Iterable[PodInfo]
) -> tuple[list[DynamicVolumeMount], list[PodInfo]]:
    """What the cluster looks like after the shell executed ``result`` (finalizers done)."""
    by_key = {(d.namespace, d.name): d for d in dvms}
    for d in (*result.create_dvms, *result.update_dvms):
        by_key[(d.namespace, d.name)] = d
    for d in result.delete_dvms:
        del by_key[(d.namespace, d.name)]
    pods = {p.name: p for p in dmps}
    for p in result.delete_dmps:
        del pods[p.name]
    for s in result.create_dmps:
        pods[s.name] = dmp_pod(s)
    return list(by_key.values()), list(pods.values())


# ----------------------------------------------------------------------------- matching


def test_independent_policy_one_dmp_per_pod() -> None:
    pods = [pod("p1"), pod("p2")]
    result = plan(pods, [claim()])
    assert len(result.dvms) == 2
    assert len(result.dmps) == 2
    assert result.create_dvms == result.dvms
    assert result.create_dmps == result.dmps
    slots = slots_for(pods)
    for dvm in result.dvms:
        p = next(x for x in pods if x.uid == dvm.spec.pod_uid)
        dmp = next(d for d in result.dmps if d.name == dvm.spec.dmp_name)
        assert dmp.policy == c.POLICY_INDEPENDENT
        assert dmp.host_path == str(slots[p.uid].path)
        assert dmp.pod_uid == p.uid
        assert dvm.spec.slot_path == str(slots[p.uid].path)
        assert dvm.spec.dmp_target_path == "/xvols/data"
        assert dvm.spec.provider == "s3"
        assert dvm.spec.storage_provider_class == "s3-sample"
        assert dvm.spec.config["bucket"] == "bucket-1"
        assert dvm.namespace == "ns"
        assert [o.uid for o in dvm.owner_references] == [p.uid]
        assert dvm.labels[c.LABEL_POD_UID] == p.uid
        assert dvm.labels[c.LABEL_NODE] == NODE
        assert dvm.labels[c.LABEL_DMP] == dmp.name
        assert dvm.labels[c.LABEL_CLAIM] == "c1"


def test_shared_policy_one_dmp_per_node_class_and_credential() -> None:
    pods = [
        pod("p1", policy=c.POLICY_SHARED),
        pod("p2", policy=c.POLICY_SHARED),
        pod("q1", "other", policy=c.POLICY_SHARED),
    ]
    claims = [claim(), claim("c2", mountpoint="/more"), claim("c3", "other")]
    result = plan(pods, claims)
    assert len(result.dvms) == 5
    (dmp,) = result.dmps
    assert dmp.policy == c.POLICY_SHARED
    assert dmp.host_path == str(LAYOUT.class_dir("s3-sample"))
    assert dmp.pod_uid == ""
    slots = slots_for(pods)
    for dvm in result.dvms:
        slot = slots[dvm.spec.pod_uid]
        assert dvm.spec.dmp_name == dmp.name
        assert dvm.spec.dmp_target_path == (
            f"/xvols/{slot.slot_uuid}/{slot.pod_uid}{dvm.spec.mountpoint}"
        )
    # Another credential is another shared DMP.
    other = spc(
        "s3-other",
        parameters={c.PARAM_SECRET_NAME: "other-creds", c.PARAM_SECRET_NAMESPACE: "default"},
    )
    p3 = pod("p3", cls="s3-other", policy=c.POLICY_SHARED)
    result = plan([*pods, p3], claims, [spc(), other])
    assert len(result.dmps) == 2
    # A shared DMP serves pods of several namespaces: it watches its mounts in all.
    (container,) = dmp_pod_manifest(dmp)["spec"]["containers"]
    assert "--mounts-namespace" not in container["command"]


def test_claims_never_select_pods_of_other_namespaces() -> None:
    result = plan([pod("p1", "a"), pod("p1", "b")], [claim("c", "a")])
    assert [(m.claim.namespace, m.pod.namespace) for m in result.matches] == [("a", "a")]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from("ab")), max_size=5),
    st.lists(st.sampled_from("abc"), max_size=4),
)
def test_cross_namespace_never_matches(
    pod_specs: list[tuple[str, str]], claim_nss: list[str]
) -> None:
    pods = [pod(f"p{i}", ns, labels={"app": app}) for i, (ns, app) in enumerate(pod_specs)]
    claims = [
        claim(f"c{i}", ns, labels={"app": "a"}, mountpoint=f"/m{i}")
        for i, ns in enumerate(claim_nss)
    ]
    for m in match(claims, pods, [spc()]):
        assert m.claim.namespace == m.pod.namespace
        assert m.pod.labels["app"] == "a"


def test_only_eligible_pods_are_selected() -> None:
    pods = [
        pod("ok"),
        pod("no-volume", cls=None),
        pod("unscheduled", node=None),
        pod("deleting", deleting=True),
        attrs.evolve(pod("done"), phase="Succeeded"),
        pod("other-labels", labels={"app": "db"}),
    ]
    matches = match([claim()], pods, [spc()])
    assert [m.pod.name for m in matches] == ["ok"]
    deleting_claim = attrs.evolve(claim(), deleting=True)
    assert match([deleting_claim], pods, [spc()]) == ()


def test_pods_of_other_nodes_are_ignored() -> None:
    result = plan([pod("here"), pod("there", node="node-2")], [claim()])
    assert [d.spec.pod_name for d in result.dvms] == ["here"]


@pytest.mark.parametrize(
    ("the_claim", "the_pod", "classes", "reason"),
    [
        (
            claim(storageProvider="nfs", nfsConfig={"server": "nfs.example.com", "path": "/x"}),
            pod(),
            [spc()],
            Reason.PROVIDER_MISMATCH,
        ),
        (
            claim(storageProviderClass="s3-other"),
            pod(),
            [spc(), spc("s3-other")],
            Reason.CLASS_MISMATCH,
        ),
        (claim(), pod(), [spc(allowedNamespaces=["elsewhere"])], Reason.NAMESPACE_NOT_ALLOWED),
        (claim(), pod(cls="missing"), [spc()], Reason.CLASS_NOT_FOUND),
    ],
    ids=["provider", "class", "namespace", "no-class"],
)
def test_rejections_carry_a_reason_and_mount_nothing(
    the_claim: DynamicVolumeClaim,
    the_pod: PodInfo,
    classes: list[StorageProviderClass],
    reason: Reason,
) -> None:
    result = plan([the_pod], [the_claim], classes)
    (m,) = result.matches
    assert m.reason is reason
    assert not m.ok
    assert m.message
    assert result.dvms == ()
    assert result.dmps == ()
    assert not result.has_actions


def test_pinned_class_that_matches_mounts() -> None:
    result = plan([pod()], [claim(storageProviderClass="s3-sample")])
    assert len(result.dvms) == 1


# ----------------------------------------------------------------------------- conflicts


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("/data", "/data", True),
        ("/data", "/data/x", True),
        ("/data/x", "/data", True),
        ("/data", "/database", False),
        ("/a/b", "/a/c", False),
    ],
)
def test_mountpoints_overlap(a: str, b: str, overlap: bool) -> None:
    assert mountpoints_overlap(a, b) is overlap


def test_nested_mountpoint_conflict_newer_claim_loses() -> None:
    older = claim("zz-old", mountpoint="/data", age=0)
    newer = claim("aa-new", mountpoint="/data/sub", age=10)
    unrelated = claim("other", mountpoint="/logs", age=20)
    result = plan([pod()], [newer, unrelated, older])
    by_claim = {m.claim.name: m for m in result.matches}
    assert by_claim["zz-old"].ok
    assert by_claim["other"].ok
    assert by_claim["aa-new"].reason is Reason.MOUNTPOINT_CONFLICT
    assert "zz-old" in by_claim["aa-new"].message
    assert sorted(d.spec.claim_name for d in result.dvms) == ["other", "zz-old"]


def test_conflict_tie_is_broken_by_name() -> None:
    result = plan([pod()], [claim("b", age=0), claim("a", age=0)])
    by_claim = {m.claim.name: m for m in result.matches}
    assert by_claim["a"].ok
    assert by_claim["b"].reason is Reason.MOUNTPOINT_CONFLICT


def test_conflicts_are_per_pod_and_ignore_rejected_claims() -> None:
    pods = [pod("p1", labels={"app": "web", "x": "1"}), pod("p2")]
    claims = [claim("a", labels={"x": "1"}, age=5), claim("b", age=0, storageProviderClass="nope")]
    result = plan(pods, claims)
    by = {(m.claim.name, m.pod.name): m.reason for m in result.matches}
    assert by == {
        ("a", "p1"): None,
        ("b", "p1"): Reason.CLASS_MISMATCH,
        ("b", "p2"): Reason.CLASS_MISMATCH,
    }


# ----------------------------------------------------------------------------- determinism


def _scenario() -> tuple[list[PodInfo], list[DynamicVolumeClaim], list[StorageProviderClass]]:
    pods = [
        pod(f"p{i}", policy=(c.POLICY_SHARED if i % 2 else c.POLICY_INDEPENDENT)) for i in range(4)
    ]
    claims = [claim(f"c{i}", mountpoint=f"/m{i % 3}", age=i) for i in range(5)]
    return pods, claims, [spc(), spc("s3-other")]


@settings(max_examples=25, deadline=None)
@given(st.randoms(use_true_random=False))
def test_plan_is_independent_of_input_order(rnd: random.Random) -> None:
    pods, claims, classes = _scenario()
    expected = plan(pods, claims, classes)
    rnd.shuffle(pods)
    rnd.shuffle(claims)
    rnd.shuffle(classes)
    assert plan(pods, claims, classes) == expected


def test_names_are_deterministic_and_dns_safe() -> None:
    long_claim = claim("c" * 120 + ".x" * 60)
    p = pod("p" * 200)
    name = dvm_name(long_claim, p)
    assert name == dvm_name(long_claim, p)
    assert len(name) <= 253
    assert _DNS_SUBDOMAIN.fullmatch(name)
    assert dvm_name(claim("other"), p) != dvm_name(claim("c1"), p)
    cls_name = "a.very-long.class-name." + "z" * 100
    for policy in (c.POLICY_INDEPENDENT, c.POLICY_SHARED):
        dname = dmp_name(policy=policy, class_name=cls_name, node_name="n", pod_uid=p.uid)
        assert len(dname) <= 63
        assert _DNS_LABEL.fullmatch(dname)
    assert dmp_name(policy=c.POLICY_SHARED, class_name="a", node_name="n1") != dmp_name(
        policy=c.POLICY_SHARED, class_name="a", node_name="n2"
    )
    assert label_value("short") == "short"
    long_value = label_value("p" * 200)
    assert len(long_value) <= 63
    assert long_value == label_value("p" * 200)
    assert label_value("q" * 200) != long_value


# ----------------------------------------------------------------------------- life cycle


def test_applying_a_plan_converges() -> None:
    pods, claims, classes = _scenario()
    first = plan(pods, claims, classes)
    assert first.has_actions
    dvms, dmps = apply(first, [], [])
    again = plan(pods, claims, classes, dvms=dvms, dmps=dmps)
    assert not again.has_actions
    assert again.idle_dmps == ()
    assert again.orphaned_dvms == ()
    assert again.dvms == first.dvms


def test_removed_claim_tears_down_then_frees_dmps() -> None:
    shared, independent = pod("s", policy=c.POLICY_SHARED), pod("i")
    pods, claims = [shared, independent], [claim()]
    dvms, dmps = apply(plan(pods, claims), [], [])
    assert len(dmps) == 2

    gone = plan(pods, [], dvms=dvms, dmps=dmps)
    assert {d.name for d in gone.delete_dvms} == {d.name for d in dvms}
    # The DMPs must stay while their mounts are being torn down.
    assert gone.delete_dmps == ()
    assert gone.idle_dmps == ()
    tearing_down = [attrs.evolve(d, deleting=True) for d in dvms]
    waiting = plan(pods, [], dvms=tearing_down, dmps=dmps)
    assert not waiting.has_actions
    assert waiting.orphaned_dvms == ()

    done = plan(pods, [], dvms=[], dmps=dmps)
    assert [p.labels[c.LABEL_POLICY] for p in done.delete_dmps] == [c.POLICY_INDEPENDENT]
    assert [p.labels[c.LABEL_POLICY] for p in done.idle_dmps] == [c.POLICY_SHARED]
    # A claim coming back re-uses the idle shared DMP instead of making another.
    back = plan(pods, claims, dvms=[], dmps=dmps)
    assert back.idle_dmps == back.delete_dmps == back.create_dmps == ()
    assert len(back.create_dvms) == 2


def _on_publish(name: str = "s3-sample", **params: str) -> StorageProviderClass:
    base = spc(name)
    return spc(
        name,
        parameters={**base.parameters, c.PARAM_DMP_START: c.DMP_START_ON_PUBLISH, **params},
    )


def test_dmp_start_on_publish_starts_each_published_pods_dmp_before_any_claim() -> None:
    waiting = pod("i1")
    unpublished = pod("i2")
    shared = [pod("s1", policy=c.POLICY_SHARED), pod("s2", policy=c.POLICY_SHARED)]
    other_class = pod("o1", cls="s3-other")
    gone = attrs.evolve(pod("d1"), deleting=True)
    pods = [waiting, unpublished, *shared, other_class, gone]
    slots = slots_for([waiting, *shared, other_class, gone])
    classes = [_on_publish(), spc("s3-other")]
    result = plan(pods, [], classes, slots=slots)
    assert result.dvms == ()
    # One DMP for the published independent pod, one for the node's shared pods; none for
    # the pod not yet published, the one being deleted, nor the class that waits for claims.
    started = {(d.policy, d.pod_uid) for d in result.create_dmps}
    assert started == {(c.POLICY_INDEPENDENT, waiting.uid), (c.POLICY_SHARED, "")}
    # Applied, the plan is stable: the idle DMPs stay while their pods are there.
    _, dmps = apply(result, [], [])
    again = plan(pods, [], classes, slots=slots, dmps=dmps)
    assert not again.has_actions
    assert again.idle_dmps == ()
    # The first claim mounts through the DMPs already running; only the pod of the class
    # that waits for claims gets its DMP now.
    claimed = plan(pods, [claim()], classes, slots=slots, dmps=dmps)
    assert [d.class_name for d in claimed.create_dmps] == ["s3-other"]
    running = {d.name for d in result.dmps}
    on_publish = [d for d in claimed.create_dvms if d.spec.storage_provider_class == "s3-sample"]
    assert len(on_publish) == 3
    assert {d.spec.dmp_name for d in on_publish} <= running
    # When the pod goes, its independent DMP goes at once; the shared one waits idle.
    left = plan([unpublished, other_class], [], classes, slots=slots, dmps=dmps)
    assert [p.labels[c.LABEL_POLICY] for p in left.delete_dmps] == [c.POLICY_INDEPENDENT]
    assert [p.labels[c.LABEL_POLICY] for p in left.idle_dmps] == [c.POLICY_SHARED]


def test_dmp_start_on_publish_respects_the_classs_namespaces() -> None:
    guarded = spc(
        "s3-sample",
        parameters={**_on_publish().parameters},
        allowedNamespaces=["allowed"],
    )
    pods = [pod("p", "allowed"), pod("q", "elsewhere")]
    result = plan(pods, [], [guarded])
    assert [d.pod_namespace for d in result.create_dmps] == ["allowed"]


def test_terminated_dmp_is_replaced_and_orphans_are_reported() -> None:
    pods, claims = [pod()], [claim()]
    first = plan(pods, claims)
    dvms, dmps = apply(first, [], [])
    failed = [attrs.evolve(p, phase="Failed") for p in dmps]
    result = plan(pods, claims, dvms=dvms, dmps=failed)
    assert [p.name for p in result.delete_dmps] == [p.name for p in failed]
    # The DMP is still desired, so the mount is not an orphan: it will be re-made.
    assert result.orphaned_dvms == ()
    # Without the claim, a mount being deleted whose DMP is gone has nobody to unmount it.
    deleting = [attrs.evolve(d, deleting=True) for d in dvms]
    orphaned = plan(pods, [], dvms=deleting, dmps=[])
    assert orphaned.orphaned_dvms == tuple(deleting)


def test_a_crash_looping_dmp_in_use_is_replaced_and_an_unused_one_deleted() -> None:
    pods, claims = [pod()], [claim()]
    dvms, dmps = apply(plan(pods, claims), [], [])
    looping = [attrs.evolve(p, crash_looping=True) for p in dmps]
    result = plan(pods, claims, dvms=dvms, dmps=looping)
    assert [p.name for p in result.replace_dmps] == [p.name for p in looping]
    assert result.delete_dmps == ()
    assert result.has_actions
    # Being deleted already: nothing to do but wait for it to go.
    going = [attrs.evolve(p, deleting=True) for p in looping]
    assert plan(pods, claims, dvms=dvms, dmps=going).replace_dmps == ()
    # Serving nothing: deleted as unused, not replaced.
    unused = plan(pods, [], dvms=[], dmps=looping)
    assert unused.replace_dmps == ()
    assert [p.name for p in unused.delete_dmps] == [p.name for p in looping]


@pytest.mark.parametrize(
    ("statuses", "looping"),
    [
        ([{"name": "a", "state": {"waiting": {"reason": "CrashLoopBackOff"}}}], True),
        (
            [
                {"name": "a", "state": {"running": {}}},
                {"state": {"waiting": {"reason": "CrashLoopBackOff"}}},
            ],
            True,
        ),
        ([{"name": "a", "state": {"waiting": {"reason": "ContainerCreating"}}}], False),
        # The first exit: kubelet starts it again at once.
        ([{"name": "a", "restartCount": 0, "state": {"terminated": {"reason": "Error"}}}], False),
        # An exit after a restart: kubelet backs off (and says so only when it is over).
        ([{"name": "a", "restartCount": 1, "state": {"terminated": {"reason": "Error"}}}], True),
        ([{"name": "a", "restartCount": True, "state": {"terminated": {}}}], False),
        ([{"name": "a", "restartCount": "3", "state": {"terminated": {}}}], False),
        ([{"name": "a", "restartCount": 4, "state": {"running": {}}}], False),
        # kubelet's status is read leniently: a malformed one is no crash loop.
        ("not a list", False),
        ([None, 3, {"state": "x"}, {"state": {"waiting": "y"}}], False),
        (None, False),
    ],
)
def test_crash_looping_is_read_from_the_container_statuses(statuses: object, looping: bool) -> None:
    obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
        "spec": {},
        "status": {"phase": "Running", "containerStatuses": statuses},
    }
    info = PodInfo.from_object(obj)
    assert info.crash_looping is looping
    # Stopped only when the looping container has exited (not while kubelet reports the
    # end of its back-off, when it starts it again).
    exited = (
        looping
        and isinstance(statuses, list)
        and any(isinstance(s, dict) and "terminated" in (s.get("state") or {}) for s in statuses)
    )
    assert info.crashed_and_stopped is exited


def test_changed_claim_updates_mount_in_place() -> None:
    pods = [pod()]
    dvms, dmps = apply(plan(pods, [claim()]), [], [])
    created = [attrs.evolve(d, uid="dvm-uid", resource_version="7") for d in dvms]
    changed = claim(readOnly=True)
    result = plan(pods, [changed], dvms=created, dmps=dmps)
    (update,) = result.update_dvms
    assert update.spec.read_only is True
    assert (update.uid, update.resource_version) == ("dvm-uid", "7")
    assert result.create_dvms == result.delete_dvms == ()


def test_unpublished_pods_wait_for_their_slot() -> None:
    result = plan([pod()], [claim()], slots={})
    assert result.dvms == ()
    assert [m.pod.name for m in result.unpublished] == ["p1"]


def test_foreign_dmps_and_mounts_are_left_alone() -> None:
    other_node = plan_node(
        node_name="node-2",
        pods=[pod(node="node-2")],
        claims=[claim()],
        classes=[spc()],
        slots=slots_for([pod()]),
        system_namespace=SYSTEM,
        dmp_image=IMAGE,
    )
    dvms, dmps = apply(other_node, [], [])
    result = plan([], [], dvms=dvms, dmps=dmps)
    assert not result.has_actions
    assert result.idle_dmps == ()


# ----------------------------------------------------------------------------- manifests


def _independent_spec() -> DmpSpec:
    (spec,) = plan([pod()], [claim()]).dmps
    return spec


def test_dmp_pod_manifest() -> None:
    spec = _independent_spec()
    manifest = dmp_pod_manifest(spec, priority_class_name="dynvol-critical")
    meta, pod_spec = manifest["metadata"], manifest["spec"]
    assert meta["namespace"] == SYSTEM
    assert meta["labels"][c.LABEL_COMPONENT] == c.COMPONENT_DMP
    assert meta["labels"][c.LABEL_POD_UID] == spec.pod_uid
    assert meta["ownerReferences"][0]["kind"] == "Node"
    # The Node as controller: kubectl drain evicts a DMP, it refuses a pod with no controller.
    assert meta["ownerReferences"][0]["controller"] is True
    assert pod_spec["nodeName"] == NODE
    assert pod_spec["priorityClassName"] == "dynvol-critical"
    assert pod_spec["serviceAccountName"] == c.DEFAULT_DMP_SERVICE_ACCOUNT
    # Not every taint any more: what its pods tolerate plus a node going away
    # (test_dispatch_scheduling has the rest).
    assert pod_spec["tolerations"] == [
        {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
    ]
    assert "imagePullSecrets" not in pod_spec
    (container,) = pod_spec["containers"]
    assert container["command"] == [
        "dynvol",
        "dmp",
        "--name",
        spec.name,
        "--namespace",
        SYSTEM,
        "--xvols",
        "/xvols",
        "--secrets-dir",
        "/secrets",
        "--work-dir",
        "/run/dynvol/dmp",
        # One pod's DMP watches that pod's namespace only (an indexed watch).
        "--mounts-namespace",
        spec.pod_namespace,
        "--metrics-address",
        "0.0.0.0:9812",
    ]
    assert spec.pod_namespace
    assert container["ports"] == [{"name": "metrics", "containerPort": 9812, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["image"] == IMAGE
    assert container["securityContext"] == {"privileged": True}
    # The class sizes the mount; the agent's own share is added (dmp_container_resources).
    assert container["resources"] == {
        "requests": {"cpu": "30m", "memory": "128Mi"},
        "limits": {"memory": "242Mi"},
    }
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["xvols"] == {
        "name": "xvols",
        "mountPath": "/xvols",
        "mountPropagation": "Bidirectional",
    }
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    assert volumes["xvols"]["hostPath"] == {"path": spec.host_path, "type": "Directory"}
    assert volumes["fuse"]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    assert volumes["credentials"]["secret"]["secretName"] == spec.credential_secret_name
    # The work dir (rclone's write cache) survives a restart of the container.
    assert mounts["work"] == {"name": "work", "mountPath": "/run/dynvol/dmp"}
    assert volumes["work"] == {"name": "work", "emptyDir": {}}


def test_a_dmp_on_the_host_network_keeps_its_status_server_on_loopback() -> None:
    # Several DMPs share a node's network there: a fixed port would clash, and a probe on a
    # random loopback port cannot be written into the manifest.
    manifest = dmp_pod_manifest(_independent_spec(), host_network=True)
    (container,) = manifest["spec"]["containers"]
    assert "--metrics-address" not in container["command"]
    assert not {"ports", "livenessProbe", "readinessProbe"} & container.keys()


def test_dmp_without_credentials_gets_an_empty_secrets_dir() -> None:
    bare = StorageProviderClass.from_object(
        {"metadata": {"name": "s3-sample"}, "spec": {"provider": "s3"}}
    )
    (spec,) = plan([pod()], [claim()], [bare]).dmps
    assert spec.credential_secret_name is None
    volumes = {v["name"]: v for v in dmp_pod_manifest(spec)["spec"]["volumes"]}
    assert "emptyDir" in volumes["credentials"]
    with pytest.raises(ValueError, match="references no Secret"):
        credential_secret_manifest(bare, namespace=SYSTEM, source={})


def test_every_dmp_of_a_class_mounts_the_class_copy() -> None:
    pods = [pod("p1"), pod("p2"), pod("s1", policy=c.POLICY_SHARED)]
    result = plan(pods, [claim()])
    assert len(result.dmps) == 3
    names = {d.credential_secret_name for d in result.dmps}
    assert names == {credentials_secret_name("s3-sample")}
    for spec in result.dmps:
        volumes = {v["name"]: v for v in dmp_pod_manifest(spec)["spec"]["volumes"]}
        assert volumes["credentials"]["secret"]["secretName"] == credentials_secret_name(
            "s3-sample"
        )


def test_a_class_pointing_at_another_secret_gets_another_shared_dmp() -> None:
    # "Credential" in shared grouping is the class's Secret reference: re-pointing the
    # class starts a fresh shared DMP (its mounts move there), though both read one copy.
    shared = [pod("p1", policy=c.POLICY_SHARED)]
    (before,) = plan(shared, [claim()], [spc()]).dmps
    moved = spc(parameters={c.PARAM_SECRET_NAME: "rotated", c.PARAM_SECRET_NAMESPACE: "default"})
    (after,) = plan(shared, [claim()], [moved]).dmps
    assert before.name != after.name
    assert before.labels[c.LABEL_CREDENTIAL] != after.labels[c.LABEL_CREDENTIAL]
    assert before.credential_secret_name == after.credential_secret_name


def test_credential_secret_manifest() -> None:
    cls = spc()
    source = {
        "metadata": {"name": "creds", "namespace": "default", "resourceVersion": "7"},
        "data": {"access-key-id": "YQ==", "secret-access-key": "Yg=="},
        "type": "Opaque",
    }
    secret = credential_secret_manifest(cls, namespace=SYSTEM, source=source)
    meta = secret["metadata"]
    assert meta["name"] == credentials_secret_name(cls.name)
    assert meta["namespace"] == SYSTEM
    assert meta["ownerReferences"] == [
        {
            "apiVersion": c.API_VERSION,
            "kind": c.KIND_CLASS,
            "name": cls.name,
            "uid": cls.uid,
            "controller": True,
        }
    ]
    assert meta["labels"][c.LABEL_COMPONENT] == c.COMPONENT_CREDENTIALS
    assert meta["labels"][c.LABEL_CLASS] == cls.name
    assert meta["annotations"][ANNOTATION_SOURCE_SECRET] == "default/creds"
    assert meta["annotations"][ANNOTATION_DATA_DIGEST] == credentials_digest(source["data"])
    assert secret["data"] == source["data"]
    assert secret["type"] == "Opaque"
    assert "resourceVersion" not in meta
    # A changed source changes the digest; the same data in another order does not.
    changed = {**source, "data": {**source["data"], "secret-access-key": "Yw=="}}
    again = credential_secret_manifest(cls, namespace=SYSTEM, source=changed)
    assert (
        again["metadata"]["annotations"][ANNOTATION_DATA_DIGEST]
        != (meta["annotations"][ANNOTATION_DATA_DIGEST])
    )
    reordered = {"data": dict(reversed(list(source["data"].items())))}
    assert credential_secret_manifest(cls, namespace=SYSTEM, source=reordered) == secret


def test_credential_secret_manifest_ignores_malformed_data() -> None:
    secret = credential_secret_manifest(
        spc(), namespace=SYSTEM, source={"data": {"ok": "YQ==", "bad": 3, "none": None}}
    )
    assert secret["data"] == {"ok": "YQ=="}
    empty = credential_secret_manifest(spc(), namespace=SYSTEM, source={"data": ["x"]})
    assert empty["data"] == {}


@given(st.text(min_size=1, max_size=253), st.text(min_size=1, max_size=253))
def test_credentials_secret_names_are_valid_and_distinct(a: str, b: str) -> None:
    for name in (a, b):
        got = credentials_secret_name(name)
        assert len(got) <= 63
        assert _DNS_LABEL.fullmatch(got), got
    if a != b:
        assert credentials_secret_name(a) != credentials_secret_name(b)
    assert credentials_secret_name("a.b") != credentials_secret_name("a-b")


def test_dmp_resources_add_the_agent_overhead_to_the_class_values() -> None:
    from dynvol_core.dispatch import dmp_container_resources
    from dynvol_core.models import MountResources
    from dynvol_core.quantities import parse_quantity as q

    seed = MountResources(
        cpu_request=q("10m"), memory_request=q("50Mi"), cpu_limit=q("10m"), memory_limit=q("50Mi")
    )
    assert dmp_container_resources(seed) == {
        "requests": {"cpu": "30m", "memory": "178Mi"},
        "limits": {"cpu": "1010m", "memory": "242Mi"},
    }
    # Unset limits stay unset; requests always carry the agent's share.
    assert dmp_container_resources(MountResources()) == {
        "requests": {"cpu": "20m", "memory": "128Mi"}
    }
    odd = dmp_container_resources(MountResources(cpu_limit=q("0.5"), memory_limit=q("1G")))
    assert odd["limits"] == {"cpu": "1500m", "memory": str(10**9 + 192 * 1024 * 1024)}
