"""Latency of NodePublishVolume and NodeUnpublishVolume through the real socket.

Starts ``dynvol node --csi-only`` on a scratch root and kubelet directory, then runs N real
publish + unpublish pairs (real bind mounts, real record files with fsync) through a
grpclib client on the UNIX socket, and prints p50/p99 of each RPC as the client sees it.
Everything mounted is undone and the process stopped by PID at exit.

    sudo .venv/bin/python bench/bench_csi.py [--count 1000] [--concurrency 1]

Goal (issue 14): NodePublishVolume p99 < 20 ms; written to bench/results/latest.json as
``csi.publish.p99_ms``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from grpclib.client import Channel

from dynvol_core.mountinfo import entries_under, parse_mountinfo
from dynvol_csi._proto.csi import v1 as csi

sys.path.insert(0, str(Path(__file__).resolve().parent))
import goals

#: The published figures this benchmark writes (bench/goals.py).
KEYS = ("csi.publish.p99_ms",)


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return ordered[index]


def _unmount_all(base: Path) -> None:
    for _ in range(3):
        entries = entries_under(
            parse_mountinfo(Path("/proc/self/mountinfo").read_text()), str(base), include_self=True
        )
        if not entries:
            return
        for entry in sorted(entries, key=lambda e: len(e.path.parts), reverse=True):
            subprocess.run(["umount", "-l", entry.mount_point], capture_output=True, check=False)


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"dynvol node exited with {proc.returncode}:\n{log.read_text()}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(path))
                return
            except OSError:
                time.sleep(0.05)
    sys.exit("the node plugin did not come up within 30 s")


async def _run(args: argparse.Namespace, base: Path, sock: Path) -> None:
    kubelet = base / "kubelet"
    channel = Channel(path=str(sock))
    node = csi.NodeStub(channel)
    publish: list[float] = []
    unpublish: list[float] = []
    semaphore = asyncio.Semaphore(args.concurrency)

    async def one(i: int) -> None:
        pod_uid = str(uuid.uuid4())
        parent = kubelet / "pods" / pod_uid / "volumes" / "kubernetes.io~csi" / "dyn"
        parent.mkdir(parents=True)
        target = str(parent / "mount")
        request = csi.NodePublishVolumeRequest(
            volume_id=f"csi-{uuid.uuid4().hex}",
            target_path=target,
            readonly=i % 2 == 1,
            volume_capability=csi.VolumeCapability(mount=csi.VolumeCapabilityMountVolume()),
            volume_context={
                "csi.storage.k8s.io/pod.uid": pod_uid,
                "csi.storage.k8s.io/pod.name": f"bench-{i}",
                "csi.storage.k8s.io/pod.namespace": "default",
                "csi.storage.k8s.io/ephemeral": "true",
                "storageProviderClass": "bench",
                "mountPodDispatchPolicy": "independent",
            },
        )
        async with semaphore:
            t0 = time.perf_counter()
            await node.node_publish_volume(request)
            t1 = time.perf_counter()
            await node.node_unpublish_volume(
                csi.NodeUnpublishVolumeRequest(volume_id=request.volume_id, target_path=target)
            )
            t2 = time.perf_counter()
        publish.append((t1 - t0) * 1000)
        unpublish.append((t2 - t1) * 1000)
        shutil.rmtree(kubelet / "pods" / pod_uid)

    try:
        # Warm-up: first calls pay for imports and connection set-up.
        for i in range(5):
            await one(-1 - i)
        publish.clear()
        unpublish.clear()
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(args.count)))
        elapsed = time.perf_counter() - started
    finally:
        channel.close()

    print(f"{args.count} publish+unpublish pairs, concurrency {args.concurrency}, "
          f"{elapsed:.1f} s ({args.count / elapsed:.0f} pairs/s)")  # fmt: skip
    print(f"{'RPC':<22}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'max ms':>9}")
    for name, samples in (("NodePublishVolume", publish), ("NodeUnpublishVolume", unpublish)):
        print(
            f"{name:<22}{_percentile(samples, 50):>9.2f}{_percentile(samples, 99):>9.2f}"
            f"{statistics.fmean(samples):>9.2f}{max(samples):>9.2f}"
        )
    figures = {"csi.publish.p99_ms": round(_percentile(publish, 99), 2)}
    goals.print_verdicts(figures)
    goals.record(
        figures,
        benchmark="bench_csi",
        extra={
            "count": args.count,
            "concurrency": args.concurrency,
            "publish_p50_ms": round(_percentile(publish, 50), 2),
            "unpublish_p99_ms": round(_percentile(unpublish, 99), 2),
        },
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--keep-log", action="store_true", help="print the plugin's log path")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_csi: needs root (bind mounts)")

    base = Path(tempfile.mkdtemp(prefix="dynvol-bench-csi-"))
    sock = base / "csi.sock"
    log = base / "node.log"
    (base / "kubelet" / "pods").mkdir(parents=True)
    argv = [
        sys.executable, "-m", "dynvol", "--log-level", "WARNING", "node", "--csi-only",
        "--publish-guard", "off",
        "--endpoint", f"unix://{sock}", "--node-id", "bench-node", "--root", str(base / "root"),
        "--kubelet-dir", str(base / "kubelet"), "--registration-dir", "",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    status = 0
    try:
        _wait_for_socket(sock, proc, log)
        asyncio.run(_run(args, base, sock))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _unmount_all(base)
        if args.keep_log:
            kept = Path(tempfile.gettempdir()) / "dynvol-bench-csi.log"
            shutil.copy(log, kept)
            print(f"plugin log: {kept}")
        left = entries_under(
            parse_mountinfo(Path("/proc/self/mountinfo").read_text()), str(base), include_self=True
        )
        if left:
            print(f"mounts left under {base}; not deleting it", file=sys.stderr)
            status = 1
        else:
            shutil.rmtree(base, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
