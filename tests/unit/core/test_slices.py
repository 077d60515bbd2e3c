"""Claim slices (dynvol_core.slices): what the controller writes for each node, and that a
node planning from its slice plans exactly what it planned from every claim."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from dynvol_core import constants as c
from dynvol_core.dispatch import plan_node
from dynvol_core.models import DynamicVolumeClaim, InjectedVolume, PodInfo
from dynvol_core.paths import XvolsLayout
from dynvol_core.slices import (
    claim_object,
    claims_for_node,
    slice_entries,
    slice_entry,
    slice_object,
)

from .test_dispatch import spc

T0 = dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.UTC)
LAYOUT = XvolsLayout.default()
NODES = ("node-a", "node-b", "node-c")
NAMESPACES = ("ns-a", "ns-b")
LABELS = ({"app": "web"}, {"app": "db"}, {"app": "web", "tier": "front"}, {})


def _uid(seed: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, seed))


def raw_claim(
    name: str,
    namespace: str,
    *,
    selector: dict[str, Any],
    mountpoint: str = "/data",
    age: int = 0,
    deleting: bool = False,
    generation: int = 1,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": _uid(f"{namespace}/{name}"),
        "generation": generation,
        "resourceVersion": "17",
        "creationTimestamp": (T0 + dt.timedelta(seconds=age)).isoformat(),
        "labels": {"team": "x"},
        "managedFields": [{"manager": "kubectl"}],
    }
    if deleting:
        meta["deletionTimestamp"] = T0.isoformat()
        meta["finalizers"] = ["example.com/keep"]
    return {
        "apiVersion": f"{c.GROUP}/{c.VERSION}",
        "kind": c.KIND_CLAIM,
        "metadata": meta,
        "spec": {
            "mountpoint": mountpoint,
            "selector": selector,
            "s3Config": {"bucket": "b1", "endpoint": "http://127.0.0.1:9000"},
        },
        "status": {"matchedPods": 3, "conditions": []},
    }


def pod(name: str, namespace: str, node: str, labels: dict[str, str], **kw: Any) -> PodInfo:
    return PodInfo(
        namespace=namespace,
        name=name,
        uid=_uid(f"pod/{namespace}/{name}"),
        node_name=node,
        labels=labels,
        phase=kw.pop("phase", "Running"),
        volume=kw.pop("volume", InjectedVolume("s3-sample", c.POLICY_SHARED)),
        **kw,
    )


def test_an_entry_copies_identity_and_spec_and_leaves_out_status_and_the_rest() -> None:
    raw = raw_claim("c1", "ns-a", selector={"matchLabels": {"app": "web"}}, deleting=True)
    entry = slice_entry(raw)
    assert set(entry) == {
        "namespace",
        "name",
        "uid",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "spec",
    }
    assert entry["spec"] == raw["spec"]
    # Status writes and label edits do not change an entry, so they write no slice.
    edited = {**raw, "status": {"matchedPods": 9}, "metadata": {**raw["metadata"], "labels": {}}}
    assert slice_entry(edited) == entry


def test_a_claim_read_back_from_its_entry_is_the_claim() -> None:
    for deleting in (False, True):
        raw = raw_claim(
            "c1", "ns-a", selector={"matchLabels": {"app": "web"}}, deleting=deleting, age=5
        )
        back = DynamicVolumeClaim.from_object(claim_object(slice_entry(raw), revision="42"))
        assert back == DynamicVolumeClaim.from_object(raw)


def test_the_slice_of_a_node_has_the_claims_selecting_its_opted_in_pods() -> None:
    web = raw_claim("web", "ns-a", selector={"matchLabels": {"app": "web"}})
    db = raw_claim("db", "ns-a", selector={"matchLabels": {"app": "db"}})
    other_ns = raw_claim("web", "ns-b", selector={"matchLabels": {"app": "web"}})
    claims = [DynamicVolumeClaim.from_object(r) for r in (web, db, other_ns)]
    pods = [
        pod("p1", "ns-a", "node-a", {"app": "web"}),
        # Not opted in: no claim is ever mounted into it, so it needs none.
        pod("p2", "ns-a", "node-a", {"app": "db"}, volume=None),
    ]
    chosen = claims_for_node(claims, pods)
    assert [(cl.namespace, cl.name) for cl in chosen] == [("ns-a", "web")]


def test_entries_are_in_a_stable_order() -> None:
    raws = [
        raw_claim(n, ns, selector={"matchLabels": {"app": "web"}})
        for ns, n in (("ns-b", "a"), ("ns-a", "z"), ("ns-a", "b"))
    ]
    keys = [(e["namespace"], e["name"]) for e in slice_entries(raws)]
    assert keys == [("ns-a", "b"), ("ns-a", "z"), ("ns-b", "a")]
    assert slice_entries(list(reversed(raws))) == slice_entries(raws)


def test_a_slice_is_owned_by_its_node_when_the_node_is_known() -> None:
    owned = slice_object("node-a", [], node_uid="u-1")
    assert owned["metadata"]["name"] == owned["spec"]["nodeName"] == "node-a"
    assert owned["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Node", "name": "node-a", "uid": "u-1"}
    ]
    assert "ownerReferences" not in slice_object("node-a", [])["metadata"]


_pods = st.lists(
    st.tuples(
        st.sampled_from(NAMESPACES),
        st.sampled_from(NODES),
        st.sampled_from(range(len(LABELS))),
        st.booleans(),  # opted in
        st.sampled_from(("Running", "Pending", "Succeeded")),
        st.booleans(),  # being deleted
    ),
    max_size=8,
)
_claims = st.lists(
    st.tuples(
        st.sampled_from(NAMESPACES),
        st.sampled_from(("web", "db", "front")),
        st.sampled_from(("/data", "/data/sub", "/other")),
        st.booleans(),  # being deleted
    ),
    max_size=6,
)
_SELECTORS = {
    "web": {"matchLabels": {"app": "web"}},
    "db": {"matchLabels": {"app": "db"}},
    "front": {"matchExpressions": [{"key": "tier", "operator": "Exists"}]},
}


@settings(max_examples=200, deadline=None)
@given(_pods, _claims)
def test_every_node_plans_the_same_from_its_slice_as_from_every_claim(
    pod_specs: list[tuple[str, str, int, bool, str, bool]],
    claim_specs: list[tuple[str, str, str, bool]],
) -> None:
    pods = [
        pod(
            f"p{i}",
            ns,
            node,
            LABELS[labels],
            phase=phase,
            deleting=deleting,
            volume=InjectedVolume("s3-sample", c.POLICY_SHARED if i % 2 else c.POLICY_INDEPENDENT)
            if opted
            else None,
        )
        for i, (ns, node, labels, opted, phase, deleting) in enumerate(pod_specs)
    ]
    raws = [
        raw_claim(f"c{i}", ns, selector=_SELECTORS[sel], mountpoint=mp, age=i, deleting=deleting)
        for i, (ns, sel, mp, deleting) in enumerate(claim_specs)
    ]
    every = [DynamicVolumeClaim.from_object(r) for r in raws]
    by_uid = {cl.uid: r for cl, r in zip(every, raws, strict=True)}
    for node in NODES:
        local = [p for p in pods if p.node_name == node]
        entries = slice_entries([by_uid[cl.uid] for cl in claims_for_node(every, local)])
        from_slice = [
            DynamicVolumeClaim.from_object(claim_object(e, revision="9")) for e in entries
        ]
        # What the node read before slices: every claim of its opted-in pods' namespaces.
        namespaces = {p.namespace for p in local if p.opted_in}
        before = [cl for cl in every if cl.namespace in namespaces]
        assert _plan(node, local, from_slice) == _plan(node, local, before)
        # And nothing in the slice selects none of the node's opted-in pods.
        for cl in from_slice:
            assert any(
                p.opted_in and p.namespace == cl.namespace and cl.selector.selects(p.labels)
                for p in local
            )


def _plan(node: str, pods: list[PodInfo], claims: list[DynamicVolumeClaim]) -> Any:
    return plan_node(
        node_name=node,
        pods=pods,
        claims=claims,
        classes=[spc()],
        slots={
            p.uid: LAYOUT.slot(p.volume.class_name, _uid(f"slot/{p.uid}"), p.uid)
            for p in pods
            if p.volume is not None
        },
        system_namespace="dynvol-system",
        dmp_image="example.com/dynvol:test",
        existing_dvms=(),
        existing_dmps=(),
        node_uid=_uid(node),
    )
