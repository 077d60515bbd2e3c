"""The publish guard: which pods may have their dynvol volume published (pure decisions)."""

from __future__ import annotations

import copy
import json
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynvol_controllers.admission import LABEL_INJECT, apply_patch, mutate_pod
from dynvol_core import constants as c
from dynvol_csi.errors import status_of
from dynvol_csi.guards import (
    DirectoryLookup,
    GuardUnavailable,
    PodGuard,
    PublishRefused,
    check_pod,
    expected_volume,
)
from dynvol_csi.validation import PublishRequest

UID = "6f1c1d4e-3b0a-4c61-9a35-0d6f9d1e2a77"
NODE = "node-a"


def request(**overrides: Any) -> PublishRequest:
    fields: dict[str, Any] = {
        "volume_id": "csi-" + "a" * 64,
        "target_path": PurePosixPath(f"/var/lib/kubelet/pods/{UID}/volumes/x/mount"),
        "pod_uid": UID,
        "pod_name": "app",
        "pod_namespace": "tenant",
        "class_name": "s3-sample",
        "policy": c.POLICY_INDEPENDENT,
        "read_only": True,
    }
    fields.update(overrides)
    return PublishRequest(**fields)


def webhook_pod(annotations: dict[str, str], namespace: dict[str, Any] | None = None) -> Any:
    """A pod as it is stored after dynvol's webhook mutated it."""
    plain = {
        "metadata": {
            "name": "app",
            "namespace": "tenant",
            "uid": UID,
            "annotations": annotations,
        },
        "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "x"}]},
    }
    decision = mutate_pod(plain, namespace)
    assert decision.allowed, decision.message
    return apply_patch(plain, decision.patch)


OPTED_IN = {c.ANNOTATION_STORAGE_PROVIDER_CLASS: "s3-sample"}
SPC: dict[str, Any] = {"metadata": {"name": "s3-sample"}, "spec": {"provider": "s3"}}


def test_a_pod_the_webhook_mutated_is_published() -> None:
    check_pod(request(), webhook_pod(OPTED_IN), SPC, node_id=NODE)


def test_a_pod_opted_in_by_its_namespace_is_published() -> None:
    namespace = {
        "metadata": {
            "name": "tenant",
            "labels": {LABEL_INJECT: "enabled"},
            "annotations": {
                c.ANNOTATION_STORAGE_PROVIDER_CLASS: "s3-sample",
                c.ANNOTATION_DISPATCH_POLICY: c.POLICY_SHARED,
            },
        }
    }
    pod = webhook_pod({}, namespace)
    # The webhook wrote the namespace's opt-in onto the pod: the guard needs only the pod.
    assert pod["metadata"]["annotations"][c.ANNOTATION_DISPATCH_POLICY] == c.POLICY_SHARED
    check_pod(request(policy=c.POLICY_SHARED), pod, SPC, node_id=NODE)


def _without_annotations(pod: Any) -> Any:
    pod["metadata"]["annotations"] = {}
    return pod


def _annotation(key: str, value: str) -> Any:
    def change(pod: Any) -> Any:
        pod["metadata"]["annotations"][key] = value
        return pod

    return change


def _volume(change: Any) -> Any:
    def apply(pod: Any) -> Any:
        change(pod["spec"]["volumes"][0])
        return pod

    return apply


def _field(path: tuple[str, ...], value: Any) -> Any:
    def change(pod: Any) -> Any:
        target = pod
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return pod

    return change


def _second_volume(pod: Any) -> Any:
    extra = copy.deepcopy(expected_volume("s3-sample", c.POLICY_INDEPENDENT))
    extra["name"] = "another"
    pod["spec"]["volumes"].append(extra)
    return pod


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_without_annotations, "without the annotation"),
        (_annotation(LABEL_INJECT, "False"), "opted out"),
        (_annotation(c.ANNOTATION_STORAGE_PROVIDER_CLASS, "other"), "annotations of pod"),
        (_annotation(c.ANNOTATION_DISPATCH_POLICY, c.POLICY_SHARED), "annotations of pod"),
        (_volume(lambda v: v["csi"].update(readOnly=False)), "exactly what the webhook"),
        (_volume(lambda v: v["csi"].pop("readOnly")), "exactly what the webhook"),
        (
            _volume(lambda v: v["csi"].update(nodePublishSecretRef={"name": "s"})),
            "exactly what the webhook",
        ),
        (
            _volume(lambda v: v["csi"]["volumeAttributes"].update(extra="x")),
            "exactly what the webhook",
        ),
        (_second_volume, "exactly what the webhook"),
        (_field(("metadata", "uid"), "0" * 8 + "-0000-0000-0000-" + "0" * 12), "has UID"),
        (_field(("spec", "nodeName"), "node-b"), "bound to node 'node-b'"),
    ],
)
def test_pods_that_do_not_match_are_refused(change: Any, message: str) -> None:
    pod = change(webhook_pod(OPTED_IN))
    with pytest.raises(PublishRefused, match=message) as caught:
        check_pod(request(), pod, SPC, node_id=NODE)
    assert status_of(caught.value).name == "FAILED_PRECONDITION"


