"""A tenant with namespace ``edit`` rights attacks dynvol on the real node (issue 9).

Every request here is made as a ServiceAccount of the test namespace bound to the built-in
``edit`` ClusterRole (``kubectl --as``), the rights a platform team gives a tenant. Each
attack must be refused with a message that says what was wrong, and must change nothing
that already works: a claim mounted before the attacks is still readable and writable in
its pod after them, and the node's mount table shows no mount outside dynvol's slots.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.conftest import API_VERSION, GROUP, SYSTEM_NAMESPACE, WORKLOAD_IMAGE, wait_for

if TYPE_CHECKING:
    from tests.e2e.conftest import Storage

pytestmark = pytest.mark.e2e

DRIVER = GROUP
TENANT_SA = "tenant"


class Tenant:
    """kubectl as ``system:serviceaccount:<ns>:tenant``, bound to ``edit`` in ``ns``."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.namespace = storage.namespace
        self.user = f"system:serviceaccount:{self.namespace}:{TENANT_SA}"

    def setup(self) -> None:
        self.storage.cluster.apply(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": TENANT_SA, "namespace": self.namespace},
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "tenant-edit", "namespace": self.namespace},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "edit",
                },
                "subjects": [
                    {"kind": "ServiceAccount", "name": TENANT_SA, "namespace": self.namespace}
                ],
            },
        )

    def kubectl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        groups = ("system:serviceaccounts", f"system:serviceaccounts:{self.namespace}",
                  "system:authenticated")  # fmt: skip
        impersonate = [f"--as={self.user}", *(f"--as-group={g}" for g in groups)]
        return self.storage.cluster.kubectl(*impersonate, *args, check=False, input=input)

    def create(self, obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        obj.setdefault("metadata", {}).setdefault("namespace", self.namespace)
        return self.kubectl("create", "-f", "-", input=json.dumps(obj))

    def can_i(self, verb: str, resource: str, namespace: str) -> bool:
        out = self.kubectl("auth", "can-i", verb, resource, "-n", namespace).stdout.strip()
        return out == "yes"


@pytest.fixture
def tenant(storage: Storage) -> Tenant:
    """Deleted with the test's namespace by the ``storage`` fixture."""
    t = Tenant(storage)
    t.setup()
    return t


def _pod(name: str, *, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {"app": name}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": WORKLOAD_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["sleep", "3600"],
                    **spec.pop("container", {}),
                }
            ],
            **spec,
        },
    }


def _hand_written_volume(read_only: bool = False) -> dict[str, Any]:
    return {
        "volumes": [
            {
                "name": "dynamic-volume-root-path",
                "csi": {
                    "driver": DRIVER,
                    "readOnly": read_only,
                    "volumeAttributes": {
                        "mountPodDispatchPolicy": "independent",
                        "storageProviderClass": "anything",
                    },
                },
            }
        ],
        "container": {"volumeMounts": [{"name": "dynamic-volume-root-path", "mountPath": "/dyn"}]},
    }


def _mounted_pod(storage: Storage, name: str = "victim") -> tuple[str, str]:
    """A pod with a working claim: the baseline every attack must leave alone."""
    storage.cluster.apply(storage.workload("Pod", name, {"app": name}))
    (pod,) = storage.wait_ready(f"app={name}", 1)
    body = f"baseline {uuid.uuid4().hex}\n"
    storage.put("baseline.txt", body)
    storage.claim("baseline", mountpoint="/data", selector={"app": name})
    storage.wait_content(pod, "/dynamic/data/baseline.txt", body)
    return pod, body


def _still_works(storage: Storage, pod: str, body: str) -> None:
    assert storage.sh(pod, "cat /dynamic/data/baseline.txt") == body
    token = uuid.uuid4().hex
    storage.sh(pod, f"echo {token} > /dynamic/data/after-attack.txt")
    assert storage.get("after-attack.txt") == f"{token}\n"


def _fuse_mounts_outside_slots() -> list[str]:
    """FUSE mounts on the host that are neither in a slot nor a kubelet volume path."""
    allowed = ("/var/lib/dynamic/xvols/", "/var/lib/kubelet/pods/")
    bad = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype = right.split()[0]
        point = left.split()[4]
        if fstype.startswith("fuse") and not point.startswith(allowed):
            bad.append(f"{point} ({fstype})")
    return bad


