"""Benchmark: node reconcilers and the cluster controller on a real apiserver, at scale.

For each size of ``--sizes`` (default 100, 300, 500 and 1,000 nodes) it starts a fresh
etcd + kube-apiserver (dynvol.testing.ControlPlane), binds ``--pods-per-node`` (20)
opted-in pods per made-up node (no kubelet), starts the node reconcilers and ``dynvol
controller`` as separate processes, creates the claims (``shared`` policy) and measures:

* the time from the first claim until every DynamicVolumeMount exists;
* apiserver writes per mount, from the apiserver's own ``apiserver_request_total`` (by verb:
  POST, PUT, PATCH, DELETE, APPLY), before/after, less the bench's own claim creations;
* the peak RSS (VmHWM) of the controller process (the 500-node size has 10,000 pods: that
  is ``mem.controller_mib``) and of the node reconciler process serving one node.

Claims scale with the cluster: ``--claims-per-1000-nodes`` (500) claims at 1,000 nodes, 50 at
100 nodes, so every claim selects 40 pods at every size and the curve shows what the number
of nodes and pods costs, not a change of fan-out. Every pod is matched by exactly one claim:
mounts = pods.

Besides, a real ``dynvol node`` process (CSI node plugin + node reconciler) serves
``--plugin-pods`` (200) opted-in pods on its own node: each gets a real NodePublishVolume
through the plugin's socket (a real bind mount), one claim selects them all, and its RSS is
read once the 200 mounts exist (``mem.node_plugin_mib``).

    .venv/bin/python bench/bench_controllers.py                    # the full curve
    .venv/bin/python bench/bench_controllers.py --sizes 10 --plugin-pods 20   # quick

The node reconcilers of all nodes but one share a few worker processes (``--node-procs``),
because 1,000 Python processes would measure the machine, not dynvol. A size that does not
converge within ``--timeout`` is reported as such, with how far it got, and the larger sizes
are not tried.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import attrs

from dynvol.testing import ControlPlane, Process
from dynvol.testing.slots import node_reconciler_without_kubelet
from dynvol_controllers.admission import OptIn, injected_mount, injected_volume, opt_in_annotations
from dynvol_core import constants as c
from dynvol_core.mountinfo import entries_under, parse_mountinfo
from dynvol_kube import APIConflict, APIError, Client, Informer
from dynvol_kube.resources import CLAIMS, CLASSES, MOUNTS, NAMESPACES, PODS, SECRETS

sys.path.insert(0, str(Path(__file__).resolve().parent))
import goals

#: The published figures this benchmark writes (bench/goals.py).
KEYS = (
    "mem.node_plugin_mib",
    "mem.controller_mib",
    "scale.nodes",
    "scale.pods",
    "scale.converged_s",
    "scale.writes_per_mount",
)

CLASS = "bench-s3"
SECRET_NS = "bench-secrets"
#: Verbs of apiserver_request_total that change state.
WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE", "DELETECOLLECTION", "APPLY"})
#: The size whose controller memory is published (10,000 pods at 20 per node).
CONTROLLER_MEMORY_PODS = 10_000


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB, from /proc."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


#: apiserver/etcd metric families whose change over a size's measurement is reported (the
#: breakdown of where the apiserver's time and requests go), and the labels kept of each.
BREAKDOWN_FAMILIES: dict[str, tuple[str, ...]] = {
    "apiserver_request_duration_seconds_sum": ("verb", "resource"),
    "apiserver_request_duration_seconds_count": ("verb", "resource"),
    "apiserver_terminated_watchers_total": ("resource",),
    "apiserver_watch_events_total": ("kind", "resource"),
    "apiserver_watch_events_sizes_sum": ("kind", "resource"),
    "apiserver_watch_cache_events_dispatched_total": ("resource",),
    "apiserver_watch_cache_initializations_total": ("resource",),
    "apiserver_init_events_total": ("resource",),
    "apiserver_request_terminations_total": ("verb", "resource", "code"),
    "apiserver_flowcontrol_rejected_requests_total": ("priority_level", "reason"),
    "apiserver_cache_list_returned_objects_total": ("resource_prefix",),
    "apiserver_cache_list_fetched_objects_total": ("resource_prefix",),
    "etcd_request_duration_seconds_sum": ("operation", "type"),
    "etcd_request_duration_seconds_count": ("operation", "type"),
}
#: Gauges reported as they are at the end (open watches and long requests).
BREAKDOWN_GAUGES: dict[str, tuple[str, ...]] = {
    "apiserver_longrunning_requests": ("verb", "resource"),
    "apiserver_registered_watchers": ("kind", "resource"),
}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ([-0-9.e+naNIf]+)$")


async def metrics_text(client: Client) -> str:
    """The apiserver's /metrics (a busy apiserver at 1,000 nodes can take long: retried)."""
    for attempt in range(3):
        try:
            text: str = await client.request("GET", "/metrics", request_timeout=180)
            return text
        except Exception:
            if attempt == 2:
                raise
            await asyncio.sleep(5)
    raise AssertionError("unreachable")


