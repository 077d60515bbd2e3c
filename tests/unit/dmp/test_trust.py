"""The checks a mount pod makes before it acts on a DynamicVolumeMount, and where a mount
lands (pure parts; the agent's use of them runs in tests/integration/dmp)."""

from __future__ import annotations

import copy
import uuid
from pathlib import PurePosixPath
from typing import Any

import attrs
import pytest

from dynvol_core import constants as c
from dynvol_core.dispatch import DmpSpec, dmp_pod_manifest
from dynvol_core.errors import InvalidPath
from dynvol_core.models import DynamicVolumeMount, MountSpec, StorageProviderClass
from dynvol_core.mountinfo import landing_of, parse_mountinfo
from dynvol_dmp.trust import Identity, check_mount, target_names

NODE = "node-a"
CLASS = "s3-sample"
POD_UID = str(uuid.uuid4())
CLAIM_UID = str(uuid.uuid4())
SLOT_UUID = str(uuid.uuid4())


def dmp_pod(policy: str = c.POLICY_INDEPENDENT) -> dict[str, Any]:
    spec = DmpSpec(
        name="dmp-1", namespace=c.DEFAULT_SYSTEM_NAMESPACE, node_name=NODE, class_name=CLASS,
        policy=policy, image="registry.invalid/dynvol:1", host_path="/var/lib/dynamic/x",
        pod_namespace="tenant" if policy == c.POLICY_INDEPENDENT else "",
        pod_name="app" if policy == c.POLICY_INDEPENDENT else "",
        pod_uid=POD_UID if policy == c.POLICY_INDEPENDENT else "",
    )  # fmt: skip
    manifest = dmp_pod_manifest(spec)
    manifest["metadata"]["uid"] = str(uuid.uuid4())
    return manifest


def user_pod(
    *, uid: str = POD_UID, node: str = NODE, class_name: str = CLASS, policy: str = "independent"
) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "app", "namespace": "tenant", "uid": uid},
        "spec": {
            "nodeName": node, "containers": [{"name": "c", "image": "x"}],
            "volumes": [{"name": c.VOLUME_NAME, "csi": {
                "driver": c.DRIVER_NAME, "readOnly": True,
                "volumeAttributes": {c.VOLUME_ATTR_CLASS: class_name,
                                     c.VOLUME_ATTR_POLICY: policy}}}],
        },
    }  # fmt: skip


def claim(uid: str = CLAIM_UID, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "claim", "namespace": "tenant", "uid": uid}, "spec": spec}


def spc(**spec: Any) -> StorageProviderClass:
    return StorageProviderClass.from_object(
        {
            "apiVersion": c.API_VERSION, "kind": c.KIND_CLASS,
            "metadata": {"name": CLASS}, "spec": {"provider": "s3", **spec},
        }
    )  # fmt: skip


def dvm(policy: str = c.POLICY_INDEPENDENT, **changes: Any) -> DynamicVolumeMount:
    target = (
        "/xvols/data" if policy == c.POLICY_INDEPENDENT else f"/xvols/{SLOT_UUID}/{POD_UID}/data"
    )
    spec = MountSpec(
        claim_name="claim", claim_uid=CLAIM_UID, pod_name="app", pod_uid=POD_UID,
        node_name=NODE, dmp_name="dmp-1", provider="s3", storage_provider_class=CLASS,
        mountpoint="/data", slot_path=f"/var/lib/dynamic/xvols/{CLASS}/{SLOT_UUID}/{POD_UID}",
        dmp_target_path=target,
    )  # fmt: skip
    return DynamicVolumeMount(
        name="m", namespace=changes.pop("namespace", "tenant"), uid="u", generation=1,
        spec=attrs.evolve(spec, **changes),
    )  # fmt: skip


IDENTITY = Identity.from_pod(dmp_pod())
SHARED = Identity.from_pod(dmp_pod(c.POLICY_SHARED))


