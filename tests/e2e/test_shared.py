"""The ``shared`` dispatch policy for real: several pods on one node, one Dynamic Mount Pod.

Claims come and go while the others stay mounted and readable in every pod; a pod that
leaves takes only its own mounts with it; the shared DMP is deleted only after the idle
grace delay (``--shared-idle-grace=20`` in the local overlay), and not before.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.conftest import GROUP, SYSTEM_NAMESPACE, XVOLS, host_mounts_under, wait_for

if TYPE_CHECKING:
    from tests.e2e.conftest import Storage

pytestmark = pytest.mark.e2e

#: --shared-idle-grace of the local overlay (manifests/overlays/local/node.yaml).
IDLE_GRACE = 20.0
PODS = ("p1", "p2", "p3")


def _dmps(storage: Storage) -> list[dict[str, Any]]:
    return [d for d in storage.dmps() if not d["metadata"].get("deletionTimestamp")]


def _one_dmp(storage: Storage) -> str:
    dmps = wait_for(lambda: _dmps(storage), 60, "a shared DMP exists")
    assert len(dmps) == 1, [d["metadata"]["name"] for d in dmps]
    (dmp,) = dmps
    assert dmp["metadata"]["labels"][f"{GROUP}/dispatch-policy"] == "shared", dmp["metadata"]
    return str(dmp["metadata"]["uid"])


def _reads(storage: Storage, pod: str, mountpoint: str, body: str) -> None:
    storage.wait_content(pod, f"/dynamic{mountpoint}/hello.txt", body, timeout=60)


def _pod_mounts(storage: Storage, pod: str) -> list[str]:
    out = storage.sh(pod, "awk '{print $2}' /proc/self/mounts")
    return sorted(p for p in out.split() if p.startswith("/dynamic/"))


def _fuse_daemons(storage: Storage, dmp: str) -> int:
    script = "cat /proc/[0-9]*/comm 2>/dev/null"
    result = storage.cluster.kubectl(
        "-n", SYSTEM_NAMESPACE, "exec", dmp, "--", "sh", "-c", script, check=False, timeout=30
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return sum(1 for name in result.stdout.split() if name in ("s3fs", "rclone"))


@pytest.mark.parametrize("storage", ["shared"], indirect=True)
def test_pods_share_one_dmp_while_claims_and_pods_come_and_go(storage: Storage) -> None:
    storage.cluster.apply(
        *(storage.workload("Pod", name, {"app": "shared", "who": name}) for name in PODS)
    )
    pods = storage.wait_ready("app=shared", len(PODS))
    by_label = {
        p["metadata"]["labels"]["who"]: p["metadata"]["name"] for p in storage.pods("app=shared")
    }
    bodies = {}
    buckets = {}
    for claim in ("a", "b"):
        bucket = storage.minio.make_bucket(f"e2e-{claim}")
        body = f"{claim} {uuid.uuid4().hex}\n"
        storage.put("hello.txt", body, bucket=bucket)
        buckets[claim], bodies[claim] = bucket, body
        storage.claim(claim, mountpoint=f"/{claim}", selector={"app": "shared"}, bucket=bucket)
    for pod in pods:
        _reads(storage, pod, "/a", bodies["a"])
        _reads(storage, pod, "/b", bodies["b"])
    dmp_uid = _one_dmp(storage)
    (dmp_obj,) = _dmps(storage)
    dmp = dmp_obj["metadata"]["name"]
    wait_for(lambda: _fuse_daemons(storage, dmp) == 2 * len(PODS), 60, "one daemon per mount")

    # A claim goes: the other stays mounted and readable everywhere, in the same DMP.
    storage.cluster.kubectl("-n", storage.namespace, "delete", "dynamicvolumeclaim", "b")
    for pod in pods:
        storage.wait_gone(pod, "/dynamic/b", timeout=60)
        _reads(storage, pod, "/a", bodies["a"])
        assert _pod_mounts(storage, pod) == ["/dynamic/a"]
    wait_for(lambda: _fuse_daemons(storage, dmp) == len(PODS), 60, "b's daemons stopped")
    # A claim comes: it joins the same DMP.
    storage.claim("c", mountpoint="/c", selector={"app": "shared"}, bucket=buckets["b"])
    for pod in pods:
        _reads(storage, pod, "/c", bodies["b"])
        _reads(storage, pod, "/a", bodies["a"])
    assert _one_dmp(storage) == dmp_uid

    # One pod leaves; the others keep both mounts, and the DMP stays.
    leaving = by_label["p1"]
    storage.cluster.kubectl("-n", storage.namespace, "delete", "pod", leaving, "--wait=true")
    staying = [p for p in pods if p != leaving]
    for pod in staying:
        _reads(storage, pod, "/a", bodies["a"])
        _reads(storage, pod, "/c", bodies["b"])
        assert _pod_mounts(storage, pod) == ["/dynamic/a", "/dynamic/c"]
    wait_for(
        lambda: _fuse_daemons(storage, dmp) == 2 * len(staying), 60, "the leaver's daemons stopped"
    )
    assert _one_dmp(storage) == dmp_uid
    class_dir = XVOLS / storage.class_name
    # Propagation may list one mount at several peers: distinct mount points count.
    wait_for(
        lambda: (
            len({m for m in host_mounts_under(class_dir) if m.endswith(("/a", "/c"))})
            == 2 * len(staying)
        ),
        60,
        "the host has exactly the staying pods' mounts",
    )

    # Every claim goes: the DMP is idle, stays for the grace delay, then goes.
    storage.cluster.kubectl("-n", storage.namespace, "delete", "dynamicvolumeclaim", "a", "c")
    for pod in staying:
        storage.wait_gone(pod, "/dynamic/a", timeout=60)
        storage.wait_gone(pod, "/dynamic/c", timeout=60)
    idle_since = time.monotonic()
    wait_for(lambda: _fuse_daemons(storage, dmp) == 0, 60, "no daemon left in the idle DMP")
    while time.monotonic() - idle_since < IDLE_GRACE * 0.6:
        assert [d["metadata"]["uid"] for d in _dmps(storage)] == [dmp_uid], "reaped too early"
        time.sleep(1.0)
    wait_for(lambda: not _dmps(storage), IDLE_GRACE + 60, "the idle shared DMP is deleted")
    gone_after = time.monotonic() - idle_since
    print(f"idle shared DMP deleted {gone_after:.1f}s after its last mount went")
    assert gone_after >= IDLE_GRACE * 0.6