def parse_families(text: str, families: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """The samples of ``families`` summed by the labels kept: ``name{a=x,b=y}`` -> value."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _SAMPLE.match(line)
        if not m or m.group(1) not in families:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        kept = ",".join(f"{k}={labels[k]}" for k in families[m.group(1)] if labels.get(k))
        key = f"{m.group(1)}{{{kept}}}"
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def request_counts_of(text: str) -> dict[tuple[str, str, str, str], float]:
    """apiserver_request_total per (verb, resource, subresource, code)."""
    counts: dict[tuple[str, str, str, str], float] = {}
    pattern = re.compile(r"^apiserver_request_total\{(.*)\} ([0-9.e+]+)$")
    for line in text.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        key = (
            labels.get("verb", ""),
            labels.get("resource", ""),
            labels.get("subresource", ""),
            labels.get("code", ""),
        )
        counts[key] = counts.get(key, 0.0) + float(m.group(2))
    return counts


async def request_counts(client: Client) -> dict[tuple[str, str, str, str], float]:
    """apiserver_request_total per (verb, resource, subresource, code), from /metrics."""
    return request_counts_of(await metrics_text(client))


@attrs.frozen
class Snapshot:
    """The apiserver's metrics and the processes' CPU times at one moment."""

    text: str
    cpu: dict[str, float]
    at: float


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    out = {name: cpu_seconds(pid) for name, pid in pids.items()}
    times = os.times()
    out["bench driver"] = times.user + times.system
    return out


def breakdown(
    before_text: str,
    after_text: str,
    cpu_before: dict[str, float],
    cpu_after: dict[str, float],
    seconds: float,
) -> dict[str, Any]:
    """Where the measured window's time and requests went, from the apiserver's metrics
    and the processes' CPU times."""
    b = parse_families(before_text, BREAKDOWN_FAMILIES)
    a = parse_families(after_text, BREAKDOWN_FAMILIES)
    delta = {k: v - b.get(k, 0.0) for k, v in a.items() if abs(v - b.get(k, 0.0)) > 1e-9}
    out: dict[str, Any] = {
        "window_seconds": round(seconds, 2),
        "cpu_seconds": {
            k: round(cpu_after.get(k, 0.0) - v, 1) for k, v in sorted(cpu_before.items())
        },
    }
    # Mean latency and total time per verb/resource (requests and etcd operations).
    for prefix, label in (
        ("apiserver_request_duration_seconds", "apiserver_seconds"),
        ("etcd_request_duration_seconds", "etcd_seconds"),
    ):
        table = {}
        for key, total in delta.items():
            if not key.startswith(prefix + "_sum"):
                continue
            labels = key[len(prefix) + 4 :]
            count = delta.get(f"{prefix}_count{labels}", 0.0)
            if count:
                table[labels.strip("{}")] = {
                    "count": int(count),
                    "total_s": round(total, 1),
                    "mean_ms": round(1000 * total / count, 1),
                }
        out[label] = dict(sorted(table.items(), key=lambda kv: -kv[1]["total_s"])[:12])
    out["counters"] = {
        k: round(v, 1) for k, v in sorted(delta.items()) if "duration_seconds" not in k
    }
    gauges = parse_families(after_text, BREAKDOWN_GAUGES)
    out["gauges_at_end"] = {k: v for k, v in sorted(gauges.items()) if v}
    return out


def count_delta(
    before: dict[tuple[str, str, str, str], float], after: dict[tuple[str, str, str, str], float]
) -> dict[tuple[str, str, str, str], int]:
    return {k: int(v - before.get(k, 0.0)) for k, v in after.items() if v - before.get(k, 0.0)}


def writes_of(delta: dict[tuple[str, str, str, str], int]) -> int:
    return sum(v for (verb, _, _, _), v in delta.items() if verb in WRITE_VERBS)


async def gather_limited(coros: list[Any], limit: int) -> list[Any]:
    semaphore = asyncio.Semaphore(limit)

    async def one(coro: Any) -> Any:
        async with semaphore:
            return await coro

    return await asyncio.gather(*(one(co) for co in coros))


async def create_ignoring_conflict(client: Client, resource: Any, body: Any, ns: str | None) -> Any:
    """Create; a name taken is fine, and a transport error or a 5xx (an overloaded
    apiserver at the largest sizes) is retried a few times (a retry that finds the object
    is a conflict)."""
    attempts = 8
    for attempt in range(attempts):
        try:
            # A patient timeout: at 1,000 nodes the apiserver answers a create in minutes.
            return await client.request(
                "POST", resource.path(namespace=ns or body.get("metadata", {}).get("namespace")),
                body=dict(body), request_timeout=120,
            )  # fmt: skip
        except APIConflict:
            return None
        except APIError as exc:
            # A transport error or a 5xx of an overloaded apiserver (a quota evaluation
            # that timed out, say): try again; if it landed, the retry is a conflict.
            if (exc.status is not None and exc.status < 500) or attempt == attempts - 1:
                raise
            await asyncio.sleep(2)
    return None


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
                client, node, dmp_delete_grace=0, shared_idle_grace=30, sync_timeout=600
            )
        )
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    try:
        await asyncio.gather(*(r.start() for r in reconcilers))
        Path(args.ready_file).touch()  # noqa: ASYNC240 - once, tiny
        while True:
            write_worker_stats(Path(args.ready_file).with_suffix(".stats.json"), reconcilers)
            await asyncio.sleep(2)
    except asyncio.CancelledError:
        pass
    finally:
        await asyncio.gather(*(r.close() for r in reconcilers), return_exceptions=True)
        for client in clients:
            await client.close()
    return 0