def test_identity_from_the_node_plugins_manifest() -> None:
    assert IDENTITY.node_name == NODE
    assert IDENTITY.policy == c.POLICY_INDEPENDENT
    assert (IDENTITY.pod_uid, IDENTITY.pod_namespace) == (POD_UID, "tenant")
    assert SHARED.policy == c.POLICY_SHARED
    assert SHARED.pod_uid == ""


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["spec"].pop("nodeName"), "spec.nodeName"),
        (lambda p: p["metadata"]["labels"].pop(c.LABEL_COMPONENT), c.LABEL_COMPONENT),
        (lambda p: p["metadata"]["labels"].update({c.LABEL_POLICY: "all"}), c.LABEL_POLICY),
        (lambda p: p["metadata"]["labels"].pop(c.LABEL_CLASS), c.LABEL_CLASS),
        (lambda p: p["metadata"]["labels"].pop(c.LABEL_POD_UID), c.LABEL_POD_UID),
    ],
)
def test_identity_refuses_a_pod_the_node_plugin_did_not_make(edit: Any, message: str) -> None:
    pod = copy.deepcopy(dmp_pod())
    edit(pod)
    with pytest.raises(ValueError, match=message):
        Identity.from_pod(pod)


def _ok(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"pod": user_pod(), "claim": claim(), "spc": spc()}
    values.update(overrides)
    return values


def test_a_mount_of_the_served_pod_passes() -> None:
    assert check_mount(IDENTITY, dvm(), **_ok()) is None
    shared = _ok(pod=user_pod(policy=c.POLICY_SHARED))
    assert check_mount(SHARED, dvm(c.POLICY_SHARED), **shared) is None


@pytest.mark.parametrize(
    ("mount", "objects", "message"),
    [
        (dvm(node_name="node-b"), _ok(), "spec.nodeName is 'node-b'"),
        (dvm(pod_uid=str(uuid.uuid4())), _ok(), "is not the pod this mount pod serves"),
        (dvm(namespace="other"), _ok(), "is not the pod this mount pod serves"),
        (dvm(storage_provider_class="other"), _ok(), "is not the class"),
        (dvm(), _ok(pod=None), "spec.podName: Pod tenant/app does not exist"),
        (dvm(), _ok(pod=user_pod(uid=str(uuid.uuid4()))), "is not the UID of Pod"),
        (dvm(), _ok(pod=user_pod(node="node-b")), "runs on node 'node-b'"),
        (dvm(), _ok(pod=user_pod(class_name="nfs")), "does not carry the dynvol volume"),
        (dvm(), _ok(pod=user_pod(policy="shared")), "dispatch policy 'shared'"),
        (dvm(), _ok(claim=None), "spec.claimName: DynamicVolumeClaim tenant/claim does not"),
        (dvm(), _ok(claim=claim(uid=str(uuid.uuid4()))), "spec.claimUID"),
        (dvm(), _ok(claim=claim(storageProviderClass="x")), "pins class 'x'"),
        (dvm(), _ok(spc=None), "StorageProviderClass 's3-sample' does not exist"),
        (dvm(), _ok(spc=spc(allowedNamespaces=["team-a"])), "does not allow namespace 'tenant'"),
        (dvm(provider="nfs"), _ok(), "spec.provider 'nfs' is not the provider"),
        (dvm(dmp_target_path="/xvols/etc"), _ok(), "does not end in spec.mountpoint"),
        (dvm(dmp_target_path="/xvols/data/../etc"), _ok(), "component '..'"),
        (dvm(dmp_target_path="/etc/data"), _ok(), "is not below"),
    ],
)
def test_anything_else_is_refused_with_the_field_named(
    mount: DynamicVolumeMount, objects: dict[str, Any], message: str
) -> None:
    problem = check_mount(IDENTITY, mount, **objects)
    assert problem is not None
    assert message in problem


def test_a_shared_mount_cannot_name_another_pods_slot() -> None:
    other = str(uuid.uuid4())
    objects = _ok(pod=user_pod(policy=c.POLICY_SHARED))
    for path, message in [
        (f"/xvols/{SLOT_UUID}/{other}/data", "in the slot of pod UID"),
        (f"/xvols/not-a-uuid/{POD_UID}/data", "invalid slot UUID"),
        ("/xvols/data", "names no slot"),
        (f"/xvols/{SLOT_UUID}/{POD_UID}", "does not end in spec.mountpoint"),
    ]:
        problem = check_mount(SHARED, dvm(c.POLICY_SHARED, dmp_target_path=path), **objects)
        assert problem is not None
        assert message in problem, (path, problem)


