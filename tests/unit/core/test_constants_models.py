"""Constants fixed by the contract, and the models' named constructors and wire forms."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from dynvol_core import constants as c
from dynvol_core.errors import FieldError, InvalidObject
from dynvol_core.models import (
    Condition,
    ConditionStatus,
    ConnectionPolicy,
    DynamicVolumeClaim,
    DynamicVolumeMount,
    FrozenMap,
    InjectedVolume,
    MountPhase,
    MountSpec,
    MountStatus,
    ObjectRef,
    OwnerReference,
    PodInfo,
    StorageProviderClass,
    format_time,
    freeze_json,
    parse_time,
    set_condition,
    thaw_json,
)
from tests.cases.bad_objects import GOOD_OBJECTS

T0 = dt.datetime(2024, 10, 18, 8, 0, tzinfo=dt.UTC)


def test_contract_constants() -> None:
    group = "dynamicvolume.csi.cloudnative101.net"
    expected = {
        "GROUP": group,
        "VERSION": "v1alpha1",
        "API_VERSION": f"{group}/v1alpha1",
        "DRIVER_NAME": group,
        "ANNOTATION_STORAGE_PROVIDER_CLASS": f"{group}/storage-provider-class",
        "ANNOTATION_MOUNT_PATH_ROOT": f"{group}/volume-mount-path-root",
        "ANNOTATION_DISPATCH_POLICY": f"{group}/mount-pod-dispatch-policy",
        "PARAM_SECRET_NAME": f"{group}/storage-provider-secret-name",
        "PARAM_SECRET_NAMESPACE": f"{group}/storage-provider-secret-namespace",
        "PARAM_MOUNT_CPU_REQUEST": f"{group}/mount-cpu-request",
        "PARAM_MOUNT_MEMORY_REQUEST": f"{group}/mount-memory-request",
        "PARAM_MOUNT_CPU_LIMIT": f"{group}/mount-cpu-limit",
        "PARAM_MOUNT_MEMORY_LIMIT": f"{group}/mount-memory-limit",
        "VOLUME_NAME": "dynamic-volume-root-path",
        "VOLUME_ATTR_CLASS": "storageProviderClass",
        "VOLUME_ATTR_POLICY": "mountPodDispatchPolicy",
        "POLICY_INDEPENDENT": "independent",
        "POLICY_SHARED": "shared",
        "CSI_CTX_POD_UID": "csi.storage.k8s.io/pod.uid",
        "CSI_CTX_POD_NAME": "csi.storage.k8s.io/pod.name",
        "CSI_CTX_POD_NAMESPACE": "csi.storage.k8s.io/pod.namespace",
        "CSI_CTX_EPHEMERAL": "csi.storage.k8s.io/ephemeral",
        "DEFAULT_ROOT": "/var/lib/dynamic",
        "DEFAULT_SYSTEM_NAMESPACE": "dynvol-system",
        "PLURAL_CLASS": "storageproviderclasses",
        "PLURAL_CLAIM": "dynamicvolumeclaims",
        "PLURAL_MOUNT": "dynamicvolumemounts",
    }
    assert {name: getattr(c, name) for name in expected} == expected


def _seed(kind: str, name: str) -> dict[str, Any]:
    return next(o for o in GOOD_OBJECTS if o["kind"] == kind and o["metadata"]["name"] == name)


# ----------------------------------------------------------------------------- errors


def test_invalid_object_lists_every_error() -> None:
    exc = InvalidObject(
        [FieldError("spec.a", "bad"), FieldError("spec.b", "worse")], kind="X", name="n"
    )
    assert exc.paths == ("spec.a", "spec.b")
    assert str(exc) == 'X "n" is invalid: spec.a: bad; spec.b: worse'
    with pytest.raises(ValueError, match="at least one"):
        InvalidObject([])


# ----------------------------------------------------------------------------- class


def test_seed_class() -> None:
    spc = StorageProviderClass.from_object(_seed("StorageProviderClass", "s3-sample"))
    assert spc.name == "s3-sample"
    assert spc.provider == "s3"
    assert spc.secret_ref == ObjectRef(namespace="default", name="provider-s3-secret")
    assert spc.resources.to_object() == {
        "requests": {"cpu": "10m", "memory": "50Mi"},
        "limits": {"cpu": "10m", "memory": "50Mi"},
    }
    assert spc.allowed_namespaces is None
    assert spc.allows_namespace("anything")
    assert dict(spc.provider_parameters) == {}
    assert hash(spc) == hash(StorageProviderClass.from_object(_seed(c.KIND_CLASS, "s3-sample")))


def test_class_details() -> None:
    spc = StorageProviderClass.from_object(
        {
            "metadata": {
                "name": "nfs-a",
                "uid": "u1",
                "generation": 3,
                "finalizers": [c.FINALIZER_CLASS_IN_USE],
                "deletionTimestamp": "2024-10-18T08:00:00Z",
            },
            "spec": {
                "provider": "nfs",
                "parameters": {"mountOptions": "nolock", c.PARAM_MOUNT_MEMORY_LIMIT: "1Gi"},
                "allowedNamespaces": ["team-a"],
            },
        }
    )
    assert (spc.uid, spc.generation, spc.deleting) == ("u1", 3, True)
    assert spc.finalizers == (c.FINALIZER_CLASS_IN_USE,)
    assert spc.secret_ref is None
    assert spc.resources.to_object() == {"limits": {"memory": "1Gi"}}
    assert dict(spc.provider_parameters) == {"mountOptions": "nolock"}
    assert spc.allows_namespace("team-a")
    assert not spc.allows_namespace("team-b")


def test_class_collects_all_errors() -> None:
    with pytest.raises(InvalidObject) as info:
        StorageProviderClass.from_object(
            {
                "metadata": {"name": "x"},
                "spec": {
                    "provider": "S3",
                    "parameters": {c.PARAM_MOUNT_CPU_LIMIT: "x", c.PARAM_SECRET_NAMESPACE: "ns"},
                    "extra": 1,
                },
            }
        )
    assert set(info.value.paths) == {
        "spec.provider",
        f"spec.parameters[{c.PARAM_MOUNT_CPU_LIMIT}]",
        f"spec.parameters[{c.PARAM_SECRET_NAME}]",
        "spec.extra",
    }


def test_class_connection_defaults_to_public_hosts_only() -> None:
    spc = StorageProviderClass.from_object(_seed(c.KIND_CLASS, "s3-sample"))
    assert spc.connection == ConnectionPolicy()
    assert spc.connection.to_object() == {}
    assert spc.connection.check_host("s3.example.com", "endpoint") == []
    (error,) = spc.connection.check_host("127.0.0.1", "endpoint")
    assert error.path == "endpoint"
    assert "spec.connection.allowLoopback" in error.message


def test_class_connection_round_trip() -> None:
    connection = {
        "pinned": {"endpoint": "https://s3.eu.example.com", "region": "eu-west-1"},
        "allowedHosts": ["*.example.com", "10.0.0.0/8"],
        "allowLoopback": True,
        "allowClusterLocal": True,
        "allowPrivateNetworks": True,
        "allowLinkLocal": True,
    }
    spc = StorageProviderClass.from_object(
        {"metadata": {"name": "pinned"}, "spec": {"provider": "s3", "connection": connection}}
    )
    assert spc.connection.to_object() == connection
    assert dict(spc.connection.pinned) == connection["pinned"]
    assert spc.connection.allowed_hosts == ("*.example.com", "10.0.0.0/8")
    assert spc.connection == ConnectionPolicy(
        pinned=connection["pinned"],
        allowed_hosts=("*.example.com", "10.0.0.0/8"),
        allow_loopback=True,
        allow_cluster_local=True,
        allow_private_networks=True,
        allow_link_local=True,
    )
    hash(spc)


def test_class_connection_errors_name_the_field() -> None:
    with pytest.raises(InvalidObject) as info:
        StorageProviderClass.from_object(
            {
                "metadata": {"name": "x"},
                "spec": {
                    "provider": "s3",
                    "connection": {
                        "pinned": {"bad-key": "v", "endpoint": "a\nb", "region": 5},
                        "allowedHosts": ["a,b", "10.0.0.0/40", 7],
                        "allowLoopback": "yes",
                        "allowEverything": True,
                    },
                },
            }
        )
    assert set(info.value.paths) == {
        "spec.connection.pinned[bad-key]",
        "spec.connection.pinned[endpoint]",
        "spec.connection.pinned[region]",
        "spec.connection.allowedHosts[0]",
        "spec.connection.allowedHosts[1]",
        "spec.connection.allowedHosts[2]",
        "spec.connection.allowLoopback",
        "spec.connection.allowEverything",
    }


def test_connection_pin() -> None:
    policy = ConnectionPolicy(pinned={"region": "eu-west-1"})
    assert policy.pin("region", None, "region") == ("eu-west-1", [])
    assert policy.pin("region", "eu-west-1", "region") == ("eu-west-1", [])
    value, errors = policy.pin("region", "us-east-1", "region")
    assert value == "eu-west-1"
    assert [e.path for e in errors] == ["region"]
    assert policy.pin("endpoint", "https://x", "endpoint") == ("https://x", [])


def test_class_must_be_an_object() -> None:
    with pytest.raises(InvalidObject):
        StorageProviderClass.from_object([])
    with pytest.raises(InvalidObject, match="spec: required"):
        StorageProviderClass.from_object({"metadata": {"name": "x"}})


# ----------------------------------------------------------------------------- claim


def test_seed_claims() -> None:
    first = DynamicVolumeClaim.from_object(_seed("DynamicVolumeClaim", "externalvolume-s3-sample"))
    assert first.namespace == "dynamic-volume-test"
    assert first.storage_provider == "s3"
    assert first.mountpoint == "/data"
    assert first.read_only is False
    assert first.provider_config.kind == "s3Config"
    assert first.provider_config.to_object() == {
        "bucket": "ssat202410181",
        "endpoint": "https://play.min.io",
    }
    assert first.selector.selects({"app": "app-4-s3"})

    second = DynamicVolumeClaim.from_object(_seed("DynamicVolumeClaim", "dynamicvolume-s3-sample"))
    assert second.namespace == "default"  # as kubectl would place it
    assert second.storage_provider == "s3"  # implied by s3Config
    assert second.read_only is True


def _claim(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "c",
            "namespace": "ns",
            "uid": "11111111-1111-1111-1111-111111111111",
            "generation": 2,
            "creationTimestamp": "2024-10-18T08:00:00Z",
        },
        "spec": {"mountpoint": "//data/./in/", "selector": {"matchLabels": {"a": "b"}}, **spec},
    }


@pytest.mark.parametrize(
    ("spec", "provider", "kind"),
    [
        ({"nfsConfig": {"server": "10.0.0.1", "path": "/x", "version": "4.1"}}, "nfs", "nfsConfig"),
        ({"rcloneConfig": {"type": "sftp", "parameters": {"host": "h"}}}, "rclone", "rcloneConfig"),
        ({"storageProvider": "acme-fs", "config": {"volume": {"id": [1, 2]}}}, "acme-fs", "config"),
        (
            {"storageProvider": "s3", "s3Config": {"bucket": "b-1", "pathStyle": True}},
            "s3",
            "s3Config",
        ),
    ],
)
def test_claim_provider_blocks(spec: dict[str, Any], provider: str, kind: str) -> None:
    claim = DynamicVolumeClaim.from_object(_claim(**spec))
    assert claim.storage_provider == provider
    assert claim.provider_config.kind == kind
    assert claim.provider_config.to_object() == next(
        iter(v for v in spec.values() if isinstance(v, dict))
    )
    assert claim.mountpoint == "/data/in"
    assert claim.creation_timestamp == T0
    assert (claim.uid, claim.generation) == ("11111111-1111-1111-1111-111111111111", 2)
    hash(claim)  # free-form config is deeply frozen


def test_claim_pins_class() -> None:
    claim = DynamicVolumeClaim.from_object(
        _claim(storageProviderClass="s3-sample", s3Config={"bucket": "abc"})
    )
    assert claim.storage_provider_class == "s3-sample"


def test_claim_bad_timestamp() -> None:
    obj = _claim(s3Config={"bucket": "abc"})
    obj["metadata"]["creationTimestamp"] = "yesterday"
    with pytest.raises(InvalidObject, match=r"metadata\.creationTimestamp"):
        DynamicVolumeClaim.from_object(obj)


# ----------------------------------------------------------------------------- conditions


def test_condition_round_trip_and_validation() -> None:
    cond = Condition(
        type="Ready",
        status=ConditionStatus.TRUE,
        reason="Mounted",
        message="ok",
        last_transition_time=T0,
        observed_generation=2,
    )
    wire = cond.to_object()
    assert wire == {
        "type": "Ready",
        "status": "True",
        "reason": "Mounted",
        "message": "ok",
        "lastTransitionTime": "2024-10-18T08:00:00Z",
        "observedGeneration": 2,
    }
    assert Condition.from_object(wire) == cond
    with pytest.raises(InvalidObject, match="CamelCase"):
        Condition(
            type="Ready", status=ConditionStatus.TRUE, reason="not camel", last_transition_time=T0
        )
    with pytest.raises(InvalidObject) as info:
        Condition.from_object({"type": "Ready", "status": "Yes", "reason": "X"}, "c")
    assert set(info.value.paths) == {"c.status", "c.lastTransitionTime"}


def test_set_condition_keeps_transition_time_when_status_is_unchanged() -> None:
    old = Condition(
        type="Ready", status=ConditionStatus.FALSE, reason="Pending", last_transition_time=T0
    )
    later = T0 + dt.timedelta(minutes=5)
    same = Condition(
        type="Ready",
        status=ConditionStatus.FALSE,
        reason="StillPending",
        last_transition_time=later,
    )
    (kept,) = set_condition([old], same)
    assert kept.last_transition_time == T0
    assert kept.reason == "StillPending"
    flipped = Condition(
        type="Ready", status=ConditionStatus.TRUE, reason="Mounted", last_transition_time=later
    )
    (changed,) = set_condition([old], flipped)
    assert changed.last_transition_time == later
    other = Condition(
        type="Degraded", status=ConditionStatus.FALSE, reason="Fine", last_transition_time=later
    )
    assert [x.type for x in set_condition([old], other)] == ["Ready", "Degraded"]


# ----------------------------------------------------------------------------- mounts


def _mount() -> DynamicVolumeMount:
    return DynamicVolumeMount(
        name="c-0123456789abcdef",
        namespace="ns",
        labels={c.LABEL_CLAIM: "c"},
        owner_references=(OwnerReference(api_version="v1", kind="Pod", name="p", uid="pu"),),
        spec=MountSpec(
            claim_name="c",
            claim_uid="cu",
            pod_name="p",
            pod_uid="pu",
            node_name="n1",
            dmp_name="dmp-x",
            provider="s3",
            storage_provider_class="s3-sample",
            config={"bucket": "b-1", "nested": {"list": [1, 2]}},
            read_only=True,
            mountpoint="/data",
            slot_path="/var/lib/dynamic/xvols/s3-sample/u/p",
            dmp_target_path="/xvols/data",
        ),
        status=MountStatus(
            phase=MountPhase.MOUNTED,
            conditions=(
                Condition(
                    type="Mounted",
                    status=ConditionStatus.TRUE,
                    reason="Mounted",
                    last_transition_time=T0,
                ),
            ),
            observed_generation=1,
            mounted_at=T0,
            repair_count=2,
            message="fine",
        ),
    )


def test_mount_wire_round_trip() -> None:
    mount = _mount()
    wire = mount.to_object()
    assert wire["apiVersion"] == c.API_VERSION
    assert wire["kind"] == "DynamicVolumeMount"
    assert wire["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": "pu"}
    ]
    assert wire["spec"]["claimUID"] == "cu"
    assert wire["spec"]["dmpTargetPath"] == "/xvols/data"
    assert wire["spec"]["config"] == {"bucket": "b-1", "nested": {"list": [1, 2]}}
    assert wire["status"]["phase"] == "Mounted"
    assert wire["status"]["mountedAt"] == "2024-10-18T08:00:00Z"
    assert DynamicVolumeMount.from_object(wire) == mount


def test_mount_rejects_bad_spec() -> None:
    wire = _mount().to_object()
    wire["spec"]["mountpoint"] = "/../etc"
    del wire["spec"]["podUID"]
    wire["status"]["phase"] = "Happy"
    with pytest.raises(InvalidObject) as info:
        DynamicVolumeMount.from_object(wire)
    assert set(info.value.paths) == {"spec.mountpoint", "spec.podUID", "status.phase"}


# ----------------------------------------------------------------------------- pods


def _pod(volume_attrs: dict[str, str] | None = None, **meta: Any) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [{"name": "data", "emptyDir": {}}]
    if volume_attrs is not None:
        volumes.append(
            {
                "name": c.VOLUME_NAME,
                "csi": {
                    "driver": c.DRIVER_NAME,
                    "readOnly": True,
                    "volumeAttributes": volume_attrs,
                },
            }
        )
    return {
        "metadata": {
            "name": "p",
            "namespace": "ns",
            "uid": "pu",
            "labels": {"app": "x"},
            "annotations": {
                c.ANNOTATION_STORAGE_PROVIDER_CLASS: "s3-sample",
                c.ANNOTATION_MOUNT_PATH_ROOT: "/dynamic",
            },
            **meta,
        },
        "spec": {"nodeName": "n1", "volumes": volumes},
        "status": {"phase": "Running"},
    }


def test_pod_with_injected_volume() -> None:
    pod = PodInfo.from_object(
        _pod({c.VOLUME_ATTR_CLASS: "s3-sample", c.VOLUME_ATTR_POLICY: "shared"})
    )
    assert pod.volume == InjectedVolume(class_name="s3-sample", policy="shared")
    assert pod.opted_in
    assert pod.eligible
    assert pod.mount_path_root == "/dynamic"
    assert pod.storage_provider_class_annotation == "s3-sample"
    assert pod.labels == FrozenMap({"app": "x"})


def test_pod_policy_defaults_to_independent() -> None:
    pod = PodInfo.from_object(_pod({c.VOLUME_ATTR_CLASS: "s3-sample"}))
    assert pod.volume == InjectedVolume("s3-sample", c.POLICY_INDEPENDENT)


def test_pod_without_volume_or_terminating_is_not_eligible() -> None:
    assert not PodInfo.from_object(_pod()).eligible
    deleting = PodInfo.from_object(
        _pod({c.VOLUME_ATTR_CLASS: "a"}, deletionTimestamp="2024-10-18T08:00:00Z")
    )
    assert deleting.deleting
    assert not deleting.eligible
    done = _pod({c.VOLUME_ATTR_CLASS: "a"})
    done["status"]["phase"] = "Succeeded"
    assert not PodInfo.from_object(done).eligible
    unscheduled = _pod({c.VOLUME_ATTR_CLASS: "a"})
    del unscheduled["spec"]["nodeName"]
    assert not PodInfo.from_object(unscheduled).eligible


def test_pod_volume_of_another_driver_is_ignored() -> None:
    obj = _pod({c.VOLUME_ATTR_CLASS: "a"})
    obj["spec"]["volumes"][1]["csi"]["driver"] = "other.csi.example.com"
    assert PodInfo.from_object(obj).volume is None


@pytest.mark.parametrize(
    ("attrs", "field"),
    [
        ({c.VOLUME_ATTR_CLASS: "../../etc"}, c.VOLUME_ATTR_CLASS),
        ({}, c.VOLUME_ATTR_CLASS),
        ({c.VOLUME_ATTR_CLASS: "a", c.VOLUME_ATTR_POLICY: "greedy"}, c.VOLUME_ATTR_POLICY),
    ],
)
def test_pod_volume_attributes_are_validated(attrs: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidObject) as info:
        PodInfo.from_object(_pod(attrs))
    assert info.value.paths == (f"spec.volumes[1].csi.volumeAttributes.{field}",)


# ----------------------------------------------------------------------------- helpers


def test_freeze_thaw_and_time() -> None:
    value = {"a": [1, {"b": None}], "c": "d"}
    frozen = freeze_json(value)
    assert isinstance(frozen, FrozenMap)
    assert hash(frozen) == hash(freeze_json(value))
    assert thaw_json(frozen) == value
    assert parse_time("2024-10-18T10:00:00+02:00") == T0
    assert format_time(T0) == "2024-10-18T08:00:00Z"
    with pytest.raises(ValueError, match="time zone"):
        parse_time("2024-10-18T08:00:00")