def test_missing_pod_and_class_and_namespace_guardrail() -> None:
    with pytest.raises(PublishRefused, match="does not exist"):
        check_pod(request(), None, SPC, node_id=NODE)
    with pytest.raises(PublishRefused, match=r"StorageProviderClass 's3-sample'.*does not exist"):
        check_pod(request(), webhook_pod(OPTED_IN), None, node_id=NODE)
    guarded = {"spec": {"provider": "s3", "allowedNamespaces": ["elsewhere"]}}
    with pytest.raises(PublishRefused, match="may not be used in namespace 'tenant'"):
        check_pod(request(), webhook_pod(OPTED_IN), guarded, node_id=NODE)
    allowed = {"spec": {"provider": "s3", "allowedNamespaces": ["elsewhere", "tenant"]}}
    check_pod(request(), webhook_pod(OPTED_IN), allowed, node_id=NODE)


def test_a_request_for_another_class_than_the_pod_is_refused() -> None:
    with pytest.raises(PublishRefused, match="asks for class 'forbidden'"):
        check_pod(request(class_name="forbidden"), webhook_pod(OPTED_IN), SPC, node_id=NODE)


classes = st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9]", fullmatch=True)
policies = st.sampled_from(sorted(c.POLICIES))
roots = st.sampled_from(["/dynamic", "/mnt/x", "/a/b/"])


@given(classes, st.one_of(st.none(), policies), roots)
def test_the_guard_accepts_whatever_the_webhook_injects(
    class_name: str, policy: str | None, root: str
) -> None:
    """The webhook and the guard agree: every pod the webhook makes is published."""
    annotations = {
        c.ANNOTATION_STORAGE_PROVIDER_CLASS: class_name,
        c.ANNOTATION_MOUNT_PATH_ROOT: root,
    }
    if policy is not None:
        annotations[c.ANNOTATION_DISPATCH_POLICY] = policy
    pod = webhook_pod(annotations)
    volume = pod["spec"]["volumes"][0]["csi"]
    req = request(
        class_name=volume["volumeAttributes"][c.VOLUME_ATTR_CLASS],
        policy=volume["volumeAttributes"][c.VOLUME_ATTR_POLICY],
    )
    check_pod(req, pod, {"spec": {}}, node_id=NODE)
    # ... and a request that names another class for that pod is not.
    with pytest.raises(PublishRefused):
        check_pod(request(class_name=class_name + "x"), pod, {"spec": {}}, node_id=NODE)


async def test_directory_lookup_feeds_the_guard(tmp_path: Path) -> None:
    pods = tmp_path / "pods" / "tenant"
    pods.mkdir(parents=True)
    (tmp_path / c.PLURAL_CLASS).mkdir()
    guard = PodGuard(DirectoryLookup(tmp_path), NODE)
    with pytest.raises(PublishRefused, match="does not exist"):
        await guard.check(request())
    (pods / "app.json").write_text(json.dumps(webhook_pod(OPTED_IN)))
    with pytest.raises(PublishRefused, match="StorageProviderClass"):
        await guard.check(request())
    (tmp_path / c.PLURAL_CLASS / "s3-sample.json").write_text(json.dumps(SPC))
    await guard.check(request())
    (tmp_path / c.PLURAL_CLASS / "s3-sample.json").write_text("{not json")
    with pytest.raises(GuardUnavailable, match="not JSON") as caught:
        await guard.check(request())
    assert status_of(caught.value).name == "UNAVAILABLE"
