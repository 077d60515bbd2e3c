"""Validation of CSI Node requests (pure: no server, no mounts)."""

from __future__ import annotations

import uuid
from pathlib import PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynvol_core.errors import InvalidObject
from dynvol_csi._proto.csi import v1 as csi
from dynvol_csi.validation import PublishRequest, StatsRequest, UnpublishRequest

KUBELET = PurePosixPath("/var/lib/kubelet")
POD = "0f8c3ad2-5b1e-4c4e-9d0a-2f1b7c6e9a10"
TARGET = f"{KUBELET}/pods/{POD}/volumes/kubernetes.io~csi/dynamic-volume-root-path/mount"


def publish(**changes: object) -> csi.NodePublishVolumeRequest:
    context = {
        "csi.storage.k8s.io/pod.uid": POD,
        "csi.storage.k8s.io/pod.name": "web-0",
        "csi.storage.k8s.io/pod.namespace": "default",
        "csi.storage.k8s.io/ephemeral": "true",
        "storageProviderClass": "s3-sample",
        "mountPodDispatchPolicy": "independent",
    }
    context.update(changes.pop("context", {}))  # type: ignore[call-overload]
    for key in changes.pop("drop", ()):  # type: ignore[attr-defined]
        del context[key]
    fields: dict[str, object] = {
        "volume_id": "csi-0123abcd",
        "target_path": TARGET,
        "volume_capability": csi.VolumeCapability(mount=csi.VolumeCapabilityMountVolume()),
        "volume_context": context,
        "readonly": True,
    }
    fields.update(changes)
    return csi.NodePublishVolumeRequest(**fields)  # type: ignore[arg-type]


def wire(msg: csi.NodePublishVolumeRequest) -> csi.NodePublishVolumeRequest:
    # Round-trip through bytes: presence of message fields is what the server sees.
    return csi.NodePublishVolumeRequest().parse(bytes(msg))


def test_valid_request() -> None:
    request = PublishRequest.from_message(wire(publish()), kubelet_dir=KUBELET)
    assert request.volume_id == "csi-0123abcd"
    assert request.target_path == PurePosixPath(TARGET)
    assert request.pod_uid == POD
    assert (request.pod_name, request.pod_namespace) == ("web-0", "default")
    assert (request.class_name, request.policy) == ("s3-sample", "independent")
    assert request.read_only is True


def test_policy_defaults_to_independent() -> None:
    msg = wire(publish(drop=["mountPodDispatchPolicy"]))
    assert PublishRequest.from_message(msg, kubelet_dir=KUBELET).policy == "independent"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"volume_id": ""}, "volume_id"),
        ({"volume_id": "../x"}, "volume_id"),
        ({"volume_id": ".x"}, "volume_id"),
        ({"volume_id": "x" * 129}, "volume_id"),
        ({"target_path": ""}, "target_path"),
        ({"target_path": "relative/mount"}, "target_path"),
        ({"target_path": TARGET + "/../../../../../../etc"}, "target_path"),
        ({"target_path": TARGET + "/"}, "target_path"),
        ({"target_path": TARGET.replace("/pods/", "/pods//")}, "target_path"),
        ({"target_path": "/etc/mount"}, "target_path"),
        ({"target_path": str(KUBELET)}, "target_path"),
        ({"target_path": f"{KUBELET}/pods/{uuid.uuid4()}/volumes/x/mount"}, "target_path"),
        ({"target_path": f"{KUBELET}/plugins/x/mount"}, "target_path"),
        ({"target_path": TARGET + "\n"}, "target_path"),
        ({"volume_capability": None}, "volume_capability"),
        ({"volume_capability": csi.VolumeCapability(block=csi.VolumeCapabilityBlockVolume())},
         "volume_capability"),
        ({"context": {"csi.storage.k8s.io/ephemeral": "false"}}, "ephemeral"),
        ({"drop": ["csi.storage.k8s.io/ephemeral"]}, "ephemeral"),
        ({"drop": ["csi.storage.k8s.io/pod.uid"]}, "pod.uid"),
        ({"context": {"csi.storage.k8s.io/pod.uid": "../../etc"}}, "pod.uid"),
        ({"context": {"csi.storage.k8s.io/pod.uid": POD.upper()}}, "pod.uid"),
        ({"drop": ["csi.storage.k8s.io/pod.name"]}, "pod.name"),
        ({"context": {"csi.storage.k8s.io/pod.name": "a/b"}}, "pod.name"),
        ({"drop": ["csi.storage.k8s.io/pod.namespace"]}, "pod.namespace"),
        ({"context": {"csi.storage.k8s.io/pod.namespace": "a.b"}}, "pod.namespace"),
        ({"drop": ["storageProviderClass"]}, "storageProviderClass"),
        ({"context": {"storageProviderClass": "../.."}}, "storageProviderClass"),
        ({"context": {"storageProviderClass": "A"}}, "storageProviderClass"),
        ({"context": {"mountPodDispatchPolicy": "everyone"}}, "mountPodDispatchPolicy"),
    ],
)  # fmt: skip
def test_invalid_requests_name_the_field(changes: dict[str, object], field: str) -> None:
    msg = publish(**changes)
    if "volume_capability" in changes and changes["volume_capability"] is None:
        msg = csi.NodePublishVolumeRequest(
            volume_id=msg.volume_id, target_path=msg.target_path, volume_context=msg.volume_context
        )
    with pytest.raises(InvalidObject) as info:
        PublishRequest.from_message(wire(msg), kubelet_dir=KUBELET)
    assert any(field in path for path in info.value.paths), info.value


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(InvalidObject) as info:
        PublishRequest.from_message(csi.NodePublishVolumeRequest(), kubelet_dir=KUBELET)
    paths = info.value.paths
    assert "volume_id" in paths
    assert "target_path" in paths
    assert "volume_capability" in paths
    assert "volume_context[storageProviderClass]" in paths


@given(st.text(max_size=80))
def test_accepted_targets_stay_in_the_pods_volume_dir(suffix: str) -> None:
    msg = publish(target_path=f"{KUBELET}/pods/{POD}/volumes/{suffix}")
    try:
        request = PublishRequest.from_message(wire(msg), kubelet_dir=KUBELET)
    except InvalidObject:
        return
    base = KUBELET / "pods" / POD / "volumes"
    assert base in request.target_path.parents
    assert ".." not in request.target_path.parts
    assert str(request.target_path) == str(PurePosixPath(str(request.target_path)))


def test_unpublish_validation() -> None:
    ok = UnpublishRequest.from_message(
        csi.NodeUnpublishVolumeRequest(volume_id="csi-1", target_path=TARGET), kubelet_dir=KUBELET
    )
    assert ok.target_path == PurePosixPath(TARGET)
    for volume_id, target in [("", TARGET), ("csi-1", ""), ("csi-1", "/etc"), ("a/b", TARGET)]:
        with pytest.raises(InvalidObject):
            UnpublishRequest.from_message(
                csi.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target),
                kubelet_dir=KUBELET,
            )


def test_stats_validation() -> None:
    assert StatsRequest.from_message(
        csi.NodeGetVolumeStatsRequest(volume_id="v", volume_path="some/path")
    ) == StatsRequest("v", "some/path")
    with pytest.raises(InvalidObject):
        StatsRequest.from_message(csi.NodeGetVolumeStatsRequest(volume_path="p"))
    with pytest.raises(InvalidObject):
        StatsRequest.from_message(csi.NodeGetVolumeStatsRequest(volume_id="v"))
