"""Benchmark of the DMP agent: time to mount, time to repair, against bare s3fs.

Real parts throughout: etcd + kube-apiserver, MinIO, ``dynvol dmp`` in its own mount
namespace, s3fs, and a "container" mount namespace that binds the slot rslave. Over N
(default 50) DynamicVolumeMounts created one after another through the API it measures:

- mount: DynamicVolumeMount creation -> a file of the bucket is readable in the container;
- repair: ``kill -9`` of the mount's s3fs -> the file is readable in the container again;
- floor: a bare ``s3fs -f`` of the same bucket -> the file is readable (same options).

It also reports the agent's start (process started -> ``/readyz`` answers 200: imports,
first list and watch) and its resident memory with 10 and with N+1 mounts.

Goal: mount p50 <= 1.5 x floor p50 + 100 ms; repair p99 < 2 s; agent VmRSS with 10 mounts
<= 40 MiB (issue 14, FUSE daemons not counted).

    python bench/bench_dmp.py [--count 50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from dynvol.testing.controlplane import ControlPlane
from dynvol.testing.minio import MinioServer
from dynvol.testing.mounts import lazy_unmount_tree, rshared_dir
from dynvol.testing.processes import Process, free_port
from dynvol.testing.scraping import scrape
from dynvol_core import constants as c
from dynvol_core.dispatch import DmpSpec, dmp_pod_manifest, label_value
from dynvol_core.models import DynamicVolumeMount, MountSpec
from dynvol_dmp.metrics import STAGES

#: Issue 14: the agent's VmRSS with 10 mounts, FUSE daemons not counted.
AGENT_RSS_GOAL_MIB = 40.0

DYNVOL = str(Path(sys.executable).with_name("dynvol"))

#: Runs inside the container's mount namespace: for each path read from stdin, waits until
#: the file can be read and prints the CLOCK_MONOTONIC time (shared by all namespaces).
READER = r"""
import sys, time
for line in sys.stdin:
    path = line.strip()
    deadline = time.monotonic() + 30
    while True:
        try:
            with open(path, "rb") as fh:
                fh.read()
            print(f"{time.monotonic():.6f}", flush=True)
            break
        except OSError:
            if time.monotonic() > deadline:
                print("timeout", flush=True)
                break
            time.sleep(0.002)
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Reader:
    """The READER script in a mount namespace (entered with nsenter), always reaped."""

    def __init__(self, pid: int) -> None:
        self.proc = subprocess.Popen(
            ["nsenter", "-t", str(pid), "-m", sys.executable, "-c", READER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def wait_readable(self, path: Path) -> float:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if answer in ("timeout", ""):
            raise TimeoutError(f"{path} did not become readable")
        return float(answer)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wait_for_file(path: Path, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.01)


def s3fs_daemons(parent: int) -> set[int]:
    """The s3fs processes whose parent is ``parent`` (the agent runs its mounters as its
    children; other people's s3fs on a shared machine are not the agent's)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if (entry / "comm").read_text().strip() != "s3fs":
                    continue
                # The fields after the command's closing parenthesis: state, then ppid.
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                    found.add(int(entry.name))
    return found


async def create_dvm(
    custom: Any, namespace: str, dmp: str, cls: str, i: int, config: dict[str, Any], slot: Path,
    pod_uid: str,
) -> str:  # fmt: skip
    # The agent acts only on mounts whose claim exists (with that UID), as the node plugin
    # writes them.
    claim = await custom.create_namespaced_custom_object(
        c.GROUP, c.VERSION, namespace, c.PLURAL_CLAIM,
        {"apiVersion": c.API_VERSION, "kind": c.KIND_CLAIM, "metadata": {"name": f"claim-{i}"},
         "spec": {"selector": {"matchLabels": {"app": "bench"}}, "mountpoint": f"/m{i}",
                  "s3Config": config}},
    )  # fmt: skip
    dvm = DynamicVolumeMount(
        name=f"bench-{i}", namespace=namespace, labels={c.LABEL_DMP: label_value(dmp)},
        spec=MountSpec(
            claim_name=f"claim-{i}", claim_uid=claim["metadata"]["uid"], pod_name="pod",
            pod_uid=pod_uid, node_name="node", dmp_name=dmp, provider="s3",
            storage_provider_class=cls, config=config, mountpoint=f"/m{i}",
            slot_path=str(slot), dmp_target_path=f"{c.DMP_XVOLS_DIR}/m{i}",
        ),
    )  # fmt: skip
    await custom.create_namespaced_custom_object(
        c.GROUP, c.VERSION, namespace, c.PLURAL_MOUNT, dvm.to_object()
    )
    return dvm.name


def bare_s3fs(minio: MinioServer, bucket: str, work: Path, count: int) -> list[float]:
    """Mount the bucket with s3fs directly, ``count`` times: start -> file readable."""
    passwd = work / "passwd"
    passwd.write_text(f"{minio.access_key}:{minio.secret_key}\n")
    passwd.chmod(0o600)
    target = work / "floor"
    target.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    times = []
    for _ in range(count):
        start = time.monotonic()
        proc = Process.start(
            ["s3fs", bucket, str(target), "-f", "-o", f"url={minio.endpoint}", "-o",
             "endpoint=us-east-1", "-o", "allow_other", "-o", "connect_timeout=5", "-o",
             "retries=2", "-o", "dbglevel=warn", "-o", "nonempty", "-o",
             f"passwd_file={passwd}", "-o", "use_path_request_style"],
            name="s3fs-floor", env=env, log=work / "floor.log",
        )  # fmt: skip
        try:
            while True:
                try:
                    (target / "probe.txt").read_bytes()
                    break
                except OSError:
                    if time.monotonic() - start > 30:
                        raise TimeoutError("bare s3fs did not mount") from None
                    time.sleep(0.002)
            times.append(time.monotonic() - start)
        finally:
            subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)
            proc.stop(timeout=5)
    return times


def vm_rss_mib(pid: int) -> float:
    """The resident memory of process ``pid`` (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def mounter_parent(pid: int) -> int:
    """The process that starts the mounters: the agent, which ``unshare`` (``pid``) execs
    into, so the same PID unless ``unshare`` forked."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    with contextlib.suppress(OSError, ValueError):
        if Path(f"/proc/{pid}/comm").read_text().strip() == "unshare":
            return int(children.read_text().split()[0])
    return pid


async def wait_ready(port: int, started: float, within: float = 60.0) -> float:
    """Seconds from ``started`` until the agent's ``/readyz`` answers 200 (asked over a
    bare socket, so that the figure does not depend on the client under test)."""
    while time.monotonic() - started < within:
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                try:
                    writer.write(b"GET /readyz HTTP/1.1\r\nHost: bench\r\n\r\n")
                    await writer.drain()
                    status = await reader.readline()
                finally:
                    writer.close()
                if status.startswith(b"HTTP/1.1 200"):
                    return time.monotonic() - started
        await asyncio.sleep(0.005)
    raise TimeoutError(f"the agent was not ready within {within:g}s")


async def main(count: int, *, agent_log: Path | None = None) -> int:
    from kubernetes_asyncio import client, config

    with tempfile.TemporaryDirectory(prefix="dynvol-bench-dmp-") as tmp:
        base = Path(tmp)
        plane = ControlPlane(dir=base / "control-plane")
        minio = MinioServer(dir=base / "minio")
        procs: list[Process] = []
        reader: Reader | None = None
        rss: dict[int, float] = {}
        try:
            plane.start()
            minio.start()
            bucket = minio.make_bucket("bench")
            minio.client().put_object(Bucket=bucket, Key="probe.txt", Body=b"bench\n")
            configuration = client.Configuration()
            await config.load_kube_config(
                config_file=str(plane.kubeconfig), client_configuration=configuration
            )
            api = client.ApiClient(configuration=configuration)
            custom = client.CustomObjectsApi(api)
            namespace = "bench"
            await client.CoreV1Api(api).create_namespace({"metadata": {"name": namespace}})
            cls = "bench-s3"
            await custom.create_cluster_custom_object(
                c.GROUP, c.VERSION, c.PLURAL_CLASS,
                {"apiVersion": c.API_VERSION, "kind": c.KIND_CLASS, "metadata": {"name": cls},
                 "spec": {"provider": "s3", "parameters": {},
                          "connection": {"allowLoopback": True}}},
            )  # fmt: skip
            core = client.CoreV1Api(api)
            # The user pod and the mount pod, as the webhook and the node plugin make them:
            # the agent reads both before it mounts (dynvol_dmp.trust).
            user_pod = await core.create_namespaced_pod(namespace, {
                "metadata": {"name": "pod", "labels": {"app": "bench"}},
                "spec": {
                    "nodeName": "node", "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
                    "volumes": [{"name": c.VOLUME_NAME, "csi": {
                        "driver": c.DRIVER_NAME, "readOnly": True,
                        "volumeAttributes": {c.VOLUME_ATTR_CLASS: cls,
                                             c.VOLUME_ATTR_POLICY: c.POLICY_INDEPENDENT}}}],
                },
            })  # fmt: skip
            pod_uid = user_pod.metadata.uid
            with rshared_dir(base / "rshared") as root:
                slot = root / "xvols" / cls / str(uuid.uuid4()) / pod_uid
                slot.mkdir(parents=True)
                croot = base / "container-root"
                croot.mkdir()
                ready = base / "container.ready"
                container = Process.start(
                    ["unshare", "-m", "--propagation", "unchanged", "sh", "-c",
                     f"mount --bind '{slot}' '{croot}' && mount --make-rslave '{croot}' && "
                     f"touch '{ready}' && exec sleep 36000"],
                    name="container", log=base / "container.log",
                )  # fmt: skip
                procs.append(container)
                await asyncio.to_thread(wait_for_file, ready)
                secrets_dir = base / "secrets"
                secrets_dir.mkdir(mode=0o700)
                (secrets_dir / "access-key-id").write_text(minio.access_key)
                (secrets_dir / "secret-access-key").write_text(minio.secret_key)
                dmp = "bench-dmp"
                spec = DmpSpec(
                    name=dmp, namespace=c.DEFAULT_SYSTEM_NAMESPACE, node_name="node",
                    class_name=cls, policy=c.POLICY_INDEPENDENT,
                    image="registry.invalid/dynvol:bench", host_path=str(slot),
                    pod_namespace=namespace, pod_name="pod", pod_uid=pod_uid,
                )  # fmt: skip
                with contextlib.suppress(client.exceptions.ApiException):
                    await core.create_namespace({"metadata": {"name": spec.namespace}})
                await core.create_namespaced_pod(spec.namespace, dmp_pod_manifest(spec))
                log_level = "DEBUG" if agent_log is not None else "WARNING"
                env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
                port = free_port()
                agent_started = time.monotonic()
                agent = Process.start(
                    ["unshare", "-m", "--propagation", "unchanged", DYNVOL,
                     "--log-level", log_level, "dmp", "--name", dmp,
                     "--namespace", c.DEFAULT_SYSTEM_NAMESPACE, "--xvols", str(slot),
                     "--secrets-dir", str(secrets_dir), "--kubeconfig", str(plane.kubeconfig),
                     "--work-dir", str(base / "work"),
                     "--metrics-address", f"127.0.0.1:{port}"],
                    name="dynvol-dmp", env=env, log=base / "dmp.log",
                )  # fmt: skip
                procs.append(agent)
                ready_after = await wait_ready(port, agent_started)
                reader = Reader(container.pid)
                s3config = {"bucket": bucket, "endpoint": minio.endpoint}
                # One mount to warm up the agent (watch established, imports done).
                await create_dvm(custom, namespace, dmp, cls, 999, s3config, slot, pod_uid)
                reader.wait_readable(croot / "m999" / "probe.txt")
                rss[1] = vm_rss_mib(agent.pid)  # what one opted-in pod with one claim costs

                metrics_url = f"http://127.0.0.1:{port}"
                staged_before = await asyncio.to_thread(scrape, metrics_url)
                mount_times = []
                daemon_of: dict[int, int] = {}
                agent_pid = mounter_parent(agent.pid)
                for i in range(count):
                    before = s3fs_daemons(agent_pid)
                    start = time.monotonic()
                    await create_dvm(custom, namespace, dmp, cls, i, s3config, slot, pod_uid)
                    done = await asyncio.to_thread(
                        reader.wait_readable, croot / f"m{i}" / "probe.txt"
                    )
                    mount_times.append(done - start)
                    # The agent mounts at a staging directory and binds it onto the target,
                    # so s3fs names no target: the daemon new since the mount is this one's.
                    new = s3fs_daemons(agent_pid) - before
                    if len(new) == 1:
                        (daemon_of[i],) = new
                    else:  # e.g. a daemon that died and was restarted meanwhile
                        print(f"mount {i}: {len(new)} new s3fs, not repaired", file=sys.stderr)
                    if i + 2 == 10:  # ten mounts with the warm-up one
                        rss[10] = vm_rss_mib(agent.pid)
                rss[count + 1] = vm_rss_mib(agent.pid)
                staged_after = await asyncio.to_thread(scrape, metrics_url)
                stages = {}
                for stage in STAGES:
                    n = staged_after.get(
                        "dynvol_dmp_mount_stage_seconds_count", stage=stage
                    ) - staged_before.get("dynvol_dmp_mount_stage_seconds_count", stage=stage)
                    total = staged_after.get(
                        "dynvol_dmp_mount_stage_seconds_sum", stage=stage
                    ) - staged_before.get("dynvol_dmp_mount_stage_seconds_sum", stage=stage)
                    stages[stage] = total / n if n else math.nan
                repair_times = []
                for i, pid in sorted(daemon_of.items()):
                    start = time.monotonic()
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        print(f"mount {i}: its s3fs {pid} had gone already", file=sys.stderr)
                        continue
                    done = await asyncio.to_thread(
                        reader.wait_readable, croot / f"m{i}" / "probe.txt"
                    )
                    repair_times.append(done - start)
                reader.close()
                reader = None
                agent.stop(timeout=60)
                if agent_log is not None:
                    await asyncio.to_thread(shutil.copyfile, base / "dmp.log", agent_log)
                floor_times = bare_s3fs(minio, bucket, base, count)
                lazy_unmount_tree(root)
            await api.close()
        except BaseException:
            log = base / "dmp.log"
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-40:]
                print("the agent's log ended with:\n" + "\n".join(tail), file=sys.stderr)
            raise
        finally:
            if reader is not None:
                reader.close()
            for proc in reversed(procs):
                proc.stop(timeout=30)
            minio.stop()
            plane.stop()

    def ms(value: float) -> str:
        return f"{value * 1000:8.1f} ms"

    floor50 = statistics.median(floor_times)
    mount50 = statistics.median(mount_times)
    budget = 1.5 * floor50 + 0.100
    repair99 = percentile(repair_times, 99)
    rows = [
        ("DVM created -> readable in container", mount_times),
        ("kill -9 -> readable again (repair)", repair_times),
        ("bare s3fs mount -> readable (floor)", floor_times),
    ]
    print(
        f"dynvol DMP benchmark: {count} mounts, {len(repair_times)} repairs, "
        "s3fs against MinIO on 127.0.0.1"
    )
    print(f"{'':38}{'p50':>11}{'p99':>12}")
    for label, values in rows:
        print(f"{label:38}{ms(statistics.median(values))} {ms(percentile(values, 99))}")
    verdict = "met" if mount50 <= budget else "NOT met"
    print(
        f"ratio mount p50 / floor p50: {mount50 / floor50:.2f}x (goal: p50 <= 1.5 x floor + "
        f"100 ms = {budget * 1000:.1f} ms: {verdict})"
    )
    verdict = "met" if repair99 < 2.0 else "NOT met"
    print(f"repair p99 {repair99 * 1000:.1f} ms (goal < 2000 ms: {verdict})")
    mount_mean = statistics.fmean(mount_times)
    print(f"where a mount's time goes (means over the {count} mounts, from the agent's "
          "dynvol_dmp_mount_stage_seconds):")  # fmt: skip
    for stage, mean in stages.items():
        print(f"  {stage:36}{ms(mean)}")
    rest = mount_mean - sum(v for v in stages.values() if not math.isnan(v))
    print(f"  {'the rest (API, watch, queue, reader)':36}{ms(rest)}  of a mean {ms(mount_mean)}")
    print(f"agent start -> /readyz 200: {ready_after * 1000:.0f} ms")
    for mounts, mib in sorted(rss.items()):
        goal = ""
        if mounts == 10:
            verdict = "met" if mib <= AGENT_RSS_GOAL_MIB else "NOT met"
            goal = f" (goal <= {AGENT_RSS_GOAL_MIB:g} MiB: {verdict})"
        print(f"agent VmRSS with {mounts} mounts: {mib:.1f} MiB{goal} (FUSE daemons not counted)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument(
        "--agent-log", type=Path, default=None, help="keep the agent's DEBUG log at this path"
    )
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.count, agent_log=args.agent_log)))
