"""Benchmark: node reconcilers and the cluster controller on a real apiserver.

Starts its own etcd + kube-apiserver (dynvol.testing.ControlPlane), binds opted-in pods to
made-up nodes (no kubelet), starts the node reconcilers and ``dynvol controller`` as
separate processes, then creates the claims and measures:

* the time from the first claim until every DynamicVolumeMount exists;
* the peak RSS (VmHWM) of one node reconciler process (serving one node) and of the
  cluster controller process;
* apiserver requests per pod (``apiserver_request_total`` from /metrics, before/after).

    .venv/bin/python bench/bench_controllers.py            # 100 nodes, 5000 pods, 200 claims
    .venv/bin/python bench/bench_controllers.py --nodes 10 --pods 500 --claims 20   # quick

The node reconcilers of the other nodes share a few worker processes (``--node-procs``),
because 100 Python processes would measure the machine, not dynvol; the dedicated
single-node process is the one whose memory is reported. Goal: converged within 60 s,
each process under 150 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dynvol.testing import ControlPlane, Process
from dynvol.testing.slots import node_reconciler_without_kubelet
from dynvol_controllers.admission import OptIn, injected_mount, injected_volume
from dynvol_core import constants as c
from dynvol_kube import APIConflict, Client, Informer
from dynvol_kube.resources import CLAIMS, CLASSES, MOUNTS, NAMESPACES, PODS, SECRETS

CLASS = "bench-s3"
SECRET_NS = "bench-secrets"


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB, from /proc."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


async def request_total(client: Client) -> tuple[float, dict[str, float]]:
    """Sum of apiserver_request_total, and the sums per (verb, resource) and per code."""
    text = await client.request("GET", "/metrics", request_timeout=60)
    total = 0.0
    by: dict[str, float] = {}
    pattern = re.compile(r"^apiserver_request_total\{(.*)\} ([0-9.e+]+)$")
    for line in text.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        value = float(m.group(2))
        total += value
        key = f"{labels.get('verb')} {labels.get('resource')}"
        by[key] = by.get(key, 0.0) + value
        code = f"code {labels.get('code')}"
        by[code] = by.get(code, 0.0) + value
    return total, by


async def gather_limited(coros: list[Any], limit: int) -> None:
    semaphore = asyncio.Semaphore(limit)

    async def one(coro: Any) -> None:
        async with semaphore:
            await coro

    await asyncio.gather(*(one(co) for co in coros))


async def create_ignoring_conflict(client: Client, resource: Any, body: Any, ns: str | None):
    with contextlib.suppress(APIConflict):
        await client.create(resource, body, namespace=ns)


# -- the node worker process ---------------------------------------------------------------


async def node_worker(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=os.environ.get("DYNVOL_BENCH_LOG", "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("kubernetes_asyncio").setLevel(logging.WARNING)
    # One client (connection pool) per node, as each node's ``dynvol node`` would have.
    clients = []
    reconcilers = []
    for node in args.nodes.split(","):
        client = await Client.from_kubeconfig(args.kubeconfig, user_agent="dynvol-bench-node")
        clients.append(client)
        reconcilers.append(
            node_reconciler_without_kubelet(
                client, node, dmp_delete_grace=0, shared_idle_grace=30, sync_timeout=300
            )
        )
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    try:
        await asyncio.gather(*(r.start() for r in reconcilers))
        Path(args.ready_file).touch()  # noqa: ASYNC240 - once, tiny
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        pass
    finally:
        await asyncio.gather(*(r.close() for r in reconcilers), return_exceptions=True)
        for client in clients:
            await client.close()
    return 0


# -- the driver ------------------------------------------------------------------------------


async def populate(client: Client, args: argparse.Namespace) -> list[str]:
    namespaces = [f"bench-{i}" for i in range(args.namespaces)]
    for ns in [c.DEFAULT_SYSTEM_NAMESPACE, SECRET_NS, *namespaces]:
        await create_ignoring_conflict(client, NAMESPACES, {"metadata": {"name": ns}}, None)
    await create_ignoring_conflict(
        client,
        SECRETS,
        {
            "metadata": {"name": "creds", "namespace": SECRET_NS},
            "stringData": {"access-key-id": "bench", "secret-access-key": "benchsecret"},
        },
        SECRET_NS,
    )
    await create_ignoring_conflict(
        client,
        CLASSES,
        {
            "apiVersion": c.API_VERSION,
            "kind": c.KIND_CLASS,
            "metadata": {"name": CLASS},
            "spec": {
                "provider": "s3",
                "parameters": {
                    c.PARAM_SECRET_NAME: "creds",
                    c.PARAM_SECRET_NAMESPACE: SECRET_NS,
                    c.PARAM_MOUNT_CPU_REQUEST: "10m",
                    c.PARAM_MOUNT_MEMORY_REQUEST: "50Mi",
                },
                # The claims point at 127.0.0.1.
                "connection": {"allowLoopback": True},
            },
        },
        None,
    )
    nodes = [f"node-{i:03d}" for i in range(args.nodes)]
    groups = args.claims
    coros = []
    for i in range(args.pods):
        ns = namespaces[i % len(namespaces)]
        group = i % groups
        policy = (
            c.POLICY_INDEPENDENT if (i * 37) % 100 < args.independent_percent else (c.POLICY_SHARED)
        )
        opt_in = OptIn(CLASS, "/dynamic", policy)
        body = {
            "metadata": {"name": f"pod-{i:05d}", "namespace": ns, "labels": {"group": f"g{group}"}},
            "spec": {
                "nodeName": nodes[i % len(nodes)],
                "terminationGracePeriodSeconds": 0,
                "containers": [
                    {
                        "name": "app",
                        "image": "registry.invalid/app:1",
                        "volumeMounts": [injected_mount(opt_in)],
                    }
                ],
                "volumes": [injected_volume(opt_in)],
            },
        }
        coros.append(create_ignoring_conflict(client, PODS, body, ns))
    await gather_limited(coros, 64)
    return nodes


def claim_body(k: int, args: argparse.Namespace) -> dict[str, Any]:
    ns = f"bench-{k % args.namespaces}"
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND_CLAIM,
        "metadata": {"name": f"claim-{k:03d}", "namespace": ns},
        "spec": {
            "storageProvider": "s3",
            "mountpoint": "/data",
            "s3Config": {"bucket": "bench", "endpoint": "http://127.0.0.1:9"},
            "selector": {"matchLabels": {"group": f"g{k}"}},
        },
    }


def expected_mounts(args: argparse.Namespace) -> int:
    # Pod i is in namespace i % N with label g(i % claims); claim k is in namespace k % N
    # and selects g(k): it matches pod i iff i % claims == k and i % N == k % N.
    count = 0
    for i in range(args.pods):
        k = i % args.claims
        if i % args.namespaces == k % args.namespaces:
            count += 1
    return count


async def driver(args: argparse.Namespace) -> int:
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    # etcd fsyncs every write; on a shared disk that, not dynvol, sets the pace. tmpfs keeps
    # the measurement about the controllers (use --workdir to measure a real disk).
    base = args.workdir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)  # noqa: ASYNC240
    workdir = Path(tempfile.mkdtemp(prefix="dynvol-bench-", dir=base))
    plane = ControlPlane(dir=workdir / "control-plane")
    print(f"bench: starting etcd + kube-apiserver in {workdir}", flush=True)
    plane.start()
    procs: list[Process] = []
    client = await Client.from_kubeconfig(str(plane.kubeconfig), user_agent="dynvol-bench")
    try:
        started = time.monotonic()
        nodes = await populate(client, args)
        print(
            f"bench: created {args.pods} pods on {len(nodes)} nodes in "
            f"{time.monotonic() - started:.1f}s",
            flush=True,
        )
        expected = expected_mounts(args)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        me = os.path.abspath(__file__)  # noqa: ASYNC240
        solo = nodes[0]
        rest = nodes[1:]
        chunks = [rest[i :: args.node_procs] for i in range(args.node_procs)] if rest else []
        ready_files = []
        for i, chunk in enumerate([[solo], *[ch for ch in chunks if ch]]):
            ready = workdir / f"node-worker-{i}.ready"
            ready_files.append(ready)
            procs.append(
                Process.start(
                    [
                        sys.executable,
                        me,
                        "node-worker",
                        "--kubeconfig",
                        str(plane.kubeconfig),
                        "--nodes",
                        ",".join(chunk),
                        "--ready-file",
                        str(ready),
                    ],
                    name=f"node-worker-{i}",
                    env=env,
                    log=workdir / f"node-worker-{i}.log",
                )
            )
        controller = Process.start(
            [
                sys.executable,
                "-m",
                "dynvol.cli",
                "--log-level",
                "WARNING",
                "controller",
                "--kubeconfig",
                str(plane.kubeconfig),
                "--no-webhooks",
                "--no-leader-elect",
            ],
            name="dynvol-controller",
            env=env,
            log=workdir / "controller.log",
        )
        procs.append(controller)
        deadline = time.monotonic() + 300
        while not all(f.exists() for f in ready_files):
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.name} exited early{p.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError("node workers did not get ready")
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)  # the controller's caches
        print(
            f"bench: {len(procs) - 1} node worker processes and the controller are ready",
            flush=True,
        )

        seen = asyncio.Event()
        watcher = Informer(client, MOUNTS, transform=lambda o: {"metadata": o["metadata"]})

        marks: dict[int, float] = {}

        def on_mount(_: Any) -> None:
            count = len(watcher.store)
            for quarter in (1, 2, 3, 4):
                if count >= expected * quarter // 4 and quarter not in marks:
                    marks[quarter] = round(time.monotonic() - t0, 2)
            if count >= expected:
                seen.set()

        watcher.add_handler(on_mount)
        before, before_by = await request_total(client)
        solo_pid = procs[0].pid
        peaks = {"node": 0, "controller": 0}

        async def sample() -> None:
            while True:
                for key, pid in (("node", solo_pid), ("controller", controller.pid)):
                    with contextlib.suppress(OSError):
                        peaks[key] = max(peaks[key], rss_kib(pid)[1])
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample())
        t0 = time.monotonic()
        await watcher.start()
        await gather_limited(
            [
                client.create(CLAIMS, claim_body(k, args), namespace=f"bench-{k % args.namespaces}")
                for k in range(args.claims)
            ],
            32,
        )
        claims_created = time.monotonic() - t0
        try:
            await asyncio.wait_for(seen.wait(), timeout=args.timeout)
            converged = time.monotonic() - t0
        except TimeoutError:
            converged = float("nan")
        # Let the claim status writes that follow settle before counting requests.
        await asyncio.sleep(args.settle)
        after, after_by = await request_total(client)
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        for key, pid in (("node", solo_pid), ("controller", controller.pid)):
            peaks[key] = max(peaks[key], rss_kib(pid)[1])
        await watcher.close()
        dmps = await client.list(PODS, namespace=c.DEFAULT_SYSTEM_NAMESPACE, limit=1)
        remaining = (dmps.get("metadata") or {}).get("remainingItemCount")
        dmp_count = (remaining or 0) + len(dmps.get("items") or [])
        delta = {k: after_by.get(k, 0) - before_by.get(k, 0) for k in after_by}
        codes = {k: int(v) for k, v in delta.items() if k.startswith("code ") and v}
        top = sorted(
            ((v, k) for k, v in delta.items() if v and not k.startswith("code ")), reverse=True
        )[:8]
        result = {
            "nodes": args.nodes,
            "pods": args.pods,
            "claims": args.claims,
            "mounts_expected": expected,
            "dmps": dmp_count,
            "claims_created_seconds": round(claims_created, 2),
            "mounts_at_25_50_75_100_percent_seconds": [marks.get(q) for q in (1, 2, 3, 4)],
            "converged_seconds": round(converged, 2),
            "node_reconciler_peak_rss_mib": round(peaks["node"] / 1024, 1),
            "controller_peak_rss_mib": round(peaks["controller"] / 1024, 1),
            "apiserver_requests": int(after - before),
            "apiserver_requests_per_pod": round((after - before) / args.pods, 2),
            "top_requests": {k: int(v) for v, k in top},
            "response_codes": codes,
            "load_average": os.getloadavg()[0],
        }
        print(json.dumps(result, indent=2))
        ok = converged <= 60 and peaks["node"] < 150 * 1024 and peaks["controller"] < 150 * 1024
        print(
            "bench: goal "
            + ("met" if ok else "NOT met")
            + " (converged <= 60 s, each process < 150 MiB)"
        )
        return 0
    finally:
        for p in reversed(procs):
            p.stop()
        await client.close()
        plane.stop()
        if not args.keep:
            plane.remove()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode")
    worker = sub.add_parser("node-worker", help="(internal) run node reconcilers")
    worker.add_argument("--kubeconfig", required=True)
    worker.add_argument("--nodes", required=True)
    worker.add_argument("--ready-file", required=True)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--pods", type=int, default=5000)
    parser.add_argument("--claims", type=int, default=200)
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument(
        "--node-procs",
        type=int,
        default=3,
        help="worker processes for the nodes other than the measured one",
    )
    parser.add_argument(
        "--independent-percent",
        type=int,
        default=50,
        help="share of pods with the independent policy (rest: shared)",
    )
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--settle", type=float, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the control plane's dir")
    parser.add_argument("--workdir", help="where etcd and the logs live (default: /dev/shm)")
    args = parser.parse_args()
    if args.mode == "node-worker":
        profile_to = os.environ.get("DYNVOL_BENCH_PROFILE")
        if profile_to:
            import cProfile

            profiler = cProfile.Profile()
            try:
                return profiler.runcall(asyncio.run, node_worker(args))
            finally:
                profiler.dump_stats(f"{profile_to}.{os.getpid()}")
        return asyncio.run(node_worker(args))
    return asyncio.run(driver(args))


if __name__ == "__main__":
    sys.exit(main())