def write_worker_stats(path: Path, reconcilers: list[Any]) -> None:
    """How this worker's informers and reconcilers fared (read by :func:`worker_reports`)."""
    stats: dict[str, Any] = {"passes": 0, "results": {}, "informers": {}}
    for r in reconcilers:
        stats["passes"] += r.passes
        for result, n in r.controller.counts.items():
            stats["results"][result] = stats["results"].get(result, 0) + n
        view = r.view
        for role, informer in (("pods", view.pods), ("claims", view.claims),
                               ("classes", view.classes), ("mounts", view.mounts),
                               ("dmps", view.dmps)):  # fmt: skip
            entry = stats["informers"].setdefault(
                role, {"relists": 0, "lists": 0, "watch_ends": {}}
            )
            entry["relists"] += informer.relists
            entry["lists"] += informer.lists  # the mounts are listed, not watched
            for why, n in informer.watch_ends.items():
                entry["watch_ends"][why] = entry["watch_ends"].get(why, 0) + n
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats))
    tmp.replace(path)


_FAILED = re.compile(r"first: (?:POST|PUT|PATCH|DELETE|GET) \S+: (.*?)\); retrying")


def node_errors(workdir: Path) -> dict[str, int]:
    """The node reconcilers' failed passes by the first error's message (from their logs)."""
    counts: dict[str, int] = {}
    for log in workdir.glob("node-worker-*.log"):
        with contextlib.suppress(OSError):
            for m in _FAILED.finditer(log.read_text(errors="replace")):
                message = re.sub(r"bench-\d+|node-\d+|claim-\d+|pod-\d+", "*", m.group(1))
                counts[message[:120]] = counts.get(message[:120], 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:10])


def worker_reports(workdir: Path) -> dict[str, Any]:
    """The node workers' stats summed: relists and watch ends per informer, passes."""
    total: dict[str, Any] = {"passes": 0, "results": {}, "informers": {}}
    for f in sorted(workdir.glob("node-worker-*.stats.json")):
        with contextlib.suppress(OSError, ValueError):
            stats = json.loads(f.read_text())
            total["passes"] += stats["passes"]
            for k, n in stats["results"].items():
                total["results"][k] = total["results"].get(k, 0) + n
            for role, entry in stats["informers"].items():
                t = total["informers"].setdefault(role, {"relists": 0, "watch_ends": {}})
                t["relists"] += entry["relists"]
                for why, n in entry["watch_ends"].items():
                    t["watch_ends"][why] = t["watch_ends"].get(why, 0) + n
    return total


# -- the objects -------------------------------------------------------------------------------


async def base_objects(client: Client, namespaces: list[str]) -> None:
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


def pod_body(name: str, node: str, group: str, policy: str) -> dict[str, Any]:
    opt_in = OptIn(CLASS, "/dynamic", policy)
    return {
        "metadata": {
            "name": name,
            "labels": {"group": group},
            "annotations": opt_in_annotations(opt_in),
        },
        "spec": {
            "nodeName": node,
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


def claim_body(name: str, ns: str, group: str) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND_CLAIM,
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "storageProvider": "s3",
            "mountpoint": "/data",
            "s3Config": {"bucket": "bench", "endpoint": "http://127.0.0.1:9"},
            "selector": {"matchLabels": {"group": group}},
        },
    }


