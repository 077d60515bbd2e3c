#!/usr/bin/env python3
"""End-to-end timings on the local cluster (hack/local-cluster), with dynvol deployed.

    .venv/bin/python bench/bench_e2e.py [--claims 20] [--repairs 5] [--json FILE]

Measures, with a real kubelet, containerd, MinIO and s3fs:

- **claim created -> data visible in every pod**, p50/p99 over ``--claims`` claims, for
  two pods of a Deployment:
  - *warm*: ``shared`` dispatch policy, the node's shared Dynamic Mount Pod (DMP) already
    running (kept alive by a first claim); each measured claim adds a mount to it;
  - *cold*: ``independent`` policy; each claim starts one new DMP per pod (a pod
    sandbox, the agent's start-up, then the mount), and the next claim waits until they
    are gone again.
- **repair after a killed FUSE daemon** (``kill -9`` of s3fs inside the DMP) until the
  pod reads the file again, ``--repairs`` times;
- **repair after a deleted DMP** until the pod reads the file again, ``--repairs`` times.

"Visible" is observed from inside each container: a ``kubectl exec`` started before the
claim loops on ``cat`` every 50 ms; the time is taken when it returns (exec's own latency
of a few tens of ms is included). The cluster is brought up (and the overlay applied) if
needed (:mod:`dynvol.testing.localcluster`), and whatever the benchmark started (the
cluster, dynvol, its claims and MinIO) is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))

from dynvol.testing import MinioServer, wait_until  # noqa: E402
from dynvol.testing.localcluster import SYSTEM_NAMESPACE as SYSTEM  # noqa: E402
from dynvol.testing.localcluster import LocalCluster  # noqa: E402

GROUP = "dynamicvolume.csi.cloudnative101.net"
IMAGE = "localhost/dynvol/busybox:dev"


class Kube:
    """The bench's kubectl calls: stdout as text, through the local cluster's kubectl."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.argv = cluster.kubectl_argv
        self.apply = cluster.apply
        self.items = cluster.items

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return self.cluster.kubectl(*args, input=input, check=check, timeout=300).stdout


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 3),
        "p99": round(percentile(values, 99), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "mean": round(statistics.fmean(values), 3),
    }


class Bench:
    def __init__(self, kube: Kube, minio: MinioServer, policy: str) -> None:
        self.kube = kube
        self.minio = minio
        self.policy = policy
        tag = uuid.uuid4().hex[:6]
        self.ns = f"bench-{policy[:3]}-{tag}"
        self.cls = f"bench-{policy[:3]}-{tag}"
        self.bucket = minio.make_bucket("bench")
        self.s3 = minio.client()
        self.pods: list[str] = []

    def setup(self, replicas: int = 2) -> None:
        annotations = {
            f"{GROUP}/storage-provider-class": self.cls,
            f"{GROUP}/volume-mount-path-root": "/dynamic",
            f"{GROUP}/mount-pod-dispatch-policy": self.policy,
        }
        self.kube.apply(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.ns}},
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "creds", "namespace": self.ns},
                "stringData": {
                    "access-key-id": self.minio.access_key,
                    "secret-access-key": self.minio.secret_key,
                },
            },
            {
                "apiVersion": f"{GROUP}/v1alpha1",
                "kind": "StorageProviderClass",
                "metadata": {"name": self.cls},
                "spec": {
                    "provider": "s3",
                    "parameters": {
                        f"{GROUP}/storage-provider-secret-name": "creds",
                        f"{GROUP}/storage-provider-secret-namespace": self.ns,
                    },
                    # MinIO listens on 127.0.0.1.
                    "connection": {"allowLoopback": True},
                },
            },
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "app", "namespace": self.ns},
                "spec": {
                    "replicas": replicas,
                    "selector": {"matchLabels": {"app": "bench"}},
                    "template": {
                        "metadata": {"labels": {"app": "bench"}, "annotations": annotations},
                        "spec": {
                            "terminationGracePeriodSeconds": 1,
                            "containers": [
                                {
                                    "name": "main",
                                    "image": IMAGE,
                                    "imagePullPolicy": "Never",
                                    "command": ["sh", "-c", "exec sleep 2147483647"],
                                }
                            ],
                        },
                    },
                },
            },
        )
        self.kube("-n", self.ns, "rollout", "status", "deployment/app", "--timeout=180s")
        self.pods = sorted(
            p["metadata"]["name"]
            for p in self.kube.items("pods", "-n", self.ns, "-l", "app=bench")
            if not p["metadata"].get("deletionTimestamp")
        )

    def teardown(self) -> None:
        self.kube("delete", "namespace", self.ns, "--wait=true", "--timeout=180s", check=False)
        gone = f"the DMPs of {self.cls} to go"
        wait_until(lambda: not self.dmps(), timeout=180, interval=0.2, what=gone)
        self.kube("delete", "storageproviderclass", self.cls, "--timeout=60s", check=False)

    def dmps(self) -> list[dict[str, Any]]:
        return self.kube.items(
            "pods", "-n", SYSTEM, "-l", f"{GROUP}/storage-provider-class={self.cls}"
        )

    def claim(self, name: str, mountpoint: str) -> None:
        self.kube.apply(
            {
                "apiVersion": f"{GROUP}/v1alpha1",
                "kind": "DynamicVolumeClaim",
                "metadata": {"name": name, "namespace": self.ns},
                "spec": {
                    "mountpoint": mountpoint,
                    "s3Config": {"bucket": self.bucket, "endpoint": self.minio.endpoint},
                    "selector": {"matchLabels": {"app": "bench"}},
                    "storageProvider": "s3",
                },
            }
        )

    def watchers(self, path: str) -> list[subprocess.Popen[str]]:
        """One exec per pod that returns as soon as ``path`` can be read there."""
        script = f"until cat {path} >/dev/null 2>&1; do usleep 50000; done"
        return [
            subprocess.Popen(
                self.kube.argv("-n", self.ns, "exec", pod, "--", "sh", "-c", script),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for pod in self.pods
        ]

    @staticmethod
    def finish(procs: list[subprocess.Popen[str]], began: float, timeout: float = 300) -> float:
        last = began
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, began + timeout - time.monotonic()))
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                    p.wait()
                raise RuntimeError("data did not become visible in time") from None
            last = max(last, time.monotonic())
        return last - began

    def measure_claim(self, name: str) -> float:
        key = f"{name}/object.txt"
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=name.encode())
        procs = self.watchers(f"/dynamic/{name}/{key}")
        time.sleep(1.0)  # the execs are connected and looping before the claim exists
        began = time.monotonic()
        self.claim(name, f"/{name}")
        return self.finish(procs, began)

    def delete_claim(self, name: str) -> None:
        self.kube("-n", self.ns, "delete", "dynamicvolumeclaim", name, "--wait=true")
        script = f"until [ ! -e /dynamic/{name} ]; do usleep 50000; done"
        for pod in self.pods:
            self.kube("-n", self.ns, "exec", pod, "--", "sh", "-c", script)