def _claim(storage: Storage, name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "mountpoint": "/x",
        "s3Config": {"bucket": storage.bucket, "endpoint": storage.minio.endpoint},
        "selector": {"matchLabels": {"app": "victim"}},
        "storageProvider": "s3",
    }
    body.update(spec)
    return {
        "apiVersion": API_VERSION,
        "kind": "DynamicVolumeClaim",
        "metadata": {"name": name},
        "spec": body,
    }


def test_a_hand_written_dynvol_volume_is_refused(storage: Storage, tenant: Tenant) -> None:
    pod, body = _mounted_pod(storage)
    refused = tenant.create(_pod("sneaky", **_hand_written_volume(read_only=False)))
    assert refused.returncode != 0
    assert "dynamic-volume-root-path" in refused.stderr or DRIVER in refused.stderr
    assert "storage-provider-class" in refused.stderr, "the message says how to opt in"
    # By driver under another name, and read-only: still refused without the opt-in.
    other = _hand_written_volume(read_only=True)
    other["volumes"][0]["name"] = "innocent"
    other["container"]["volumeMounts"][0]["name"] = "innocent"
    refused = tenant.create(_pod("sneaky2", **other))
    assert refused.returncode != 0
    assert DRIVER in refused.stderr or "innocent" in refused.stderr
    # Opting out of injection does not opt out of the check.
    opted_out = _pod("sneaky3", **_hand_written_volume())
    opted_out["metadata"]["annotations"] = {f"{GROUP}/inject": "false"}
    assert tenant.create(opted_out).returncode != 0
    assert not storage.pods("app in (sneaky,sneaky2,sneaky3)")
    _still_works(storage, pod, body)


def test_a_pod_cannot_pose_as_a_dynamic_mount_pod(storage: Storage, tenant: Tenant) -> None:
    labels = {"app.kubernetes.io/component": "dynamic-mount-pod", "app": "fake-dmp"}
    refused = tenant.create(_pod("fake-dmp", labels=labels))
    assert refused.returncode != 0
    assert "dynamic-mount-pod" in refused.stderr or "Dynamic Mount Pod" in refused.stderr
    # Nor can it run in the system namespace at all.
    assert not tenant.can_i("create", "pods", SYSTEM_NAMESPACE)


def test_the_pod_root_is_read_only_so_no_symlink_can_be_planted(
    storage: Storage, tenant: Tenant
) -> None:
    pod, body = _mounted_pod(storage)
    planted = storage.exec(pod, "ln -s /etc /dynamic/evil")
    assert planted.returncode != 0
    assert "Read-only file system" in planted.stderr
    assert storage.exec(pod, "mkdir /dynamic/newdir").returncode != 0
    # The claim's own mount below the read-only root is writable (the mounter decides).
    _still_works(storage, pod, body)
    # A claim aimed at where the symlink would have been mounts a real directory inside
    # the slot, never through a link.
    storage.claim("evil", mountpoint="/evil", selector={"app": "victim"})
    storage.wait_content(pod, "/dynamic/evil/baseline.txt", body)
    assert not _fuse_mounts_outside_slots()
    for dmp in storage.dmps():
        mounts = storage.cluster.kubectl(
            "-n", SYSTEM_NAMESPACE, "exec", dmp["metadata"]["name"], "--", "cat",
            "/proc/self/mounts",
        ).stdout  # fmt: skip
        fuse = [ln.split()[1] for ln in mounts.splitlines() if ln.split()[2].startswith("fuse")]
        assert fuse, f"the DMP {dmp['metadata']['name']} has a FUSE mount"
        assert all(p.startswith("/xvols/") for p in fuse), fuse


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"s3Config": {"bucket": "b", "endpoint": "http://127.0.0.1:9/x,use_cache=/tmp"}},
         "endpoint"),
        ({"s3Config": {"bucket": "b,allow_other", "endpoint": "http://127.0.0.1:9"}}, "bucket"),
        ({"s3Config": {"bucket": "b", "endpoint": "http://2130706433:9"}}, "endpoint"),
        ({"mountpoint": "/../etc"}, "mountpoint"),
    ],
    ids=["comma-in-endpoint", "comma-in-bucket", "decimal-ip", "dotdot"],
)  # fmt: skip
def test_hostile_claims_are_refused_by_the_api_with_the_field_named(
    storage: Storage, tenant: Tenant, spec: dict[str, Any], words: str
) -> None:
    pod, body = _mounted_pod(storage)
    refused = tenant.create(_claim(storage, "hostile", **spec))
    assert refused.returncode != 0, f"the apiserver accepted {spec}"
    assert words in refused.stderr, refused.stderr
    assert not [d for d in storage.dvms() if d["spec"]["claimName"] == "hostile"]
    _still_works(storage, pod, body)
    assert not _fuse_mounts_outside_slots()


