"""The status endpoints on the real cluster: the figures of the node plugin, the controller
and a Dynamic Mount Pod move with a publish, a mount, a repair and an unmount.

On the local cluster every dynvol pod is on the host network of the one node (127.0.0.1):
the node plugin and the controller listen on their pod address at the manifests' ports,
a mount pod on a free port of 127.0.0.1 that it logs at start.
"""

from __future__ import annotations

import re
import uuid
from typing import TYPE_CHECKING, Any

import pytest

from dynvol.testing.scraping import Scrape, get, scrape
from tests.e2e.conftest import SYSTEM_NAMESPACE, wait_for

if TYPE_CHECKING:
    from tests.e2e.conftest import Storage

pytestmark = pytest.mark.e2e

_SERVING = re.compile(r"serving /metrics, /healthz and /readyz on (http://127\.0\.0\.1:\d+)")


def _url(storage: Storage, component: str, port: int) -> str:
    (pod,) = storage.cluster.items(
        "pods", "-n", SYSTEM_NAMESPACE, "-l", f"app.kubernetes.io/component={component}"
    )
    return f"http://{pod['status']['podIP']}:{port}"


def _dmp_url(storage: Storage) -> str:
    def logged() -> str | None:
        dmps = [d for d in storage.dmps() if d["status"].get("phase") == "Running"]
        if len(dmps) != 1:
            return None
        logs = storage.cluster.kubectl(
            "-n", SYSTEM_NAMESPACE, "logs", dmps[0]["metadata"]["name"], check=False
        ).stdout  # fmt: skip
        found = _SERVING.search(logs)
        return found.group(1) if found else None

    url: str = wait_for(logged, 120, "the mount pod logs its status address")
    return url


def _moved(url: str, check: Any, what: str, timeout: float = 60) -> Scrape:
    def scraped() -> Scrape | None:
        now = scrape(url)
        return now if check(now) else None

    result: Scrape = wait_for(scraped, timeout, what, interval=0.5)
    return result


def _pod_events(storage: Storage, pod: str) -> set[str]:
    events = storage.cluster.items(
        "events", "-n", storage.namespace, "--field-selector", f"involvedObject.name={pod}"
    )
    return {e["reason"] for e in events}


def test_figures_move_with_a_mount_a_repair_and_an_unmount(storage: Storage) -> None:
    node, controller = _url(storage, "node", 9810), _url(storage, "controller", 9811)
    for url in (node, controller):
        status, body = get(url + "/healthz")
        assert status == 200, body
        status, body = get(url + "/readyz")
        assert status == 200, body
    assert "[+]csi socket ok" in get(node + "/healthz")[1]
    ctl = scrape(controller)
    assert ctl.get("dynvol_leader", lease="dynvol-controller") == 1
    before = scrape(node)
    published = before.get("dynvol_csi_operations_total", method="NodePublishVolume", code="OK")

    # A publish: kubelet calls NodePublishVolume for the new pod.
    storage.cluster.apply(storage.workload("Pod", "metrics", {"app": "metrics"}))
    (pod,) = storage.wait_ready("app=metrics", 1)
    _moved(node, lambda s: s.get("dynvol_csi_operations_total", method="NodePublishVolume",
                                 code="OK") == published + 1,
           "NodePublishVolume counted")  # fmt: skip
    assert scrape(node).get("dynvol_csi_published_volumes") >= 1

    # Two mounts into it: one stays while the other is unmounted, so the mount pod lives on.
    claims = {"keep": "/keep", "drop": "/drop"}
    bodies = {}
    claims_before = ctl.get("dynvol_reconciles_total", controller="claims")
    for name, mountpoint in claims.items():
        bodies[name] = f"{name} {uuid.uuid4().hex}\n"
        storage.put(f"{name}.txt", bodies[name])
        storage.claim(name, mountpoint=mountpoint, selector={"app": "metrics"})
    for name, mountpoint in claims.items():
        storage.wait_content(pod, f"/dynamic{mountpoint}/{name}.txt", bodies[name])
    dmp = _dmp_url(storage)
    mounted = _moved(dmp, lambda s: s.get("dynvol_dmp_mounts", phase="Mounted") == 2,
                     "two mounts Mounted in the mount pod")  # fmt: skip
    assert mounted.get("dynvol_dmp_mount_duration_seconds_count", result="Mounted") == 2
    assert get(dmp + "/readyz")[0] == 200
    _moved(controller, lambda s: s.get("dynvol_reconciles_total", controller="claims")
           > claims_before, "the claims reconciled by the controller")  # fmt: skip
    assert scrape(node).get("dynvol_reconciles_total", result="Done") > 0

    # A repair: the mounters die; the mount pod mounts again.
    (dmp_pod,) = storage.dmps()
    storage.cluster.kubectl(
        "-n", SYSTEM_NAMESPACE, "exec", dmp_pod["metadata"]["name"], "--", "pkill", "-9", "s3fs"
    )  # fmt: skip
    repaired = _moved(dmp, lambda s: s.get("dynvol_dmp_repairs_total", result="Remounted") >= 2,
                      "the repairs counted")  # fmt: skip
    assert repaired.get("dynvol_dmp_stale_mounts_total") >= 2
    storage.wait_content(pod, "/dynamic/keep/keep.txt", bodies["keep"])

    # An unmount.
    storage.cluster.kubectl("-n", storage.namespace, "delete", "dynamicvolumeclaim", "drop")
    storage.wait_gone(pod, "/dynamic/drop")
    after = _moved(dmp, lambda s: s.get("dynvol_dmp_unmounts_total") == 1,
                   "the unmount counted")  # fmt: skip
    assert after.get("dynvol_dmp_mounts", phase="Mounted") == 1
    assert after.get("dynvol_dmp_mount_failures_total") == 0
    wait_for(lambda: {"Mounted", "Unmounted"} <= _pod_events(storage, pod), 60,
             "Mounted and Unmounted Events on the pod")  # fmt: skip

    # The pod goes: kubelet unpublishes.
    unpublished = scrape(node).get("dynvol_csi_operations_total", method="NodeUnpublishVolume",
                                   code="OK")  # fmt: skip
    storage.cluster.kubectl("-n", storage.namespace, "delete", "pod", pod, "--wait=true",
                            timeout=180)  # fmt: skip
    _moved(node, lambda s: s.get("dynvol_csi_operations_total", method="NodeUnpublishVolume",
                                 code="OK") > unpublished,
           "NodeUnpublishVolume counted", timeout=120)  # fmt: skip
