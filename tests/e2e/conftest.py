"""Fixtures for the end-to-end tier: the local cluster, dynvol deployed on it, and MinIO.

- ``local_cluster`` (session): the real single-node cluster of ``hack/local-cluster``. A
  cluster already running in the state directory is used and left running; otherwise one
  is brought up and taken down at the end of the session.
- ``dynvol`` (session): dynvol deployed with ``kubectl apply -k manifests/overlays/local``
  from this checkout's image (rebuilt and imported when the cluster was already up). If
  the session deployed it, the session removes it.
- ``storage`` (function): a fresh namespace, a Secret with the MinIO credentials, a
  StorageProviderClass for it and helpers to run workloads and claims. Everything is
  deleted afterwards and the test waits until the node has no slot, mount or Dynamic Mount
  Pod left for it, so a leak fails the test that caused it.

The MinIO is the ``minio`` fixture of :mod:`dynvol.testing` (on 127.0.0.1); DMPs use the
host network on this cluster, so they reach it there.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dynvol.testing import MinioServer
from dynvol.testing.localcluster import SYSTEM_NAMESPACE, ClusterError, LocalCluster

WORKLOAD_IMAGE = "localhost/dynvol/busybox:dev"
XVOLS = Path("/var/lib/dynamic/xvols")
GROUP = "dynamicvolume.csi.cloudnative101.net"
API_VERSION = f"{GROUP}/v1alpha1"
CI = os.environ.get("CI", "").lower() == "true"


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the local cluster needs root"
    for tool in ("containerd", "runc", "ctr", "debootstrap", "openssl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make setup)"
    if not Path("/usr/lib/cni/bridge").exists():
        return "containernetworking-plugins is not installed (make setup)"
    if (
        not Path("/sys/fs/cgroup/cpu").is_dir()
        and not Path("/sys/fs/cgroup/cgroup.controllers").exists()
    ):
        return "no cgroup hierarchy for the kubelet"
    return None


class Cluster(LocalCluster):
    """The running cluster, driven with the pinned kubectl."""

    def get(self, kind: str, name: str, namespace: str = "default") -> dict[str, Any]:
        out = self.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout
        return json.loads(out)  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[Cluster]:
    reason = _unavailable()
    if reason:
        if CI:
            pytest.fail(reason)
        pytest.skip(reason)
    cluster = Cluster()
    started = cluster.up()
    try:
        yield cluster
    finally:
        if started:
            cluster.down()


# --------------------------------------------------------------------------- dynvol


@pytest.fixture(scope="session")
def dynvol(local_cluster: Cluster) -> Iterator[Cluster]:
    """dynvol from this checkout, deployed with the local overlay, webhooks registered."""
    existed = local_cluster.deploy()
    try:
        yield local_cluster
    finally:
        if not existed:
            local_cluster.undeploy()


# --------------------------------------------------------------------------- helpers


def wait_for(probe: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Call ``probe`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
        except (AssertionError, ClusterError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting until {what} ({last!r})")
        time.sleep(interval)


def host_mounts_under(path: Path) -> list[str]:
    """Mount points on the host at or below ``path`` (from this process's mountinfo)."""
    prefix = str(path).rstrip("/")
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return points


class Storage:
    """One test's namespace, class and bucket, with helpers to drive workloads and claims."""

    #: The class's ``connection`` policy: the MinIO fixture listens on 127.0.0.1.
    connection: dict[str, bool] = {"allowLoopback": True}

    def __init__(self, cluster: Cluster, minio: MinioServer, *, policy: str) -> None:
        self.cluster = cluster
        self.minio = minio
        self.policy = policy
        suffix = uuid.uuid4().hex[:8]
        self.namespace = f"e2e-{suffix}"
        self.class_name = f"e2e-{suffix}"
        self.secret_name = "e2e-s3-credentials"
        self.bucket = minio.make_bucket("e2e")
        self.s3 = minio.client()

    # -- setup / teardown ----------------------------------------------------------------

    def create(self) -> None:
        self.cluster.apply(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}},
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": self.secret_name, "namespace": self.namespace},
                "type": "Opaque",
                "stringData": {
                    "access-key-id": self.minio.access_key,
                    "secret-access-key": self.minio.secret_key,
                },
            },
            {
                "apiVersion": API_VERSION,
                "kind": "StorageProviderClass",
                "metadata": {"name": self.class_name},
                "spec": {
                    "provider": "s3",
                    "parameters": {
                        f"{GROUP}/storage-provider-secret-name": self.secret_name,
                        f"{GROUP}/storage-provider-secret-namespace": self.namespace,
                        f"{GROUP}/mount-cpu-request": "10m",
                        f"{GROUP}/mount-memory-request": "50Mi",
                        f"{GROUP}/mount-cpu-limit": "500m",
                        f"{GROUP}/mount-memory-limit": "256Mi",
                    },
                    "connection": dict(self.connection),
                },
            },
        )

    def set_secret_key(self, secret_access_key: str) -> None:
        """Edit the class's source Secret (what a user rotating credentials does)."""
        patch = {"stringData": {"secret-access-key": secret_access_key}}
        self.cluster.kubectl(
            "-n", self.namespace, "patch", "secret", self.secret_name, "--type=merge",
            "-p", json.dumps(patch),
        )  # fmt: skip

    def dmps(self) -> list[dict[str, Any]]:
        """This test's Dynamic Mount Pods (by the class label the node plugin sets)."""
        return self.cluster.items(
            "pods",
            "-n",
            SYSTEM_NAMESPACE,
            "-l",
            f"app.kubernetes.io/component=dynamic-mount-pod,{GROUP}/storage-provider-class="
            f"{self.class_name}",
        )

    def destroy(self) -> None:
        self.cluster.kubectl(
            "delete", "namespace", self.namespace, "--ignore-not-found", "--wait=true",
            "--timeout=180s", check=False, timeout=200,
        )  # fmt: skip
        # Independent DMPs go with their pods; a shared one after its idle grace (20 s in
        # the local overlay).
        wait_for(lambda: not self.dmps(), 120, f"the DMPs of class {self.class_name} are gone")
        self.cluster.kubectl(
            "delete", "storageproviderclass", self.class_name, "--ignore-not-found",
            "--wait=true", "--timeout=60s", check=False, timeout=90,
        )  # fmt: skip
        self.wait_nothing_left()

    def wait_nothing_left(self) -> None:
        """Wait until no slot or mount of the class is left on the node."""
        class_dir = XVOLS / self.class_name
        wait_for(
            lambda: (
                not host_mounts_under(class_dir)
                and not any(p.is_dir() for p in class_dir.glob("*/*"))
            ),
            60,
            f"no slot or mount is left under {class_dir}",
        )

    # -- workloads -----------------------------------------------------------------------

    def pod_template(self, labels: dict[str, str], *, restart_policy: str = "Always") -> dict:  # type: ignore[type-arg]
        annotations = {
            f"{GROUP}/storage-provider-class": self.class_name,
            f"{GROUP}/volume-mount-path-root": "/dynamic",
        }
        if self.policy != "independent":
            annotations[f"{GROUP}/mount-pod-dispatch-policy"] = self.policy
        return {
            "metadata": {"labels": labels, "annotations": annotations},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "restartPolicy": restart_policy,
                "containers": [
                    {
                        "name": "main",
                        "image": WORKLOAD_IMAGE,
                        "imagePullPolicy": "Never",
                        # Exits on SIGTERM (PID 1 has no default handler), so a test can
                        # restart the container from inside with `kill 1`.
                        "command": [
                            "sh",
                            "-c",
                            "trap 'exit 143' TERM; while true; do sleep 1; done",
                        ],
                    }
                ],
            },
        }

    def workload(self, kind: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
        """A workload object of ``kind`` whose pods carry ``labels`` and opt in."""
        meta = {"name": name, "namespace": self.namespace}
        selector = {"matchLabels": {"e2e-workload": name}}
        pod_labels = {**labels, "e2e-workload": name}
        if kind == "Pod":
            template = self.pod_template(pod_labels)
            return {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {**meta, **template["metadata"]},
                "spec": template["spec"],
            }
        if kind == "Job":
            return {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": meta,
                "spec": {
                    "backoffLimit": 0,
                    "template": self.pod_template(pod_labels, restart_policy="Never"),
                },
            }
        spec: dict[str, Any] = {"selector": selector, "template": self.pod_template(pod_labels)}
        if kind == "Deployment":
            spec["replicas"] = 1
        if kind == "StatefulSet":
            spec.update(replicas=1, serviceName=name, podManagementPolicy="Parallel")
        return {"apiVersion": "apps/v1", "kind": kind, "metadata": meta, "spec": spec}

    def pods(self, selector: str) -> list[dict[str, Any]]:
        pods = self.cluster.items("pods", "-n", self.namespace, "-l", selector)
        return [p for p in pods if not p["metadata"].get("deletionTimestamp")]

    def wait_ready(self, selector: str, count: int, timeout: float = 120) -> list[str]:
        def ready() -> list[str] | None:
            pods = self.pods(selector)
            ok = [
                p["metadata"]["name"]
                for p in pods
                if any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in p.get("status", {}).get("conditions", [])
                )
            ]
            return sorted(ok) if len(ok) >= count else None

        return wait_for(ready, timeout, f"{count} pods matching {selector} are Ready")  # type: ignore[no-any-return]

    def exec(
        self, pod: str, script: str, *, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl(
            "-n", self.namespace, "exec", pod, "-c", "main", "--", "sh", "-c", script,
            check=False, timeout=timeout,
        )  # fmt: skip

    def sh(self, pod: str, script: str) -> str:
        result = self.exec(pod, script)
        assert result.returncode == 0, f"in {pod}: {script!r} failed: {result.stderr.strip()}"
        return result.stdout

    # -- claims and data -----------------------------------------------------------------

    def claim(
        self,
        name: str,
        *,
        mountpoint: str,
        selector: dict[str, str],
        bucket: str | None = None,
        read_only: bool = False,
    ) -> float:
        """Apply a claim; returns the monotonic time just before it was created."""
        began = time.monotonic()
        spec: dict[str, Any] = {
            "mountpoint": mountpoint,
            "s3Config": {"bucket": bucket or self.bucket, "endpoint": self.minio.endpoint},
            "selector": {"matchLabels": selector},
            "storageProvider": "s3",
        }
        if read_only:
            spec["readOnly"] = True
        self.cluster.apply(
            {
                "apiVersion": API_VERSION,
                "kind": "DynamicVolumeClaim",
                "metadata": {"name": name, "namespace": self.namespace},
                "spec": spec,
            }
        )
        return began

    def put(self, key: str, body: str, *, bucket: str | None = None) -> None:
        self.s3.put_object(Bucket=bucket or self.bucket, Key=key, Body=body.encode())

    def get(self, key: str, *, bucket: str | None = None) -> str | None:
        try:
            obj = self.s3.get_object(Bucket=bucket or self.bucket, Key=key)
        except self.s3.exceptions.NoSuchKey:
            return None
        return obj["Body"].read().decode()  # type: ignore[no-any-return]

    def wait_content(self, pod: str, path: str, body: str, timeout: float = 120) -> float:
        """Wait until ``path`` in ``pod`` holds ``body``; returns when (monotonic)."""
        script = f'test "$(cat {shlex.quote(path)})" = {shlex.quote(body.rstrip())}'

        def seen() -> float | None:
            return time.monotonic() if self.exec(pod, script).returncode == 0 else None

        return wait_for(seen, timeout, f"{pod} reads {body.strip()!r} at {path}")  # type: ignore[no-any-return]

    def wait_gone(self, pod: str, path: str, timeout: float = 120) -> None:
        script = f"test ! -e {shlex.quote(path)} && ! grep -q ' {path} ' /proc/self/mounts"
        wait_for(
            lambda: self.exec(pod, script).returncode == 0, timeout, f"{path} is gone in {pod}"
        )

    def dvms(self) -> list[dict[str, Any]]:
        return self.cluster.items("dynamicvolumemounts", "-n", self.namespace)

    def claim_status(self, name: str) -> dict[str, Any]:
        return self.cluster.get("dynamicvolumeclaim", name, self.namespace).get("status") or {}


@pytest.fixture
def storage(
    dynvol: Cluster, minio: MinioServer, request: pytest.FixtureRequest
) -> Iterator[Storage]:
    """A namespace, Secret, StorageProviderClass (independent DMPs unless the test is
    marked ``@pytest.mark.parametrize("policy", ...)`` indirectly) and a bucket."""
    policy = getattr(request, "param", "independent")
    s = Storage(dynvol, minio, policy=policy)
    s.create()
    try:
        yield s
    finally:
        s.destroy()
