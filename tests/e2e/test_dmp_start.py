"""A class's ``dmp-start: OnPublish`` on the single-node cluster: each pod's Dynamic Mount
Pod starts with the pod, before any claim; the first claim mounts through the DMPs already
running; a pod's DMP goes with the pod, and a claim's deletion leaves the DMPs of the pods
still there (docs/operations.md, "When a DMP starts")."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from tests.e2e.conftest import GROUP, wait_for

if TYPE_CHECKING:
    from tests.e2e.conftest import Storage


def _running_dmps(storage: Storage) -> dict[str, tuple[str, str]]:
    """Running DMPs of the test's class: name -> (uid, the pod it serves)."""
    return {
        d["metadata"]["name"]: (
            d["metadata"]["uid"],
            d["metadata"]["labels"].get(f"{GROUP}/pod", ""),
        )
        for d in storage.dmps()
        if not d["metadata"].get("deletionTimestamp")
        and d.get("status", {}).get("phase") == "Running"
    }


def test_dmps_start_with_their_pods_and_the_first_claim_uses_them(storage: Storage) -> None:
    patch = {"spec": {"parameters": {f"{GROUP}/dmp-start": "OnPublish"}}}
    storage.cluster.kubectl(
        "patch", "storageproviderclass", storage.class_name, "--type=merge",
        "-p", json.dumps(patch),
    )  # fmt: skip
    deployment = storage.workload("Deployment", "early", {"app": "early"})
    deployment["spec"]["replicas"] = 2
    storage.cluster.apply(deployment)
    began = time.monotonic()
    pods = storage.wait_ready("app=early", 2)

    def one_dmp_per_pod() -> dict[str, tuple[str, str]] | None:
        dmps = _running_dmps(storage)
        return dmps if sorted(pod for _, pod in dmps.values()) == pods else None

    started = wait_for(one_dmp_per_pod, 120, "a running DMP for each pod, with no claim")
    print(f"OnPublish: a DMP running for each of 2 pods {time.monotonic() - began:.1f}s "
          "after the Deployment was applied")  # fmt: skip
    assert storage.dvms() == [], "no claim, no mount"

    storage.put("early.txt", "early\n")
    claimed = storage.claim("c", mountpoint="/data", selector={"app": "early"})
    seen = [storage.wait_content(p, "/dynamic/data/early.txt", "early\n") for p in pods]
    print(f"OnPublish: claim -> data in both pods {max(seen) - claimed:.2f}s (through "
          "kubectl exec, so an upper bound)")  # fmt: skip
    assert _running_dmps(storage) == started, "the claim reused the DMPs that were running"
    assert {d["spec"]["dmpName"] for d in storage.dvms()} == set(started)

    # The claim goes: the DMPs stay with their pods (they are kept for the pods, not for
    # the claim).
    storage.cluster.kubectl("-n", storage.namespace, "delete", "dynamicvolumeclaim", "c")
    for p in pods:
        storage.wait_gone(p, "/dynamic/data")
    wait_for(lambda: not storage.dvms(), 60, "the claim's mounts are gone")
    assert _running_dmps(storage) == started

    # One pod goes: its DMP goes with it; the other's stays.
    storage.cluster.kubectl("-n", storage.namespace, "scale", "deployment", "early", "--replicas=1")

    def one_left() -> dict[str, Any] | None:
        left = _running_dmps(storage)
        alive = [p["metadata"]["name"] for p in storage.pods("app=early")]
        if len(left) != 1 or len(alive) != 1:
            return None
        (served,) = [pod for _, pod in left.values()]
        return left if served == alive[0] else None

    left = wait_for(one_left, 120, "the DMP of the pod that went is gone")
    assert set(left) <= set(started)
