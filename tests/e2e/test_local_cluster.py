"""Smoke test of the local cluster (hack/local-cluster): a real kubelet runs real pods.

It proves what the rest of the e2e tier stands on: the node is Ready; a bare Pod from the
locally built workload image runs on the bridge network and on the host network; logs,
exec and deletion go through the apiserver, the kubelet and containerd; the pod's
ServiceAccount token is mounted; and a mount made under /var/lib/dynamic by a privileged
pod (Bidirectional) reaches the host and another pod (HostToContainer), which is the
propagation path dynvol relies on.

If a cluster is already running in the default state directory (``hack/local-cluster up``),
the test uses it and leaves it running. Otherwise it brings one up and takes it down at the
end of the session.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    # The local_cluster fixture and its Cluster live in tests/e2e/conftest.py.
    from tests.e2e.conftest import Cluster

pytestmark = pytest.mark.e2e

WORKLOAD_IMAGE = "localhost/dynvol/busybox:dev"
#: An rshared directory of this test's own (the fixture below makes it). Not
#: /var/lib/dynamic: once dynvol is deployed, only its own pods may mount that.
SHARED_ROOT = Path("/var/tmp/dynvol-e2e-propagation")


def _pod(
    name: str,
    *,
    host_network: bool = False,
    command: str = "sleep 3600",
    privileged: bool = False,
    propagation: str | None = None,
) -> dict[str, object]:
    container: dict[str, object] = {
        "name": "main",
        "image": WORKLOAD_IMAGE,
        "imagePullPolicy": "Never",
        "command": ["sh", "-c", command],
    }
    spec: dict[str, object] = {
        "containers": [container],
        "hostNetwork": host_network,
        "terminationGracePeriodSeconds": 1,
        "restartPolicy": "Never",
    }
    if privileged:
        container["securityContext"] = {"privileged": True}
    if propagation:
        container["volumeMounts"] = [
            {"name": "shared", "mountPath": "/shared", "mountPropagation": propagation}
        ]
        spec["volumes"] = [
            {"name": "shared", "hostPath": {"path": str(SHARED_ROOT), "type": "Directory"}}
        ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"e2e": "smoke"}},
        "spec": spec,
    }


@pytest.fixture
def pods(local_cluster: Cluster) -> Iterator[list[str]]:
    """Names of pods a test creates; all are deleted (and waited for) afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        local_cluster.kubectl(
            "delete",
            "pod",
            name,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=60s",
            check=False,
            timeout=90,
        )


def _run_pod(cluster: Cluster, pods: list[str], **kw: object) -> tuple[str, float]:
    name = f"smoke-{uuid.uuid4().hex[:8]}"
    pods.append(name)
    began = time.monotonic()
    cluster.apply(_pod(name, **kw))  # type: ignore[arg-type]
    cluster.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "--timeout=120s", timeout=130)
    return name, time.monotonic() - began


