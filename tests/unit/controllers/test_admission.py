"""Pod mutation and admission responses, as pure functions."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynvol_controllers.admission import (
    LABEL_INJECT,
    AdmissionDecision,
    apply_patch,
    mutate_pod,
    review_response,
)
from dynvol_controllers.webhooks import webhook_configurations
from dynvol_core import constants as c

OPT_IN = {
    c.ANNOTATION_STORAGE_PROVIDER_CLASS: "s3-sample",
    c.ANNOTATION_MOUNT_PATH_ROOT: "/dynamic",
}


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    spec.setdefault("containers", [{"name": "app", "image": "x"}])
    return {
        "metadata": {"name": "p", "namespace": "ns", "annotations": annotations or {}},
        "spec": spec,
    }


def test_seed_volume_is_injected() -> None:
    decision = mutate_pod(pod(OPT_IN))
    assert decision.allowed
    mutated = apply_patch(pod(OPT_IN), decision.patch)
    assert mutated["spec"]["volumes"] == [
        {
            "name": "dynamic-volume-root-path",
            "csi": {
                "driver": "dynamicvolume.csi.cloudnative101.net",
                "readOnly": True,
                "volumeAttributes": {
                    "mountPodDispatchPolicy": "independent",
                    "storageProviderClass": "s3-sample",
                },
            },
        }
    ]
    assert mutated["spec"]["containers"][0]["volumeMounts"] == [
        {
            "name": c.VOLUME_NAME,
            "mountPath": "/dynamic",
            "readOnly": True,
            "mountPropagation": "HostToContainer",
        }
    ]


def test_pods_that_did_not_opt_in_are_untouched() -> None:
    assert mutate_pod(pod()) == AdmissionDecision.allow()
    opted_out = pod({**OPT_IN, LABEL_INJECT: "false"})
    assert mutate_pod(opted_out).patch == ()


def test_only_long_running_containers_get_the_mount() -> None:
    p = pod(
        OPT_IN,
        containers=[{"name": "a", "image": "x"}, {"name": "b", "image": "x", "volumeMounts": []}],
        initContainers=[
            {"name": "init", "image": "x"},
            {"name": "side", "image": "x", "restartPolicy": "Always"},
        ],
    )
    mutated = apply_patch(p, mutate_pod(p).patch)
    assert [len(ctr.get("volumeMounts", [])) for ctr in mutated["spec"]["containers"]] == [1, 1]
    assert [len(ctr.get("volumeMounts", [])) for ctr in mutated["spec"]["initContainers"]] == [0, 1]


@pytest.mark.parametrize("path", ["/dynamic", "/dynamic/", "/dynamic/inner"])
def test_root_conflicting_with_a_mount_is_denied(path: str) -> None:
    p = pod(
        OPT_IN,
        containers=[
            {"name": "a", "image": "x", "volumeMounts": [{"name": "v", "mountPath": path}]}
        ],
    )
    decision = mutate_pod(p)
    assert not decision.allowed
    assert "dynamic volume root" in decision.message


def test_root_beneath_another_mount_is_fine() -> None:
    p = pod(
        OPT_IN,
        containers=[
            {"name": "a", "image": "x", "volumeMounts": [{"name": "v", "mountPath": "/dyn"}]}
        ],
    )
    assert mutate_pod(p).allowed


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({c.ANNOTATION_STORAGE_PROVIDER_CLASS: "Bad_Name"}, "DNS-1123"),
        ({**OPT_IN, c.ANNOTATION_MOUNT_PATH_ROOT: "relative"}, "absolute"),
        ({**OPT_IN, c.ANNOTATION_MOUNT_PATH_ROOT: "/a/../b"}, "'..'"),
        ({**OPT_IN, c.ANNOTATION_MOUNT_PATH_ROOT: "/"}, "must not be '/'"),
        ({**OPT_IN, c.ANNOTATION_DISPATCH_POLICY: "sometimes"}, "dispatch policy"),
        ({c.ANNOTATION_MOUNT_PATH_ROOT: "/x"}, "name the StorageProviderClass"),
    ],
)
def test_unusable_opt_in_is_denied(annotations: dict[str, str], message: str) -> None:
    decision = mutate_pod(pod(annotations))
    assert not decision.allowed
    assert message in decision.message


def test_namespace_opt_in_with_pod_override() -> None:
    namespace = {
        "metadata": {
            "name": "ns",
            "labels": {LABEL_INJECT: "enabled"},
            "annotations": {c.ANNOTATION_STORAGE_PROVIDER_CLASS: "ns-class"},
        }
    }
    p = pod({c.ANNOTATION_DISPATCH_POLICY: "shared"})
    mutated = apply_patch(p, mutate_pod(p, namespace).patch)
    assert mutated["spec"]["volumes"][0]["csi"]["volumeAttributes"] == {
        "storageProviderClass": "ns-class",
        "mountPodDispatchPolicy": "shared",
    }
    assert mutated["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] == "/dynamic"
    missing = {"metadata": {"name": "ns", "labels": {LABEL_INJECT: "enabled"}}}
    assert not mutate_pod(pod(), missing).allowed


def test_class_lookup_warns_and_enforces_allowed_namespaces() -> None:
    assert mutate_pod(pod(OPT_IN), class_lookup=lambda name: None).warnings
    allowed = {"spec": {"allowedNamespaces": ["elsewhere"]}}
    decision = mutate_pod(pod(OPT_IN), class_lookup=lambda name: allowed)
    assert not decision.allowed
    assert "allowedNamespaces" in decision.message


containers = st.lists(
    st.fixed_dictionaries(
        {"name": st.text("abc", min_size=1, max_size=5), "image": st.just("x")},
        optional={
            "volumeMounts": st.lists(
                st.fixed_dictionaries(
                    {
                        "name": st.sampled_from(["v1", "v2"]),
                        "mountPath": st.sampled_from(["/data", "/etc/x", "/dyn"]),
                    }
                ),
                max_size=2,
            )
        },
    ),
    min_size=1,
    max_size=4,
)


@given(containers, st.booleans(), st.sampled_from(["/dynamic", "/a/b", "/x//y/"]))
def test_mutation_is_idempotent(ctrs: list[dict[str, Any]], volumes: bool, root: str) -> None:
    p = pod({**OPT_IN, c.ANNOTATION_MOUNT_PATH_ROOT: root}, containers=ctrs)
    if volumes:
        p["spec"]["volumes"] = [{"name": "v1", "emptyDir": {}}]
    first = mutate_pod(p)
    assert first.allowed
    once = apply_patch(p, first.patch)
    again = mutate_pod(once)
    assert again.allowed
    assert again.patch == ()
    # Nothing that was there before is changed or lost.
    assert once["spec"]["volumes"][: len(p["spec"].get("volumes") or [])] == (
        p["spec"].get("volumes") or []
    )


def test_review_response_encodes_patch_and_denials() -> None:
    request = {"uid": "u1"}
    allowed = review_response(request, mutate_pod(pod(OPT_IN)))
    response = allowed["response"]
    assert response["uid"] == "u1"
    assert response["patchType"] == "JSONPatch"
    assert json.loads(base64.b64decode(response["patch"]))[0]["op"] == "add"
    denied = review_response(request, AdmissionDecision.deny("nope", reason="Conflict"))
    assert denied["response"]["allowed"] is False
    assert denied["response"]["status"] == {
        "status": "Failure",
        "message": "nope",
        "reason": "Conflict",
        "code": 409,
    }


def test_webhook_configurations_choose_failure_policies() -> None:
    mutating, validating = webhook_configurations(ca_bundle="Q0E=", url="https://127.0.0.1:1")
    hooks = {h["name"].split(".")[0]: h for h in mutating["webhooks"]}
    assert hooks["pods"]["failurePolicy"] == "Ignore"
    assert hooks["namespace-pods"]["failurePolicy"] == "Fail"
    assert hooks["pods"]["clientConfig"]["url"] == "https://127.0.0.1:1/mutate-pods"
    excluded = hooks["pods"]["namespaceSelector"]["matchExpressions"][0]["values"]
    assert "kube-system" in excluded
    assert c.DEFAULT_SYSTEM_NAMESPACE in excluded
    assert validating["webhooks"][0]["failurePolicy"] == "Fail"
    assert set(validating["webhooks"][0]["rules"][0]["resources"]) == {
        c.PLURAL_CLAIM,
        c.PLURAL_CLASS,
    }


def test_the_opt_in_is_written_onto_the_pod() -> None:
    """A pod carrying the volume carries, itself, the annotations it was made from."""
    namespace = {
        "metadata": {
            "name": "ns",
            "labels": {LABEL_INJECT: "enabled"},
            "annotations": {
                c.ANNOTATION_STORAGE_PROVIDER_CLASS: "ns-class",
                c.ANNOTATION_MOUNT_PATH_ROOT: "/from-ns",
            },
        }
    }
    bare = pod()
    bare["metadata"].pop("annotations")
    stamped = apply_patch(bare, mutate_pod(bare, namespace).patch)
    assert stamped["metadata"]["annotations"] == {
        c.ANNOTATION_STORAGE_PROVIDER_CLASS: "ns-class",
        c.ANNOTATION_MOUNT_PATH_ROOT: "/from-ns",
        c.ANNOTATION_DISPATCH_POLICY: c.POLICY_INDEPENDENT,
    }
    # The pod's own annotations win and are kept as written; the missing ones are added.
    own = pod({c.ANNOTATION_DISPATCH_POLICY: "shared", "other/key": "v"})
    patch = mutate_pod(own, namespace).patch
    assert [op["path"] for op in patch if op["path"].startswith("/metadata")] == [
        "/metadata/annotations/dynamicvolume.csi.cloudnative101.net~1storage-provider-class",
        "/metadata/annotations/dynamicvolume.csi.cloudnative101.net~1volume-mount-path-root",
    ]
    mutated = apply_patch(own, patch)
    assert mutated["metadata"]["annotations"]["other/key"] == "v"
    assert mutated["metadata"]["annotations"][c.ANNOTATION_DISPATCH_POLICY] == "shared"
    assert mutate_pod(mutated, namespace).patch == ()
    # Not opted in: nothing is written.
    assert mutate_pod(pod()).patch == ()
