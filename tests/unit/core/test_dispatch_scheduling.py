"""Where and how DMPs run: tolerations inherited from their pods, priority, pull secrets."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynvol_core import constants as c
from dynvol_core.dispatch import (
    DMP_NODE_TOLERATIONS,
    MAX_DMP_TOLERATIONS,
    NodePlan,
    dmp_pod_manifest,
    dmp_tolerations,
    missing_tolerations,
)
from dynvol_core.errors import FieldError, InvalidObject
from dynvol_core.models import PodInfo, Toleration
from tests.unit.core.test_dispatch import apply, claim, plan, pod

NOT_READY = {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"}
UNREACHABLE = {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"}


def tol(**fields: Any) -> Toleration:
    errors: list[FieldError] = []
    read = Toleration.read(fields, "t", errors)
    assert read is not None, errors
    return read


GPU = tol(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
DEDICATED = tol(key="dedicated", operator="Equal", value="batch", effect="NoExecute")
DRAINING = tol(key="example.com/draining", operator="Exists", effect="NoExecute")


def _apply_tolerations(result: NodePlan, dmps: list[PodInfo]) -> list[PodInfo]:
    added = {t.pod.name: t.add for t in result.tolerate_dmps}
    return [
        attrs.evolve(p, tolerations=p.tolerations + added[p.name]) if p.name in added else p
        for p in dmps
    ]


def _rendered(result: NodePlan, name: str) -> list[dict[str, Any]]:
    spec = next(s for s in result.dmps if s.name == name)
    tolerations: list[dict[str, Any]] = dmp_pod_manifest(spec)["spec"]["tolerations"]
    return tolerations


# ----------------------------------------------------------------------------- tolerations


def test_a_dmp_of_a_pod_without_tolerations_tolerates_only_its_node_going_away() -> None:
    (spec,) = plan([pod()], [claim()]).dmps
    assert dmp_pod_manifest(spec)["spec"]["tolerations"] == [NOT_READY, UNREACHABLE]


def test_an_independent_dmp_tolerates_what_its_pod_tolerates_without_a_time_limit() -> None:
    timed = tol(
        key="example.com/draining", operator="Exists", effect="NoExecute", tolerationSeconds=60
    )
    result = plan([pod(tolerations=(GPU, timed))], [claim()])
    (spec,) = result.dmps
    rendered = dmp_pod_manifest(spec)["spec"]["tolerations"]
    # Sorted by key; the pod's 60 s become for ever: the DMP must outlive its pod.
    assert rendered == [
        {"key": "example.com/draining", "operator": "Exists", "effect": "NoExecute"},
        NOT_READY,
        UNREACHABLE,
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    ]


def test_a_shared_dmp_tolerates_the_union_of_its_pods() -> None:
    pods = [
        pod("a", policy=c.POLICY_SHARED, tolerations=(GPU,)),
        pod("b", policy=c.POLICY_SHARED, tolerations=(DEDICATED, GPU)),
        pod("c", policy=c.POLICY_SHARED),
    ]
    result = plan(pods, [claim()])
    (spec,) = result.dmps
    assert set(spec.tolerations) == {GPU, DEDICATED.unbounded()}
    keys = [t.get("key") for t in dmp_pod_manifest(spec)["spec"]["tolerations"]]
    assert keys == ["dedicated", *(t.key for t in DMP_NODE_TOLERATIONS), "nvidia.com/gpu"]
    # The order of the pods does not matter.
    assert plan(list(reversed(pods)), [claim()]).dmps == result.dmps


def test_a_pod_tolerating_everything_makes_its_dmp_tolerate_everything() -> None:
    everything = tol(operator="Exists")
    result = plan([pod(tolerations=(GPU, everything))], [claim()])
    assert _rendered(result, result.dmps[0].name) == [{"operator": "Exists"}]


def test_too_many_distinct_tolerations_become_one_that_tolerates_everything() -> None:
    many = tuple(tol(key=f"k{i}", operator="Exists") for i in range(MAX_DMP_TOLERATIONS + 1))
    assert dmp_tolerations(many) == (Toleration(operator="Exists"),)
    # Up to the bound they are kept one by one.
    few = many[: MAX_DMP_TOLERATIONS - len(DMP_NODE_TOLERATIONS)]
    assert len(dmp_tolerations(few)) == MAX_DMP_TOLERATIONS


def test_a_new_pod_with_a_new_toleration_widens_the_running_shared_dmp() -> None:
    first = [pod("a", policy=c.POLICY_SHARED, tolerations=(GPU,))]
    result = plan(first, [claim()])
    dvms, dmps = apply(result, (), ())
    assert not plan(first, [claim()], dvms=dvms, dmps=dmps).has_actions

    both = [*first, pod("b", policy=c.POLICY_SHARED, tolerations=(DEDICATED,))]
    result = plan(both, [claim()], dvms=dvms, dmps=dmps)
    (change,) = result.tolerate_dmps
    assert change.pod.name == dmps[0].name
    assert change.add == (DEDICATED.unbounded(),)
    assert result.create_dmps == ()  # widened in place, not replaced

    dvms, dmps = apply(result, dvms, dmps)
    dmps = _apply_tolerations(result, dmps)
    assert not plan(both, [claim()], dvms=dvms, dmps=dmps).has_actions
    # The pod that brought it goes; the DMP keeps the toleration (none can be removed).
    assert not plan(first, [claim()], dvms=dvms, dmps=dmps).tolerate_dmps


def test_a_dmp_that_tolerates_everything_is_never_widened() -> None:
    result = plan([pod(policy=c.POLICY_SHARED)], [claim()])
    dvms, dmps = apply(result, (), ())
    # As the DMPs of earlier releases were made.
    dmps = [attrs.evolve(p, tolerations=(Toleration(operator="Exists"),)) for p in dmps]
    wide = [pod(policy=c.POLICY_SHARED, tolerations=(GPU, DEDICATED, DRAINING))]
    assert not plan(wide, [claim()], dvms=dvms, dmps=dmps).tolerate_dmps


_tolerations = st.lists(
    st.sampled_from([GPU, DEDICATED, DRAINING, tol(operator="Exists")]), max_size=3
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(_tolerations, min_size=1, max_size=4), st.lists(_tolerations, min_size=1, max_size=4)
)
def test_widening_converges_and_covers_every_served_pod(
    before: list[list[Toleration]], after: list[list[Toleration]]
) -> None:
    def pods(sets: list[list[Toleration]]) -> list[PodInfo]:
        return [
            pod(f"p{i}", policy=c.POLICY_SHARED, tolerations=tuple(ts)) for i, ts in enumerate(sets)
        ]

    dvms, dmps = apply(plan(pods(before), [claim()]), (), ())
    result = plan(pods(after), [claim()], dvms=dvms, dmps=dmps)
    dvms, dmps = apply(result, dvms, dmps)
    dmps = _apply_tolerations(result, dmps)
    assert not plan(pods(after), [claim()], dvms=dvms, dmps=dmps).has_actions
    (dmp,) = dmps
    for served in pods(after):
        for t in served.tolerations:
            assert any(have.covers(t.unbounded()) for have in dmp.tolerations), (t, dmp)


def test_covers() -> None:
    everything = tol(operator="Exists")
    any_gpu = tol(key="nvidia.com/gpu", operator="Exists")
    assert everything.covers(GPU)
    assert everything.covers(DEDICATED)
    assert any_gpu.covers(GPU)
    assert not GPU.covers(any_gpu)
    assert not GPU.covers(DEDICATED)
    other_value = tol(key="dedicated", operator="Equal", value="web", effect="NoExecute")
    assert not DEDICATED.covers(other_value)
    assert tol(key="dedicated", value="batch", effect="NoExecute").covers(DEDICATED)
    timed = tol(key="dedicated", value="batch", effect="NoExecute", tolerationSeconds=30)
    assert DEDICATED.covers(timed)
    assert not timed.covers(DEDICATED)
    assert missing_tolerations([everything], [GPU, DEDICATED]) == ()
    assert missing_tolerations([GPU], [GPU, DEDICATED]) == (DEDICATED,)


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        ({"key": "a", "operator": "Sometimes"}, "operator", "must be one of"),
        ({"operator": "Equal", "value": "x"}, "operator", "must be Exists when the key is empty"),
        ({"key": "a", "operator": "Exists", "value": "x"}, "value", "must be empty"),
        ({"key": "a", "effect": "NoRun"}, "effect", "must be empty or one of"),
        ({"key": "a", "effect": "NoSchedule", "tolerationSeconds": 5}, "tolerationSeconds", "only"),
        (
            {"key": "a", "effect": "NoExecute", "tolerationSeconds": "5"},
            "tolerationSeconds",
            "integer",
        ),
        ({"key": "bad key!"}, "key", ""),
        ({"key": "a", "value": "v" * 64}, "value", ""),
        ({"key": "a", "extra": 1}, "extra", "unknown field"),
    ],
)
def test_malformed_tolerations_are_refused_naming_the_field(
    raw: dict[str, Any], field: str, words: str
) -> None:
    body = {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u1"},
        "spec": {"tolerations": [{"operator": "Exists"}, raw]},
    }
    with pytest.raises(InvalidObject) as caught:
        PodInfo.from_object(body)
    text = str(caught.value)
    assert f"spec.tolerations[1].{field}" in text, text
    assert words in text


def test_tolerations_round_trip_as_the_pod_wrote_them() -> None:
    raw = [
        {"operator": "Exists"},
        {"key": "a", "value": "b", "effect": "NoExecute", "tolerationSeconds": 10},
        {"key": "c", "operator": "Equal", "value": "d"},
    ]
    info = PodInfo.from_object(
        {"metadata": {"name": "p", "namespace": "ns", "uid": "u1"}, "spec": {"tolerations": raw}}
    )
    assert [t.to_object() for t in info.tolerations] == raw


# ----------------------------------------------------------------------------- priority, pulls


def test_dmps_use_dynvols_priority_class_by_default() -> None:
    (spec,) = plan([pod()], [claim()]).dmps
    assert c.DEFAULT_DMP_PRIORITY_CLASS == "dynvol-mount"
    assert dmp_pod_manifest(spec)["spec"]["priorityClassName"] == "dynvol-mount"
    other = dmp_pod_manifest(spec, priority_class_name="system-node-critical")
    assert other["spec"]["priorityClassName"] == "system-node-critical"


def test_image_pull_secrets_are_named_in_order() -> None:
    (spec,) = plan([pod()], [claim()]).dmps
    manifest = dmp_pod_manifest(spec, image_pull_secrets=("registry-a", "registry-b"))
    assert manifest["spec"]["imagePullSecrets"] == [{"name": "registry-a"}, {"name": "registry-b"}]