def test_node_is_ready_with_pinned_parts(local_cluster: Cluster) -> None:
    node = json.loads(local_cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    assert len(node) == 1
    info = node[0]["status"]["nodeInfo"]
    # The kubelet is the release .tools/bin holds: the newest pinned one unless
    # KUBERNETES_VERSION built another, and a pinned one in any case.
    kubelet = Path(__file__).resolve().parents[2] / ".tools" / "bin" / "kubelet"
    built = subprocess.run(
        [str(kubelet), "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()[-1]
    pinned = subprocess.run(
        ["bash", str(kubelet.parents[2] / "hack" / "tools" / "build.sh"), "--versions"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    assert built in pinned, (built, pinned)
    assert info["kubeletVersion"] == built
    server = json.loads(local_cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]
    assert server["gitVersion"] == built
    assert info["containerRuntimeVersion"].startswith("containerd://")
    ready = {c["type"]: c["status"] for c in node[0]["status"]["conditions"]}
    assert ready["Ready"] == "True"


def test_bare_pod_runs_logs_execs_and_is_deleted(local_cluster: Cluster, pods: list[str]) -> None:
    name, started = _run_pod(
        local_cluster, pods, command="echo hello from $(hostname); exec sleep 3600"
    )
    pod = local_cluster.get("pod", name)
    uid = pod["metadata"]["uid"]  # type: ignore[index]
    ip = pod["status"]["podIP"]  # type: ignore[index]
    assert ip.startswith("10.244.0."), f"expected a bridge address, got {ip}"
    assert started < 120

    logs = local_cluster.kubectl("logs", name).stdout
    assert f"hello from {name}" in logs

    out = local_cluster.kubectl("exec", name, "--", "sh", "-c", "echo $((6 * 7))").stdout
    assert out.strip() == "42"
    token = local_cluster.kubectl(
        "exec", name, "--", "cat", "/var/run/secrets/kubernetes.io/serviceaccount/token"
    ).stdout
    assert token.count(".") == 2, "a projected ServiceAccount token (a JWT) is mounted"

    pod_dir = Path("/var/lib/kubelet/pods") / str(uid)
    assert pod_dir.is_dir()
    local_cluster.kubectl("delete", "pod", name, "--wait=true", "--timeout=60s")
    gone = local_cluster.kubectl("get", "pod", name, "--ignore-not-found", "-o", "name").stdout
    assert gone.strip() == ""
    deadline = time.monotonic() + 30
    while pod_dir.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not pod_dir.exists(), "the kubelet cleans up the pod's directory"


def test_host_network_pod(local_cluster: Cluster, pods: list[str]) -> None:
    name, _ = _run_pod(local_cluster, pods, host_network=True)
    assert local_cluster.get("pod", name)["status"]["podIP"] == "127.0.0.1"  # type: ignore[index]
    out = local_cluster.kubectl("exec", name, "--", "cat", "/proc/net/dev").stdout
    assert "eth0" in out, "a host-network pod sees the host's interfaces"


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """SHARED_ROOT bound onto itself and made rshared (this machine's / is private, and
    containerd refuses a Bidirectional hostPath on a private mount); undone afterwards."""
    SHARED_ROOT.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(SHARED_ROOT), str(SHARED_ROOT)], check=True)
    try:
        subprocess.run(["mount", "--make-rshared", str(SHARED_ROOT)], check=True)
        yield SHARED_ROOT
    finally:
        subprocess.run(["umount", "-l", str(SHARED_ROOT)], check=False)
        SHARED_ROOT.rmdir()


def test_bidirectional_mount_reaches_host_and_other_pods(
    local_cluster: Cluster, shared_root: Path, pods: list[str]
) -> None:
    sub = f"e2e-{uuid.uuid4().hex[:8]}"
    host_dir = shared_root / sub
    host_dir.mkdir(parents=True)
    try:
        reader, _ = _run_pod(local_cluster, pods, propagation="HostToContainer")
        writer, _ = _run_pod(local_cluster, pods, privileged=True, propagation="Bidirectional")
        local_cluster.kubectl(
            "exec",
            writer,
            "--",
            "sh",
            "-c",
            f"mount -t tmpfs e2e /shared/{sub} && echo propagated > /shared/{sub}/hello",
        )
        assert (host_dir / "hello").read_text() == "propagated\n"
        seen = local_cluster.kubectl("exec", reader, "--", "cat", f"/shared/{sub}/hello").stdout
        assert seen == "propagated\n"
        local_cluster.kubectl("exec", writer, "--", "umount", f"/shared/{sub}")
        assert not (host_dir / "hello").exists()
        left = local_cluster.kubectl("exec", reader, "--", "ls", f"/shared/{sub}").stdout
        assert left.strip() == "", "the unmount propagates too"
    finally:
        subprocess.run(["umount", "-l", str(host_dir)], capture_output=True)
        host_dir.rmdir()


def test_dynvol_image_reaches_the_apiserver_in_cluster(
    local_cluster: Cluster, pods: list[str]
) -> None:
    """What dynvol's own pods do: hostNetwork, in-cluster config pointed at 127.0.0.1, through
    dynvol's own client (the image has no kubernetes_asyncio: it reads the service account
    itself)."""
    port = json.loads((local_cluster.dir / "run" / "state.json").read_text())["ports"]["apiserver"]
    script = (
        "import asyncio, importlib.util\n"
        "from dynvol_kube import Client\n"
        "assert importlib.util.find_spec('kubernetes_asyncio') is None\n"
        "async def main():\n"
        "    async with await Client.from_kubeconfig() as api:\n"
        "        review = await api.request(\n"
        "            'POST', '/apis/authentication.k8s.io/v1/selfsubjectreviews',\n"
        "            body={'apiVersion': 'authentication.k8s.io/v1',\n"
        "                  'kind': 'SelfSubjectReview'})\n"
        "        print(review['status']['userInfo']['username'])\n"
        "asyncio.run(main())\n"
    )
    name = f"smoke-{uuid.uuid4().hex[:8]}"
    pods.append(name)
    pod = _pod(name, host_network=True)
    container = pod["spec"]["containers"][0]  # type: ignore[index]
    container["image"] = "localhost/dynvol/dynvol:dev"
    container["command"] = ["python3", "-c", script]
    container["env"] = [
        {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
        {"name": "KUBERNETES_SERVICE_PORT", "value": str(port)},
    ]
    local_cluster.apply(pod)
    local_cluster.kubectl(
        "wait",
        "--for=jsonpath={.status.phase}=Succeeded",
        f"pod/{name}",
        "--timeout=120s",
        timeout=130,
    )
    assert local_cluster.kubectl("logs", name).stdout.strip() == (
        "system:serviceaccount:default:default"
    )