@contextlib.asynccontextmanager
async def control_plane(args: argparse.Namespace, label: str) -> Any:
    # etcd fsyncs every write; on a shared disk that, not dynvol, sets the pace. tmpfs keeps
    # the measurement about the controllers (use --workdir to measure a real disk).
    base = args.workdir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)  # noqa: ASYNC240
    workdir = Path(tempfile.mkdtemp(prefix=f"dynvol-bench-{label}-", dir=base))
    flags = ("--profiling=true",) if args.apiserver_profile else ()
    plane = ControlPlane(dir=workdir / "control-plane", extra_apiserver_flags=flags)
    print(f"bench: [{label}] starting etcd + kube-apiserver in {workdir}", flush=True)
    plane.start()
    client = await Client.from_kubeconfig(str(plane.kubeconfig), user_agent="dynvol-bench")
    try:
        yield plane, client, workdir
    finally:
        await client.close()
        plane.stop()
        if not args.keep:
            plane.remove()
            if not entries_under(
                parse_mountinfo(Path("/proc/self/mountinfo").read_text()),  # noqa: ASYNC240
                str(workdir),
            ):
                shutil.rmtree(workdir, ignore_errors=True)


def start_controller(plane: ControlPlane, workdir: Path) -> Process:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    profile = os.environ.get("DYNVOL_BENCH_CONTROLLER_PROFILE")
    prefix = [sys.executable, "-m", "cProfile", "-o", profile] if profile else [sys.executable]
    return Process.start(
        [*prefix, "-m", "dynvol.cli", "--log-level", "WARNING", "controller",
         "--kubeconfig", str(plane.kubeconfig), "--no-webhooks", "--no-leader-elect"],
        name="dynvol-controller", env=env, log=workdir / "controller.log",
    )  # fmt: skip