def test_target_names() -> None:
    assert target_names(IDENTITY, dvm()) == (("data",), 0)
    assert target_names(SHARED, dvm(c.POLICY_SHARED)) == ((SLOT_UUID, POD_UID, "data"), 2)
    with pytest.raises(InvalidPath):
        target_names(IDENTITY, dvm(dmp_target_path="/xvols/data/x"))


# ---- where a mount landed --------------------------------------------------------------

_BASE = """\
20 1 8:1 / / rw - ext4 /dev/sda1 rw
30 20 0:40 / /xvols rw shared:5 - ext4 /dev/sda1 rw
31 30 0:41 / /xvols/other rw shared:5 - fuse.s3fs s3fs rw
"""


def _table(*lines: str) -> tuple[Any, ...]:
    return parse_mountinfo(_BASE + "".join(f"{line}\n" for line in lines))


def test_a_mount_at_the_target_lands() -> None:
    before = _table()
    after = _table("40 30 0:50 / /xvols/data rw shared:5 - fuse.s3fs s3fs rw")
    landing = landing_of(before, after, target=PurePosixPath("/xvols/data"), fs_type="fuse.s3fs")
    assert landing.ok
    assert landing.at_target is not None
    assert landing.describe() == ""


def test_a_mount_elsewhere_is_a_stray() -> None:
    before = _table()
    after = _table("40 20 0:50 / /etc rw - fuse.s3fs s3fs rw")
    landing = landing_of(before, after, target="/xvols/data", fs_type="fuse.s3fs")
    assert not landing.ok
    assert [e.mount_point for e in landing.stray] == ["/etc"]
    assert "no new mount appeared at /xvols/data" in landing.describe()
    assert "/etc" in landing.describe()


def test_other_attempts_and_other_types_are_not_strays() -> None:
    before = _table()
    after = _table(
        "40 30 0:50 / /xvols/data rw - fuse.s3fs s3fs rw",
        "41 30 0:51 / /xvols/logs rw - fuse.s3fs s3fs rw",  # another attempt's
        "42 20 0:52 / /run/other rw - tmpfs tmpfs rw",  # not this mounter's type
    )
    landing = landing_of(
        before, after, target="/xvols/data", fs_type="fuse.s3fs", others=["/xvols/logs"]
    )
    assert landing.ok
    # With no type known (a failed attempt), every new mount but the others' counts.
    unknown = landing_of(before, after, target="/xvols/data", fs_type="", others=["/xvols/logs"])
    assert [e.mount_point for e in unknown.stray] == ["/run/other"]


def test_an_old_mount_is_not_new_even_with_a_reused_id() -> None:
    before = _table("40 30 0:50 / /xvols/data rw - fuse.s3fs s3fs rw")
    same = landing_of(before, before, target="/xvols/data", fs_type="fuse.s3fs")
    assert same.at_target is None
    # The ID came back for another mount (other device): that one is new.
    after = _table("40 30 0:60 / /xvols/data rw - fuse.s3fs s3fs rw")
    assert landing_of(before, after, target="/xvols/data", fs_type="fuse.s3fs").ok


def test_in_a_shared_class_directory_only_the_own_slot_counts() -> None:
    before = _table()
    after = _table(
        "40 30 0:50 / /xvols/u1/p1/data rw - fuse.s3fs s3fs rw",  # this attempt's
        "41 30 0:51 / /xvols/u2/p2/data rw - fuse.s3fs s3fs rw",  # another mount pod's
        "42 30 0:52 / /xvols/u1/p1/else rw - fuse.s3fs s3fs rw",  # stray in its own slot
        "43 20 0:53 / /etc rw - fuse.s3fs s3fs rw",  # stray outside
    )
    landing = landing_of(
        before, after, target="/xvols/u1/p1/data", fs_type="fuse.s3fs",
        shared_root="/xvols", own="/xvols/u1/p1",
    )  # fmt: skip
    assert sorted(e.mount_point for e in landing.stray) == ["/etc", "/xvols/u1/p1/else"]
