"""dynvol installed with ``helm install`` on the real cluster mounts a claim into a running pod.

The chart is installed from this checkout with ``charts/dynvol/ci/local-values.yaml`` (the
values that render what ``manifests/overlays/local`` renders) into a system namespace made
beforehand with its pod-security labels (``namespace.create=false``, as docs/helm.md
describes). A kustomize deployment of dynvol that the session found is removed first and
brought back afterwards, so the two never run side by side. ``kubectl dynvol status`` and
``doctor`` are run against the mounted claim; their output is printed for the log.

Run it alone under the machine-wide lock::

    flock /work/notes/cluster.lock .venv/bin/python -m pytest tests/e2e/test_helm.py -x -q -s
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynvol.testing import MinioServer
from dynvol.testing.localcluster import ClusterError
from dynvol.testing.processes import wait_until
from tests.e2e.conftest import SYSTEM_NAMESPACE, Cluster, Storage, wait_for

TOP = Path(__file__).resolve().parents[2]
HELM = TOP / ".tools" / "bin" / "helm"
CHART = TOP / "charts" / "dynvol"
PLUGIN = Path(sys.executable).parent / "kubectl-dynvol"
RELEASE = "dynvol"
_WORKLOADS = ("daemonset/dynvol-node", "deployment/dynvol-controller")


def helm(cluster: Cluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    argv = [str(HELM), "--kubeconfig", str(cluster.kubeconfig), *args]
    out = subprocess.run(argv, text=True, capture_output=True, timeout=timeout)
    assert out.returncode == 0, f"helm {' '.join(args)} failed:\n{out.stderr}"
    return out


def plugin(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [str(PLUGIN), "--kubeconfig", str(cluster.kubeconfig), *args]
    return subprocess.run(argv, text=True, capture_output=True, timeout=120)


def _remove_release(cluster: Cluster) -> None:
    """Uninstall the release and what it leaves: the webhook configurations the controller
    registered itself, the namespace made for it, and the CRDs (Helm keeps crds/)."""

    def no_mounts() -> bool:
        try:
            return not cluster.items("dynamicvolumemounts", "-A")
        except ClusterError:  # the CRDs never made it: nothing to wait for
            return True

    wait_until(no_mounts, timeout=120, interval=0.5, what="no DynamicVolumeMount to be left")
    subprocess.run(
        [str(HELM), "--kubeconfig", str(cluster.kubeconfig), "uninstall", RELEASE,
         "--namespace", SYSTEM_NAMESPACE, "--wait", "--timeout", "120s"],
        capture_output=True, timeout=180,
    )  # fmt: skip
    cluster.kubectl(
        "delete", "mutatingwebhookconfiguration,validatingwebhookconfiguration", RELEASE,
        "--ignore-not-found", check=False,
    )  # fmt: skip
    cluster.kubectl(
        "delete", "namespace", SYSTEM_NAMESPACE, "--ignore-not-found", "--wait=true",
        "--timeout=120s", check=False, timeout=150,
    )  # fmt: skip
    cluster.kubectl(
        "delete", "-f", str(CHART / "crds"), "--ignore-not-found", "--wait=true",
        "--timeout=60s", check=False, timeout=90,
    )  # fmt: skip


@pytest.fixture(scope="module")
def helm_installed(local_cluster: Cluster) -> Iterator[Cluster]:
    """dynvol from charts/dynvol, installed with helm; removed again afterwards."""
    if not HELM.exists():
        pytest.fail("helm is missing: make tools")
    kustomized = local_cluster.deployed()
    if kustomized:
        local_cluster.undeploy()
    began = time.monotonic()
    try:
        local_cluster.kubectl("create", "namespace", SYSTEM_NAMESPACE)
        local_cluster.kubectl(
            "label", "namespace", SYSTEM_NAMESPACE,
            "pod-security.kubernetes.io/enforce=privileged",
            "pod-security.kubernetes.io/warn=privileged",
        )  # fmt: skip
        helm(
            local_cluster, "install", RELEASE, str(CHART), "--namespace", SYSTEM_NAMESPACE,
            "--values", str(CHART / "ci" / "local-values.yaml"), "--set", "namespace.create=false",
            "--wait", "--timeout", "180s",
        )  # fmt: skip
        for what in _WORKLOADS:
            local_cluster.kubectl(
                "-n", SYSTEM_NAMESPACE, "rollout", "status", what, "--timeout=180s", timeout=200
            )
        wait_until(
            lambda: bool(local_cluster.kubectl(
                "get", "mutatingwebhookconfiguration", RELEASE, "--ignore-not-found",
                "-o", "jsonpath={.webhooks[0].clientConfig.caBundle}", check=False,
            ).stdout.strip()),
            timeout=60, interval=0.5, what="the controller to register its webhooks",
        )  # fmt: skip
        print(f"\nhelm install: dynvol serving after {time.monotonic() - began:.1f}s")
        yield local_cluster
    finally:
        _remove_release(local_cluster)
        if kustomized:
            local_cluster.deploy()


def test_helm_release_mounts_a_claim_and_kubectl_dynvol_shows_it(
    helm_installed: Cluster, minio: MinioServer
) -> None:
    release = json.loads(helm(helm_installed, "list", "-n", SYSTEM_NAMESPACE, "-o", "json").stdout)
    assert [(r["name"], r["status"]) for r in release] == [(RELEASE, "deployed")]
    storage = Storage(helm_installed, minio, policy="independent")
    storage.create()
    try:
        storage.put("hello.txt", "hello from helm\n")
        helm_installed.apply(storage.workload("Pod", "web", {"app": "web"}))
        (pod,) = storage.wait_ready("e2e-workload=web", 1)
        storage.claim("data", mountpoint="/data", selector={"app": "web"})
        storage.wait_content(pod, "/dynamic/data/hello.txt", "hello from helm\n")

        def mounted() -> str | None:
            # The DMP reports the mount first; the controller sums it up on the claim after.
            out = plugin(helm_installed, "status", "-n", storage.namespace)
            assert out.returncode == 0, out.stderr
            rows = [line.split() for line in out.stdout.splitlines()]
            done = len(rows) == 2 and rows[1][1:3] == ["True", "1/1"]
            return out.stdout if done else None

        table = wait_for(mounted, 60, "kubectl dynvol status shows the claim mounted")
        print(f"\n$ kubectl dynvol status -n {storage.namespace}\n{table}")
        rows = [line.split() for line in table.splitlines()]
        assert rows[0][:6] == ["CLAIM", "READY", "MOUNTED", "NODE", "POD", "PHASE"]
        assert rows[1][:6] == ["data", "True", "1/1", "127.0.0.1", pod, "Mounted"]

        shown = plugin(helm_installed, "pod", pod, "-n", storage.namespace)
        assert shown.returncode == 0, shown.stderr
        print(f"$ kubectl dynvol pod {pod} -n {storage.namespace}\n{shown.stdout}")
        assert "/dynamic/data" in shown.stdout
        assert "Running" in shown.stdout

        doctor = plugin(helm_installed, "doctor")
        print(f"$ kubectl dynvol doctor\n{doctor.stdout}")
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "https://127.0.0.1:9443/healthz answers 200" in doctor.stdout
    finally:
        storage.destroy()