class Peaks:
    """Samples VmHWM of some processes every half second (peaks survive the process)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.kib = dict.fromkeys(pids, 0)
        self.task: asyncio.Task[None] | None = None

    def read(self) -> None:
        for key, pid in self.pids.items():
            with contextlib.suppress(OSError):
                self.kib[key] = max(self.kib[key], rss_kib(pid)[1])

    async def _loop(self) -> None:
        while True:
            self.read()
            await asyncio.sleep(0.5)

    def start(self) -> None:
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> dict[str, float]:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.read()
        return {k: round(v / 1024, 1) for k, v in self.kib.items()}


class MountCounter:
    """Watches DynamicVolumeMounts; ``reached`` is set once ``expected`` exist."""

    def __init__(self, client: Client, expected: int) -> None:
        self.expected = expected
        self.reached = asyncio.Event()
        self.marks: dict[int, float] = {}
        self.t0 = time.monotonic()
        self.wall_t0 = time.time()
        self.watcher = Informer(client, MOUNTS, transform=lambda o: {"metadata": o["metadata"]})
        self.watcher.add_handler(self._on_mount)

    def _on_mount(self, _: Any) -> None:
        count = len(self.watcher.store)
        for quarter in (1, 2, 3, 4):
            if count >= self.expected * quarter // 4 and quarter not in self.marks:
                self.marks[quarter] = round(time.monotonic() - self.t0, 2)
        if count >= self.expected:
            self.reached.set()

    @property
    def count(self) -> int:
        return len(self.watcher.store)

    def created_seconds(self) -> list[float]:
        """When the apiserver created the mounts (``creationTimestamp``, whole seconds),
        from the first claim: what the watch of them adds to the time is the rest."""
        out = []
        for obj in self.watcher.store:
            stamp = obj["metadata"].get("creationTimestamp")
            if stamp:
                at = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
                out.append(at - self.wall_t0)
        return sorted(out)


# -- one size of the scale curve ---------------------------------------------------------------


def claims_for(nodes: int, args: argparse.Namespace) -> int:
    # A multiple of the namespace count, so that every pod is selected by one claim.
    wanted = max(1, round(nodes * args.claims_per_1000_nodes / 1000 / args.namespaces))
    return wanted * args.namespaces


async def run_size(args: argparse.Namespace, nodes_count: int) -> dict[str, Any]:
    pods_count = nodes_count * args.pods_per_node
    claims = claims_for(nodes_count, args)
    namespaces = [f"bench-{i}" for i in range(args.namespaces)]
    row: dict[str, Any] = {"nodes": nodes_count, "pods": pods_count, "claims": claims}
    async with control_plane(args, f"{nodes_count}n") as (plane, client, workdir):
        procs: list[Process] = []
        try:
            await base_objects(client, namespaces)
            nodes = [f"node-{i:04d}" for i in range(nodes_count)]
            started = time.monotonic()
            # Pod i: node i % nodes, namespace i % N, label g(i % claims); claim k lives in
            # namespace k % N and selects g(k). claims is a multiple of N: one claim each.
            coros = []
            for i in range(pods_count):
                ns = namespaces[i % len(namespaces)]
                body = pod_body(
                    f"pod-{i:05d}", nodes[i % nodes_count], f"g{i % claims}", c.POLICY_SHARED
                )
                coros.append(create_ignoring_conflict(client, PODS, body, ns))
            await gather_limited(coros, 64)
            row["populate_seconds"] = round(time.monotonic() - started, 1)
            print(
                f"bench: [{nodes_count}n] created {pods_count} pods on {nodes_count} nodes in "
                f"{row['populate_seconds']}s",
                flush=True,
            )
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            me = os.path.abspath(__file__)  # noqa: ASYNC240
            rest = nodes[1:]
            chunks = [rest[i :: args.node_procs] for i in range(args.node_procs)] if rest else []
            ready_files = []
            started = time.monotonic()
            for i, chunk in enumerate([[nodes[0]], *[ch for ch in chunks if ch]]):
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
            controller = start_controller(plane, workdir)
            procs.append(controller)
            peaks = Peaks({"node": procs[0].pid, "controller": controller.pid})
            peaks.start()
            deadline = time.monotonic() + args.timeout
            while not all(f.exists() for f in ready_files):
                for p in procs:
                    if p.poll() is not None:
                        raise RuntimeError(f"{p.name} exited early{p.log_tail()}")
                if time.monotonic() > deadline:
                    row["stopped"] = (
                        f"node reconcilers not synced after {args.timeout:.0f}s "
                        f"({sum(f.exists() for f in ready_files)}/{len(ready_files)} workers)"
                    )
                    row["peak_rss_mib"] = await peaks.stop()
                    return row
                await asyncio.sleep(0.2)
            row["reconcilers_ready_seconds"] = round(time.monotonic() - started, 1)
            await asyncio.sleep(2)  # the controller's caches
            print(
                f"bench: [{nodes_count}n] {len(procs) - 1} node worker processes and the "
                f"controller are ready after {row['reconcilers_ready_seconds']}s",
                flush=True,
            )
            pids = {"etcd": plane.etcd.pid, "kube-apiserver": plane.apiserver.pid}
            pids.update({p.name: p.pid for p in procs})
            before = Snapshot(await metrics_text(client), cpu_of(pids), time.monotonic())
            counter = MountCounter(client, pods_count)
            try:
                return await measure_size(
                    args, client, row, counter, peaks, before, claims, pids, workdir, plane
                )
            except Exception as exc:
                row["stopped"] = f"{exc!r} with {counter.count} of {pods_count} mounts"
                row["mounts_at_25_50_75_100_percent_seconds"] = [
                    counter.marks.get(q) for q in (1, 2, 3, 4)
                ]
                row["peak_rss_mib"] = await peaks.stop()
                with contextlib.suppress(Exception):
                    await counter.watcher.close()
                return row
        finally:
            for p in reversed(procs):
                p.stop()


async def measure_size(
    args: argparse.Namespace,
    client: Client,
    row: dict[str, Any],
    counter: MountCounter,
    peaks: Peaks,
    before: Snapshot,
    claims: int,
    pids: dict[str, int],
    workdir: Path,
    plane: ControlPlane,
) -> dict[str, Any]:
    """Create the claims, wait for every mount, count the requests."""
    namespaces = [f"bench-{i}" for i in range(args.namespaces)]
    pods_count = row["pods"]
    await counter.watcher.start()
    await gather_limited(
        [
            create_ignoring_conflict(
                client, CLAIMS, claim_body(f"claim-{k:03d}", namespaces[k % len(namespaces)],
                                           f"g{k}"),
                namespaces[k % len(namespaces)],
            )
            for k in range(claims)
        ],
        32,
    )  # fmt: skip
    row["claims_created_seconds"] = round(time.monotonic() - counter.t0, 2)
    profile = None
    if args.apiserver_profile:
        profile = asyncio.create_task(
            apiserver_profile(plane, Path(args.apiserver_profile), row["nodes"])
        )
    try:
        await asyncio.wait_for(counter.reached.wait(), timeout=args.timeout)
        converged = time.monotonic() - counter.t0
    except TimeoutError:
        converged = math.nan
        row["stopped"] = f"{counter.count} of {pods_count} mounts after {args.timeout:.0f}s"
    # Let the claim status writes that follow settle before counting requests.
    cpu_converged, converged_at = cpu_of(pids), time.monotonic()
    if profile is not None:
        with contextlib.suppress(Exception):
            await profile
    await asyncio.sleep(args.settle)
    after = Snapshot(await metrics_text(client), cpu_of(pids), time.monotonic())
    if args.idle_seconds and row["nodes"] == args.idle_at:
        row["idle"] = await measure_idle(args, client, pids)
    mounts = counter.count
    created = counter.created_seconds()
    if created:
        row["mounts_created_25_50_75_100_percent_seconds"] = [
            round(created[max(0, len(created) * q // 4 - 1)], 1) for q in (1, 2, 3, 4)
        ]
    await counter.watcher.close()
    row["peak_rss_mib"] = await peaks.stop()
    delta = count_delta(request_counts_of(before.text), request_counts_of(after.text))
    row["breakdown"] = breakdown(
        before.text, after.text, before.cpu, cpu_converged, converged_at - before.at
    )
    row["breakdown"]["node_workers"] = worker_reports(workdir)
    row["breakdown"]["node_failed_passes"] = node_errors(workdir)
    # The bench's own writes: the claims it created.
    dynvol_writes = writes_of(delta) - claims
    top = sorted(((v, " ".join(p for p in k if p)) for k, v in delta.items()), reverse=True)[:10]
    row.update(
        {
            "mounts": mounts,
            "converged_seconds": round(converged, 2),
            "mounts_at_25_50_75_100_percent_seconds": [counter.marks.get(q) for q in (1, 2, 3, 4)],
            "apiserver_requests": sum(delta.values()),
            "apiserver_writes": dynvol_writes,
            "writes_per_mount": round(dynvol_writes / mounts, 3) if mounts else None,
            "writes_by_verb_resource": {
                " ".join(p for p in k if p): v
                for k, v in sorted(delta.items())
                if k[0] in WRITE_VERBS
            },
            "top_requests": {k: v for v, k in top},
            "load_average": round(os.getloadavg()[0], 2),
        }
    )
    return row


async def measure_idle(
    args: argparse.Namespace, client: Client, pids: dict[str, int]
) -> dict[str, Any]:
    """What the converged cluster costs while nothing changes: the processes' CPU and the
    requests over ``--idle-seconds`` (the nodes' periodic lists of their mounts among them)."""
    print(f"bench: measuring {args.idle_seconds:.0f}s of idle", flush=True)
    before = Snapshot(await metrics_text(client), cpu_of(pids), time.monotonic())
    await asyncio.sleep(args.idle_seconds)
    after = Snapshot(await metrics_text(client), cpu_of(pids), time.monotonic())
    seconds = after.at - before.at
    cpu = {k: round(after.cpu.get(k, 0.0) - v, 1) for k, v in sorted(before.cpu.items())}
    delta = count_delta(request_counts_of(before.text), request_counts_of(after.text))
    requests = {" ".join(p for p in k if p): v for k, v in sorted(delta.items()) if v}
    return {
        "seconds": round(seconds, 1),
        "cpu_seconds": cpu,
        "apiserver_cores": round(cpu.get("kube-apiserver", 0.0) / seconds, 3),
        "requests": requests,
    }


async def apiserver_profile(plane: ControlPlane, path: Path, nodes: int) -> None:
    """A CPU profile of the apiserver over the first 30 s after the claims were created
    (``go tool pprof -top kube-apiserver FILE`` reads it)."""
    import ssl

    import aiohttp

    context = ssl.create_default_context(cafile=str(plane.ca_file))
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{plane.server}/debug/pprof/profile?seconds=30",
            headers={"Authorization": f"Bearer {plane.token}"},
            ssl=context,
            timeout=aiohttp.ClientTimeout(total=180),
        ) as response,
    ):
        data = await response.read()
    out = path.with_name(f"{path.stem}-{nodes}n{path.suffix}")
    out.write_bytes(data)
    print(f"bench: [{nodes}n] apiserver CPU profile in {out} ({response.status})", flush=True)


