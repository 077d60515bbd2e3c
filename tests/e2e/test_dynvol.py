"""dynvol end to end on a real node: kubelet publishes, containerd runs, MinIO serves.

Every case reads and writes real data through the mount from inside a running container
(``kubectl exec``), and checks the bucket from outside. The fixtures (tests/e2e/conftest.py)
deploy dynvol with the local overlay and, after each test, wait until the node has no
slot, mount or Dynamic Mount Pod left for it.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.e2e.conftest import SYSTEM_NAMESPACE, host_mounts_under, wait_for

if TYPE_CHECKING:
    from tests.e2e.conftest import Storage

pytestmark = pytest.mark.e2e

KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "Pod")


def _body(tag: str) -> str:
    return f"{tag} {uuid.uuid4().hex}\n"


def _single_pod(storage: Storage, name: str = "app") -> str:
    storage.cluster.apply(storage.workload("Pod", name, {"app": name}))
    (pod,) = storage.wait_ready(f"app={name}", 1)
    return pod


def _mounted(storage: Storage, claim: str, pod: str, key: str = "hello.txt") -> str:
    """Put an object, claim it into ``pod`` at /data and wait until the pod reads it."""
    body = _body(claim)
    storage.put(key, body)
    storage.claim(claim, mountpoint="/data", selector={"app": pod})
    storage.wait_content(pod, f"/dynamic/data/{key}", body)
    return body


def _dvm(storage: Storage, claim: str) -> dict:  # type: ignore[type-arg]
    (dvm,) = [d for d in storage.dvms() if d["spec"]["claimName"] == claim]
    return dvm


def _dmp(storage: Storage, name: str) -> dict | None:  # type: ignore[type-arg]
    found = storage.cluster.kubectl(
        "-n", SYSTEM_NAMESPACE, "get", "pod", name, "--ignore-not-found", "-o", "json"
    ).stdout.strip()  # fmt: skip
    return json.loads(found) if found else None


def test_every_workload_kind_gets_the_storage_while_running(storage: Storage) -> None:
    labels = {"e2e-target": "kinds"}
    storage.cluster.apply(*(storage.workload(kind, kind.lower(), labels) for kind in KINDS))
    pods = storage.wait_ready("e2e-target=kinds", len(KINDS))
    kind_of = {
        p["metadata"]["name"]: p["metadata"]["labels"]["e2e-workload"]
        for p in storage.pods("e2e-target=kinds")
    }
    uids = {p["metadata"]["name"]: p["metadata"]["uid"] for p in storage.pods("e2e-target=kinds")}
    for pod in pods:
        assert storage.sh(pod, "ls -A /dynamic").strip() == "", "the root starts empty"

    body = _body("kinds")
    storage.put("hello.txt", body)
    began = storage.claim("kinds", mountpoint="/data", selector=labels)
    seen = {pod: storage.wait_content(pod, "/dynamic/data/hello.txt", body) for pod in pods}
    print(f"claim -> data in {len(pods)} pods: {max(seen.values()) - began:.2f}s")
    for pod in pods:
        storage.sh(pod, f"echo from {kind_of[pod]} > /dynamic/data/{kind_of[pod]}.txt")
    for kind in KINDS:
        assert storage.get(f"{kind.lower()}.txt") == f"from {kind.lower()}\n", kind
    wait_for(
        lambda: storage.claim_status("kinds").get("mountedPods") == len(KINDS),
        60,
        "the claim counts every pod as mounted",
    )

    storage.cluster.kubectl("-n", storage.namespace, "delete", "dynamicvolumeclaim", "kinds")
    for pod in pods:
        storage.wait_gone(pod, "/dynamic/data")
    after = storage.pods("e2e-target=kinds")
    assert {p["metadata"]["name"]: p["metadata"]["uid"] for p in after} == uids
    assert all(c["restartCount"] == 0 for p in after for c in p["status"]["containerStatuses"]), (
        "no pod was restarted"
    )
    assert storage.get("deployment.txt") == "from deployment\n", "unmounting keeps the data"


def test_read_only_claim_reads_but_cannot_write(storage: Storage) -> None:
    pod = _single_pod(storage)
    body = _body("ro")
    storage.put("hello.txt", body)
    storage.claim("ro", mountpoint="/data", selector={"app": pod}, read_only=True)
    storage.wait_content(pod, "/dynamic/data/hello.txt", body)
    denied = storage.exec(pod, "echo nope > /dynamic/data/new.txt")
    assert denied.returncode != 0
    assert "Read-only file system" in denied.stderr
    assert storage.exec(pod, "rm /dynamic/data/hello.txt").returncode != 0
    assert " ro," in storage.sh(pod, "grep ' /dynamic/data ' /proc/self/mounts")
    assert storage.get("new.txt") is None
    assert storage.get("hello.txt") == body


@pytest.mark.parametrize("storage", ["shared"], indirect=True)
def test_two_claims_on_one_pod_and_a_conflicting_third(storage: Storage) -> None:
    pod = _single_pod(storage)
    other = storage.minio.make_bucket("e2e")
    first, second = _body("a"), _body("b")
    storage.put("a.txt", first)
    storage.put("b.txt", second, bucket=other)
    storage.claim("claim-a", mountpoint="/a", selector={"app": pod})
    storage.claim("claim-b", mountpoint="/b", selector={"app": pod}, bucket=other)
    storage.wait_content(pod, "/dynamic/a/a.txt", first)
    storage.wait_content(pod, "/dynamic/b/b.txt", second)
    storage.sh(pod, "echo to-a > /dynamic/a/w.txt && echo to-b > /dynamic/b/w.txt")
    assert storage.get("w.txt") == "to-a\n"
    assert storage.get("w.txt", bucket=other) == "to-b\n"
    # Shared policy: one DMP serves both mounts.
    assert {d["spec"]["dmpName"] for d in storage.dvms()} == {storage.dmps()[0]["metadata"]["name"]}

    # Nested inside /a and selecting the same pod: the validating webhook refuses it.
    refused = storage.cluster.kubectl(
        "apply", "-f", "-", check=False, input=json.dumps(_claim_object(storage, "refused"))
    )
    assert refused.returncode != 0
    assert "overlaps the mountpoint '/a' of claim 'claim-a'" in refused.stderr
    # Admitted while it selects nothing, then the pod is relabelled into it: the conflict
    # is found at run time, reported on the claim, and nothing is mounted for it.
    storage.claim("claim-c", mountpoint="/a/nested", selector={"e2e-extra": "yes"})
    storage.cluster.kubectl("-n", storage.namespace, "label", "pod", pod, "e2e-extra=yes")

    def conflict() -> dict | None:  # type: ignore[type-arg]
        conditions = {c["type"]: c for c in storage.claim_status("claim-c").get("conditions", [])}
        ready = conditions.get("Ready")
        return ready if ready and ready["reason"] == "MountpointConflict" else None

    ready = wait_for(conflict, 60, "claim-c reports MountpointConflict")
    assert ready["status"] == "False"
    assert "claim-a" in ready["message"]
    events = storage.cluster.items(
        "events", "-n", storage.namespace, "--field-selector", "involvedObject.name=claim-c"
    )
    assert any(e["reason"] == "MountpointConflict" and e["type"] == "Warning" for e in events)
    assert not [d for d in storage.dvms() if d["spec"]["claimName"] == "claim-c"]
    assert storage.sh(pod, "cat /dynamic/a/a.txt /dynamic/b/b.txt") == first + second
    assert storage.exec(pod, "test -e /dynamic/a/nested").returncode != 0


def _claim_object(storage: Storage, name: str) -> dict:  # type: ignore[type-arg]
    return {
        "apiVersion": "dynamicvolume.csi.cloudnative101.net/v1alpha1",
        "kind": "DynamicVolumeClaim",
        "metadata": {"name": name, "namespace": storage.namespace},
        "spec": {
            "mountpoint": "/a/nested",
            "s3Config": {"bucket": storage.bucket, "endpoint": storage.minio.endpoint},
            "selector": {"matchLabels": {"app": "app"}},
            "storageProvider": "s3",
        },
    }


def test_deleted_dmp_is_recreated_and_the_mount_restored(storage: Storage) -> None:
    pod = _single_pod(storage)
    body = _mounted(storage, "dmp", pod)
    storage.sh(pod, "echo before > /dynamic/data/before.txt")
    name = _dvm(storage, "dmp")["spec"]["dmpName"]
    old = _dmp(storage, name)
    assert old is not None
    began = time.monotonic()
    storage.cluster.kubectl("-n", SYSTEM_NAMESPACE, "delete", "pod", name, "--wait=false")

    def replaced() -> bool:
        new = _dmp(storage, name)
        return new is not None and new["metadata"]["uid"] != old["metadata"]["uid"]

    wait_for(replaced, 120, f"DMP {name} is recreated")
    storage.wait_content(pod, "/dynamic/data/hello.txt", body)
    print(f"deleted DMP -> mount restored: {time.monotonic() - began:.2f}s")
    assert storage.sh(pod, "cat /dynamic/data/before.txt") == "before\n"
    storage.sh(pod, "echo after > /dynamic/data/after.txt")
    assert storage.get("after.txt") == "after\n"
    assert storage.pods(f"app={pod}")[0]["status"]["containerStatuses"][0]["restartCount"] == 0


def test_killed_fuse_daemon_is_repaired(storage: Storage) -> None:
    pod = _single_pod(storage)
    body = _mounted(storage, "fuse", pod)
    name = _dvm(storage, "fuse")["spec"]["dmpName"]
    before = storage.cluster.kubectl(
        "-n", SYSTEM_NAMESPACE, "exec", name, "--", "pgrep", "-x", "s3fs"
    ).stdout.split()  # fmt: skip
    assert len(before) == 1
    began = time.monotonic()
    storage.cluster.kubectl("-n", SYSTEM_NAMESPACE, "exec", name, "--", "kill", "-9", before[0])
    storage.wait_content(pod, "/dynamic/data/hello.txt", body)
    wait_for(
        lambda: (_dvm(storage, "fuse").get("status") or {}).get("repairCount", 0) >= 1,
        60,
        "the mount's repairCount counts the repair",
    )
    print(f"killed s3fs -> mount repaired: {time.monotonic() - began:.2f}s")
    after = storage.cluster.kubectl(
        "-n", SYSTEM_NAMESPACE, "exec", name, "--", "pgrep", "-x", "s3fs"
    ).stdout.split()  # fmt: skip
    assert len(after) == 1
    assert after != before, "a new s3fs serves the mount"
    storage.sh(pod, "echo repaired > /dynamic/data/repaired.txt")
    assert storage.get("repaired.txt") == "repaired\n"
    assert _dmp(storage, name)["status"]["containerStatuses"][0]["restartCount"] == 0  # type: ignore[index]


def test_an_edited_source_secret_reaches_the_mount(storage: Storage) -> None:
    """The whole rotation chain: the class's Secret is edited; the node plugin copies it
    for the DMP, kubelet updates the DMP's Secret volume (within its sync period), and
    the agent mounts again with the new keys. A revoked key must fail the mount; the
    right one must bring it back, with the user pod never restarted."""
    pod = _single_pod(storage)
    body = _mounted(storage, "rotate", pod)
    began = time.monotonic()
    storage.set_secret_key("revoked-secret-key")

    def ready() -> dict:  # type: ignore[type-arg]
        conditions = (_dvm(storage, "rotate").get("status") or {}).get("conditions", [])
        return {c["type"]: c for c in conditions}.get("Ready", {})

    wait_for(lambda: ready().get("reason") == "AccessDenied", 240, "the revoked key fails")
    print(f"revoked key in the source Secret -> mount Failed: {time.monotonic() - began:.2f}s")
    assert storage.exec(pod, "cat /dynamic/data/hello.txt").returncode != 0

    began = time.monotonic()
    storage.set_secret_key(storage.minio.secret_key)
    storage.wait_content(pod, "/dynamic/data/hello.txt", body, timeout=240)
    print(f"right key back in the source Secret -> readable: {time.monotonic() - began:.2f}s")
    wait_for(lambda: ready().get("status") == "True", 60, "the mount is Ready again")
    assert storage.pods(f"app={pod}")[0]["status"]["containerStatuses"][0]["restartCount"] == 0


def test_restarted_user_container_still_has_the_mount(storage: Storage) -> None:
    pod = _single_pod(storage)
    body = _mounted(storage, "restart", pod)
    storage.exec(pod, "kill 1")

    def restarted() -> bool:
        (p,) = storage.pods(f"app={pod}")
        status = p["status"]["containerStatuses"][0]
        return status["restartCount"] == 1 and status.get("ready", False)

    wait_for(restarted, 90, f"{pod}'s container is restarted and ready")
    storage.wait_content(pod, "/dynamic/data/hello.txt", body, timeout=30)
    storage.sh(pod, "echo again > /dynamic/data/again.txt")
    assert storage.get("again.txt") == "again\n"


def test_restarting_the_node_plugin_leaves_mounts_alone(storage: Storage) -> None:
    pod = _single_pod(storage)
    body = _mounted(storage, "plugin", pod)
    dmp = _dmp(storage, _dvm(storage, "plugin")["spec"]["dmpName"])
    assert dmp is not None
    (node_pod,) = storage.cluster.items(
        "pods", "-n", SYSTEM_NAMESPACE, "-l", "app.kubernetes.io/component=node"
    )
    storage.cluster.kubectl(
        "-n", SYSTEM_NAMESPACE, "delete", "pod", node_pod["metadata"]["name"], "--wait=false"
    )  # fmt: skip
    reads = failures = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        reads += 1
        if storage.exec(pod, "cat /dynamic/data/hello.txt").stdout != body:
            failures += 1
        pods = storage.cluster.items(
            "pods", "-n", SYSTEM_NAMESPACE, "-l", "app.kubernetes.io/component=node"
        )
        new = [p for p in pods if p["metadata"]["uid"] != node_pod["metadata"]["uid"]]
        statuses = new[0].get("status", {}).get("containerStatuses", []) if new else []
        if statuses and all(c.get("ready") for c in statuses):
            break
    else:
        raise AssertionError("the node plugin did not come back within 120 s")
    assert failures == 0, f"{failures} of {reads} reads failed while the node plugin restarted"
    # Give the new plugin a few reconcile passes: it must adopt, not redo, what exists.
    time.sleep(5)
    assert storage.sh(pod, "cat /dynamic/data/hello.txt") == body
    storage.sh(pod, "echo still > /dynamic/data/still.txt")
    assert storage.get("still.txt") == "still\n"
    same = _dmp(storage, dmp["metadata"]["name"])
    assert same is not None
    assert same["metadata"]["uid"] == dmp["metadata"]["uid"], "the DMP was not replaced"
    assert (_dvm(storage, "plugin").get("status") or {}).get("repairCount", 0) == 0
    # The restarted plugin still serves new claims.
    late = _body("late")
    storage.put("late/late.txt", late)
    storage.claim("late", mountpoint="/late", selector={"app": pod})
    storage.wait_content(pod, "/dynamic/late/late/late.txt", late)


def test_deleted_user_pod_leaves_no_slot_mount_or_dmp(storage: Storage) -> None:
    pod = _single_pod(storage)
    _mounted(storage, "gone", pod)
    dvm = _dvm(storage, "gone")
    slot = Path(dvm["spec"]["slotPath"])
    uid = dvm["spec"]["podUID"]
    dmp = dvm["spec"]["dmpName"]
    assert slot.is_dir()
    assert host_mounts_under(slot), "the claim's mount is below the slot on the host"
    storage.cluster.kubectl(
        "-n", storage.namespace, "delete", "pod", pod, "--wait=true", "--timeout=90s", timeout=100
    )  # fmt: skip
    wait_for(lambda: _dmp(storage, dmp) is None, 90, f"DMP {dmp} is gone")
    wait_for(lambda: not storage.dvms(), 60, "the DynamicVolumeMount is gone")
    wait_for(lambda: not host_mounts_under(slot), 60, f"nothing is mounted under {slot}")
    wait_for(lambda: not slot.exists(), 60, f"the slot {slot} is removed")
    wait_for(
        lambda: not Path(f"/var/lib/kubelet/pods/{uid}").exists(),
        60,
        "kubelet removed the pod's directory",
    )
    assert storage.get("hello.txt") is not None, "the data stays in the bucket"