METADATA_ENDPOINTS = ["http://169.254.169.254/latest", "http://metadata.google.internal"]


@pytest.mark.parametrize("endpoint", METADATA_ENDPOINTS, ids=["link-local", "metadata-name"])
def test_a_claim_pinning_the_class_cannot_send_its_credentials_to_metadata(
    storage: Storage, tenant: Tenant, endpoint: str
) -> None:
    """With the class named in the claim, the webhook judges the class's connection
    policy at admission."""
    refused = tenant.create(
        _claim(
            storage,
            "metadata",
            s3Config={"bucket": storage.bucket, "endpoint": endpoint},
            storageProviderClass=storage.class_name,
        )
    )
    assert refused.returncode != 0, f"the apiserver accepted endpoint {endpoint}"
    assert "endpoint" in refused.stderr, refused.stderr


@pytest.mark.parametrize("endpoint", METADATA_ENDPOINTS, ids=["link-local", "metadata-name"])
def test_credentials_never_reach_a_metadata_endpoint_at_mount_time(
    storage: Storage, tenant: Tenant, endpoint: str
) -> None:
    """Without a pinned class the claim is admitted (its class comes from each pod); the
    mount pod judges it against the class and refuses before anything is started."""
    pod, body = _mounted_pod(storage)
    created = tenant.create(
        _claim(storage, "metadata", s3Config={"bucket": storage.bucket, "endpoint": endpoint})
    )
    assert created.returncode == 0, created.stderr

    def failed() -> dict[str, Any] | None:
        for dvm in storage.dvms():
            if dvm["spec"]["claimName"] != "metadata":
                continue
            status = dvm.get("status") or {}
            if status.get("phase") == "Failed":
                return status
        return None

    status = wait_for(failed, 120, "the mount is refused")
    assert "endpoint" in status.get("message", ""), status
    assert storage.exec(pod, "test -e /dynamic/x/baseline.txt").returncode != 0
    for dmp in storage.dmps():
        procs = storage.cluster.kubectl(
            "-n", SYSTEM_NAMESPACE, "exec", dmp["metadata"]["name"], "--", "ps", "-eo", "args",
        ).stdout  # fmt: skip
        assert endpoint not in procs, "no mounter was started for the endpoint"
    _still_works(storage, pod, body)


def test_a_tenant_cannot_write_dynvols_plumbing_or_read_other_secrets(
    storage: Storage, tenant: Tenant
) -> None:
    pod, body = _mounted_pod(storage)
    ns = storage.namespace
    assert tenant.can_i("create", f"dynamicvolumeclaims.{GROUP}", ns)
    assert tenant.can_i("list", f"storageproviderclasses.{GROUP}", ns)
    assert tenant.can_i("list", f"dynamicvolumemounts.{GROUP}", ns)
    for verb in ("create", "update", "patch", "delete"):
        assert not tenant.can_i(verb, f"dynamicvolumemounts.{GROUP}", ns), verb
        assert not tenant.can_i(verb, f"storageproviderclasses.{GROUP}", ns), verb
    assert not tenant.can_i("get", "secrets", SYSTEM_NAMESPACE)
    assert not tenant.can_i("get", "secrets", "default")
    # Editing the DVM that serves its own pod is refused too.
    (dvm,) = storage.dvms()
    patch = json.dumps({"spec": {"dmpTargetPath": "/xvols/../etc"}})
    edited = tenant.kubectl(
        "-n", ns, "patch", "dynamicvolumemount", dvm["metadata"]["name"], "--type=merge",
        "-p", patch,
    )  # fmt: skip
    assert edited.returncode != 0
    assert "forbidden" in edited.stderr.lower()
    # The copy of the credentials the DMP uses is out of the tenant's reach.
    listed = tenant.kubectl("-n", SYSTEM_NAMESPACE, "get", "secrets")
    assert listed.returncode != 0
    assert "forbidden" in listed.stderr.lower()
    _still_works(storage, pod, body)