# -- the real node plugin with many pods ---------------------------------------------------------


def unmount_all(base: Path) -> None:
    for _ in range(3):
        mountinfo = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
        entries = entries_under(mountinfo, str(base), include_self=False)
        if not entries:
            return
        for entry in sorted(entries, key=lambda e: len(e.path.parts), reverse=True):
            subprocess.run(["umount", "-l", entry.mount_point], capture_output=True, check=False)


async def run_node_plugin(args: argparse.Namespace) -> dict[str, Any]:
    """RSS of ``dynvol node`` (CSI plugin + reconciler) with ``--plugin-pods`` pods on it."""
    from grpclib.client import Channel

    from dynvol_csi._proto.csi import v1 as csi

    count = args.plugin_pods
    node = "plugin-node"
    row: dict[str, Any] = {"pods": count}
    async with control_plane(args, "plugin") as (plane, client, workdir):
        ns = "bench-plugin"
        await base_objects(client, [ns])
        created = await gather_limited(
            [
                client.create(
                    PODS, pod_body(f"pod-{i:04d}", node, "all", c.POLICY_SHARED), namespace=ns
                )
                for i in range(count)
            ],
            32,
        )
        kubelet = workdir / "kubelet"
        (kubelet / "pods").mkdir(parents=True)
        sock = workdir / "csi.sock"
        plugin = Process.start(
            [sys.executable, "-m", "dynvol", "--log-level", "WARNING", "node",
             "--endpoint", f"unix://{sock}", "--node-id", node, "--root",
             str(workdir / "root"), "--kubelet-dir", str(kubelet), "--registration-dir", "",
             "--kubeconfig", str(plane.kubeconfig), "--dmp-image", "localhost/dynvol/dynvol:dev"],
            name="dynvol-node", env={**os.environ, "PYTHONUNBUFFERED": "1"},
            log=workdir / "node.log",
        )  # fmt: skip
        controller = start_controller(plane, workdir)
        channel: Channel | None = None
        try:
            deadline = time.monotonic() + 60
            while not sock.exists():
                if plugin.poll() is not None:
                    raise RuntimeError(f"dynvol node exited early{plugin.log_tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError("dynvol node did not open its socket in 60 s")
                await asyncio.sleep(0.1)
            channel = Channel(path=str(sock))
            stub = csi.NodeStub(channel)
            started = time.monotonic()
            publish_ms = []
            for pod in created:
                meta = pod["metadata"]
                target = (
                    kubelet / "pods" / meta["uid"] / "volumes" / "kubernetes.io~csi"
                    / c.VOLUME_NAME / "mount"
                )  # fmt: skip
                target.parent.mkdir(parents=True)
                t0 = time.perf_counter()
                await stub.node_publish_volume(
                    csi.NodePublishVolumeRequest(
                        volume_id=f"csi-{uuid.uuid4().hex}",
                        target_path=str(target),
                        readonly=True,
                        volume_capability=csi.VolumeCapability(
                            mount=csi.VolumeCapabilityMountVolume()
                        ),
                        volume_context={
                            "csi.storage.k8s.io/pod.uid": meta["uid"],
                            "csi.storage.k8s.io/pod.name": meta["name"],
                            "csi.storage.k8s.io/pod.namespace": ns,
                            "csi.storage.k8s.io/ephemeral": "true",
                            c.VOLUME_ATTR_CLASS: CLASS,
                            c.VOLUME_ATTR_POLICY: c.POLICY_SHARED,
                        },
                    )
                )
                publish_ms.append((time.perf_counter() - t0) * 1000)
            row["publish_seconds"] = round(time.monotonic() - started, 2)
            row["publish_p99_ms"] = round(sorted(publish_ms)[int(0.99 * (len(publish_ms) - 1))], 2)
            counter = MountCounter(client, count)
            await counter.watcher.start()
            await client.create(CLAIMS, claim_body("claim-all", ns, "all"), namespace=ns)
            try:
                await asyncio.wait_for(counter.reached.wait(), timeout=args.timeout)
                row["converged_seconds"] = round(time.monotonic() - counter.t0, 2)
            except TimeoutError:
                row["stopped"] = f"{counter.count} of {count} mounts after {args.timeout:.0f}s"
            await counter.watcher.close()
            await asyncio.sleep(args.settle)
            rss, hwm = rss_kib(plugin.pid)
            row["mounts"] = counter.count
            row["node_plugin_rss_mib"] = round(rss / 1024, 1)
            row["node_plugin_peak_rss_mib"] = round(hwm / 1024, 1)
            return row
        finally:
            if channel is not None:
                channel.close()
            controller.stop()
            plugin.stop()
            unmount_all(workdir)


# -- the driver ------------------------------------------------------------------------------------


async def driver(args: argparse.Namespace) -> int:
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    args.idle_at = max(sizes, default=0)
    rows: list[dict[str, Any]] = []
    for nodes in sizes:
        try:
            row = await run_size(args, nodes)
        except Exception as exc:
            row = {"nodes": nodes, "pods": nodes * args.pods_per_node, "stopped": repr(exc)}
        rows.append(row)
        print(json.dumps(row, indent=2), flush=True)
        if "stopped" in row:
            print(f"bench: the curve stops at {nodes} nodes: {row['stopped']}", flush=True)
            break
    # A run of some sizes updates those rows of the curve and keeps the others.
    previous = (goals.load().get("extra") or {}).get("bench_controllers") or {}
    if not args.no_record:
        by_nodes = {r["nodes"]: r for r in previous.get("sizes") or []}
        by_nodes.update({r["nodes"]: r for r in rows})
        rows = [by_nodes[n] for n in sorted(by_nodes)]
    plugin = await run_node_plugin(args) if args.plugin_pods else previous.get("node_plugin")
    if plugin is not None:
        print(json.dumps(plugin, indent=2), flush=True)

    print("\nscale curve (all pods shared, one claim per 40 pods):")
    print(f"{'nodes':>6}{'pods':>7}{'claims':>7}{'converged s':>13}{'writes/mount':>14}"
          f"{'requests/pod':>14}{'controller MiB':>16}{'node MiB':>10}")  # fmt: skip
    for row in rows:
        conv = row.get("converged_seconds", math.nan)
        wpm = row.get("writes_per_mount")
        req = row.get("apiserver_requests")
        mem = row.get("peak_rss_mib", {})
        print(
            f"{row['nodes']:>6}{row['pods']:>7}{row.get('claims', 0):>7}{conv:>13.2f}"
            f"{wpm if wpm is not None else math.nan:>14.3f}"
            f"{(req / row['pods']) if req else math.nan:>14.2f}"
            f"{mem.get('controller', math.nan):>16.1f}{mem.get('node', math.nan):>10.1f}"
        )
    for row in rows:
        idle = row.get("idle")
        if idle:
            lists = sum(v for k, v in idle["requests"].items() if k.startswith("LIST"))
            print(
                f"idle at {row['nodes']} nodes for {idle['seconds']}s: kube-apiserver "
                f"{idle['apiserver_cores']} cores, {lists} lists, CPU s {idle['cpu_seconds']}"
            )
    figures: dict[str, float] = {}
    # The curve holds up to the first size that did not converge.
    done = []
    for r in rows:
        if "stopped" in r:
            break
        done.append(r)
    largest = rows[-1] if rows else None
    if done:
        figures["scale.nodes"] = done[-1]["nodes"]
        figures["scale.pods"] = done[-1]["pods"]
    if largest is not None:
        # The largest size tried: its time (NaN if it did not converge) and its writes.
        figures["scale.converged_s"] = largest.get("converged_seconds", math.nan)
        wpm = largest.get("writes_per_mount")
        if wpm is not None:
            figures["scale.writes_per_mount"] = wpm
    at_target = [r for r in rows if r["pods"] == CONTROLLER_MEMORY_PODS and "peak_rss_mib" in r]
    if at_target:
        figures["mem.controller_mib"] = at_target[0]["peak_rss_mib"]["controller"]
    if plugin is not None and "node_plugin_rss_mib" in plugin and "stopped" not in plugin:
        figures["mem.node_plugin_mib"] = plugin["node_plugin_rss_mib"]
    print()
    goals.print_verdicts(figures)
    if not args.no_record:
        goals.record(
            figures,
            benchmark="bench_controllers",
            extra={"sizes": rows, "node_plugin": plugin, "load_average": os.getloadavg()[0]},
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode")
    worker = sub.add_parser("node-worker", help="(internal) run node reconcilers")
    worker.add_argument("--kubeconfig", required=True)
    worker.add_argument("--nodes", required=True)
    worker.add_argument("--ready-file", required=True)
    parser.add_argument("--sizes", default="100,300,500,1000", help="node counts, in order")
    parser.add_argument("--pods-per-node", type=int, default=20)
    parser.add_argument("--claims-per-1000-nodes", type=int, default=500)
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--plugin-pods", type=int, default=200, help="0: skip that run")
    parser.add_argument(
        "--node-procs",
        type=int,
        default=3,
        help="worker processes for the nodes other than the measured one",
    )
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--settle", type=float, default=3)
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=70,
        help="at the largest size, measure this long with nothing changing (0: skip)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the control plane's dir")
    parser.add_argument("--workdir", help="where etcd and the logs live (default: /dev/shm)")
    parser.add_argument("--no-record", action="store_true", help="do not write latest.json")
    parser.add_argument(
        "--apiserver-profile",
        metavar="FILE",
        help="write a 30 s CPU profile of the apiserver (FILE-<nodes>n) after the claims",
    )
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