def run_claims(bench: Bench, count: int, *, cold: bool) -> list[float]:
    times = []
    for i in range(count):
        if cold:
            wait_until(lambda: not bench.dmps(), timeout=180, interval=0.2, what="no DMP to run")
        name = f"c{i:03d}"
        elapsed = bench.measure_claim(name)
        times.append(elapsed)
        print(f"  {'cold' if cold else 'warm'} claim {i + 1}/{count}: {elapsed:.2f}s", flush=True)
        bench.delete_claim(name)
    return times


def run_repairs(bench: Bench, count: int, *, what: str) -> list[float]:
    """``what``: 'fuse' (kill -9 s3fs in the DMP) or 'dmp' (delete the DMP pod)."""
    name = f"r-{what}"
    key = f"{name}/object.txt"
    bench.s3.put_object(Bucket=bench.bucket, Key=key, Body=b"repair")
    bench.claim(name, f"/{name}")
    bench.finish(bench.watchers(f"/dynamic/{name}/{key}"), time.monotonic())
    # Measure on the first pod and the DMP that serves it.
    bench.pods = bench.pods[:1]
    (dvm,) = [
        d
        for d in bench.kube.items("dynamicvolumemounts", "-n", bench.ns)
        if d["spec"]["claimName"] == name and d["spec"]["podName"] == bench.pods[0]
    ]
    dmp_name = dvm["spec"]["dmpName"]
    times = []
    for i in range(count):
        wait_until(
            lambda: any(
                d["metadata"]["name"] == dmp_name
                and not d["metadata"].get("deletionTimestamp")
                and d["status"].get("phase") == "Running"
                for d in bench.dmps()
            ),
            timeout=120,
            interval=0.2,
            what=f"DMP {dmp_name} to run",
        )
        path = f"/dynamic/{name}/{key}"
        began = time.monotonic()
        if what == "fuse":
            pid = bench.kube("-n", SYSTEM, "exec", dmp_name, "--", "pgrep", "-x", "s3fs").split()
            bench.kube("-n", SYSTEM, "exec", dmp_name, "--", "kill", "-9", pid[0])
        else:
            bench.kube("-n", SYSTEM, "delete", "pod", dmp_name, "--wait=false")
        # The mount is broken (ENOTCONN) or gone right after; wait for it to read again.
        time.sleep(0.2)
        elapsed = bench.finish(bench.watchers(path), began)
        times.append(elapsed)
        print(f"  repair after {what} {i + 1}/{count}: {elapsed:.2f}s", flush=True)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", type=int, default=20)
    parser.add_argument("--repairs", type=int, default=5)
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--repairs-only", action="store_true", help="skip the claim series")
    args = parser.parse_args()
    cluster = LocalCluster(progress=lambda line: print(f"bench_e2e: {line}", flush=True))
    started = cluster.up()
    try:
        existed = cluster.deploy()
        try:
            return measure(args, Kube(cluster))
        finally:
            if not existed:
                cluster.undeploy()
    finally:
        if started:
            cluster.down()


def measure(args: argparse.Namespace, kube: Kube) -> int:
    results: dict[str, Any] = {"claims": args.claims, "repairs": args.repairs}
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-e2e-{uuid.uuid4().hex[:6]}"
    minio = MinioServer(dir=workdir)
    minio.start()
    try:
        if not args.repairs_only:
            warm = Bench(kube, minio, "shared")
            warm.setup()
            try:
                print("warm (shared DMP already running):", flush=True)
                first = warm.measure_claim("keepalive")
                print(f"  first claim, DMP started cold: {first:.2f}s", flush=True)
                results["warm_shared"] = summary(run_claims(warm, args.claims, cold=False))
            finally:
                warm.teardown()
        cold = Bench(kube, minio, "independent")
        cold.setup()
        try:
            if not args.repairs_only:
                print("cold (independent: new DMP per pod per claim):", flush=True)
                results["cold_independent"] = summary(run_claims(cold, args.claims, cold=True))
            print("repairs:", flush=True)
            results["repair_killed_fuse"] = summary(run_repairs(cold, args.repairs, what="fuse"))
            results["repair_deleted_dmp"] = summary(run_repairs(cold, args.repairs, what="dmp"))
        finally:
            cold.teardown()
    finally:
        minio.stop()
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
