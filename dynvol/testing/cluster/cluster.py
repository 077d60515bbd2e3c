"""A local Kubernetes cluster of N real nodes: ``up``, ``status`` and ``down``.

The control plane runs on the host; each node is a containerd (with runc), a kubelet and
a kube-proxy (iptables mode) in the node's own network namespace (a veth on the host
bridge) and mount namespace (its own ``/var/lib/kubelet``, ``/var/lib/dynamic``, ``/run``
and containerd root). Pods get addresses of their node's pod network, routed between
nodes; Services work through each node's kube-proxy; CoreDNS behind ``kube-dns`` is the
cluster DNS (:mod:`dynvol.testing.cluster.dns`). Addresses:
:mod:`dynvol.testing.cluster.addressing`.

Neighbours: ``hack/local-cluster up --nodes N`` calls :func:`main` of
:mod:`dynvol.testing.cluster.__main__`; the multi-node e2e tests use :class:`MultiNodeCluster`
from Python.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

from dynvol.testing.cluster import dns, isolation, network
from dynvol.testing.cluster.addressing import (
    DNS_SERVICE_ADDRESS,
    HOST_ADDRESS,
    KUBERNETES_SERVICE_ADDRESS,
    NodePlan,
    plan_nodes,
)
from dynvol.testing.cluster.configs import (
    apiserver_kubelet_client_binding,
    server_url,
    write_node_files,
)
from dynvol.testing.cluster.configs import write_kubeconfig as _write_kubeconfig
from dynvol.testing.cluster.layout import Layout, default_dir
from dynvol.testing.cluster.pki import CertificateAuthority
from dynvol.testing.cluster.supervisor import descendants, remove_containers
from dynvol.testing.controlplane import default_bin_dir, repo_root
from dynvol.testing.mounts import mounts_under
from dynvol.testing.processes import free_port
from dynvol_core.mountinfo import parse_mountinfo, unmount_order

__all__ = ["ClusterError", "MultiNodeCluster"]

DEFAULT_APISERVER_PORT = 6443
KUBE_BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubectl",
)
HOST_TOOLS = ("containerd", "containerd-shim-runc-v2", "ctr", "runc", "ip", "nsenter", "unshare")
SYSTEM_NAMESPACES = ("kube-system", "dynvol-system")


class ClusterError(RuntimeError):
    """A step failed; the message says what to do."""


def _quiet(_: str) -> None:
    pass


def _resolved(path: str | Path) -> Path:
    return Path(path).resolve()


def _ours(pid: int | None, layout: Layout) -> bool:
    """Whether ``pid`` runs and names the cluster's directory (guards against PID reuse)."""
    if not pid:
        return False
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X") and str(layout.dir).encode() in raw


@attrs.define(kw_only=True)
class MultiNodeCluster:
    """Drives the cluster in ``dir``; every method is safe to call again."""

    dir: Path = attrs.field(factory=default_dir, converter=_resolved)
    nodes: int = 3
    apiserver_port: int = DEFAULT_APISERVER_PORT
    bin_dir: Path = attrs.field(factory=default_bin_dir)
    progress: Callable[[str], None] = _quiet

    @property
    def layout(self) -> Layout:
        return Layout(self.dir)

    @property
    def plans(self) -> tuple[NodePlan, ...]:
        return plan_nodes(self.nodes)

    @property
    def kubeconfig(self) -> Path:
        return self.layout.kubeconfig

    # --- queries ----------------------------------------------------------------------

    def kubectl(
        self, *args: str, timeout: float = 60, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        proc = subprocess.run(
            argv, text=True, capture_output=True, timeout=timeout, input=input, check=False
        )
        if check and proc.returncode:
            raise ClusterError(f"kubectl {' '.join(args)[:200]} failed: {proc.stderr.strip()}")
        return proc

    def apply(self, *objs: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(o) for o in objs))

    def get(self, kind: str, name: str, namespace: str = "default") -> dict[str, Any]:
        out = self.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout
        found: dict[str, Any] = json.loads(out)
        return found

    def node_mounts(self, node: str, under: str) -> list[str]:
        """Mount points at or below ``under`` in ``node``'s mount namespace (deepest first);
        read through the namespace file, so it works when the node's processes are gone."""
        proc = subprocess.run(
            ["nsenter", f"--mount={self.layout.mount_ns(node)}", "cat", "/proc/self/mountinfo"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if proc.returncode:
            raise ClusterError(f"cannot read {node}'s mount table: {proc.stderr.strip()}")
        return unmount_order(parse_mountinfo(proc.stdout), under.rstrip("/"), include_self=True)

    def items(self, kind: str, *args: str) -> list[dict[str, Any]]:
        out = self.kubectl("get", kind, "-o", "json", *args).stdout
        found: list[dict[str, Any]] = json.loads(out)["items"]
        return found

    def supervisor_pid(self) -> int | None:
        pid = self.layout.read_state().get("supervisor")
        return pid if isinstance(pid, int) and _ours(pid, self.layout) else None

    def running(self) -> bool:
        state = self.layout.read_state()
        return (
            self.supervisor_pid() is not None
            and state.get("phase") == "running"
            and all(_ours(p.get("pid"), self.layout) for p in state.get("procs", {}).values())
        )

    def status(self) -> dict[str, Any]:
        state = self.layout.read_state()
        report: dict[str, Any] = {
            "dir": str(self.dir),
            "phase": state.get("phase", "absent"),
            "supervisor": self.supervisor_pid(),
            "server": state.get("server"),
            "kubeconfig": str(self.kubeconfig),
            "processes": {
                name: {"pid": info.get("pid"), "running": _ours(info.get("pid"), self.layout)}
                for name, info in state.get("procs", {}).items()
            },
            "network": network.exists(plan_nodes(int(state.get("nodes", self.nodes)))),
            "timings": state.get("timings"),
        }
        report["running"] = self.running()
        if report["running"]:
            nodes = self.kubectl("get", "nodes", "-o", "json", check=False, timeout=15)
            if nodes.returncode == 0:
                report["nodes"] = [
                    {
                        "name": n["metadata"]["name"],
                        "ready": any(
                            c["type"] == "Ready" and c["status"] == "True"
                            for c in n["status"].get("conditions", [])
                        ),
                        "address": next(
                            (
                                a["address"]
                                for a in n["status"].get("addresses", [])
                                if a["type"] == "InternalIP"
                            ),
                            None,
                        ),
                    }
                    for n in json.loads(nodes.stdout)["items"]
                ]
            report["dns"] = dns.dns_status(self)
        return report

    # --- up ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ClusterError(f"another command is using {self.dir}") from None
            yield

    def _check_tools(self) -> None:
        import shutil

        missing = [t for t in HOST_TOOLS if not shutil.which(t)]
        if not Path("/usr/lib/cni/bridge").exists():
            missing.append("containernetworking-plugins")
        if missing:
            raise ClusterError(f"missing host tools: {', '.join(missing)} (apt-get install)")
        absent = [b for b in KUBE_BINARIES if not os.access(self.bin_dir / b, os.X_OK)]
        if absent:
            raise ClusterError(
                f"missing {', '.join(absent)} in {self.bin_dir}: run 'make tools tools-node'"
            )

    def _check_port(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((str(HOST_ADDRESS), self.apiserver_port))
            except OSError as exc:
                raise ClusterError(
                    f"{HOST_ADDRESS}:{self.apiserver_port} is taken ({exc.strerror}): "
                    "is another multi-node cluster running? pass another apiserver port"
                ) from None

    def _prepare(self) -> dict[str, int]:
        layout, plans = self.layout, self.plans
        for stale in (layout.etcd_data, layout.logs, layout.dir / "kcm-certs"):
            subprocess.run(["rm", "-rf", str(stale)], check=False)
        for plan in plans:
            subprocess.run(["rm", "-rf", str(layout.node(plan.name).ipam)], check=False)
        layout.logs.mkdir(parents=True, exist_ok=True)
        ca = CertificateAuthority(dir=layout.pki).load_or_create()
        ca.service_account_keys()
        ca.issue(
            "apiserver",
            common_name="kube-apiserver",
            hosts=(
                str(HOST_ADDRESS),
                str(KUBERNETES_SERVICE_ADDRESS),
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            server=True,
        )
        clients = {
            "admin": ("dynvol-admin", ("system:masters",)),
            "apiserver-kubelet-client": ("kube-apiserver-kubelet-client", ()),
            "kube-controller-manager": ("system:kube-controller-manager", ()),
            "kube-scheduler": ("system:kube-scheduler", ()),
        }
        for plan in plans:
            clients[plan.name] = (f"system:node:{plan.name}", ("system:nodes",))
            clients[f"{plan.name}-proxy"] = ("system:kube-proxy", ())
            ca.issue(
                f"{plan.name}-serving",
                common_name=plan.name,
                hosts=(str(plan.address), plan.name),
                server=True,
            )
        for name, (cn, orgs) in clients.items():
            ca.issue(name, common_name=cn, organisations=orgs)
        ports = {
            "apiserver": self.apiserver_port or free_port(),
            **{n: free_port() for n in ("etcd", "etcd-peer", "etcd-metrics", "kcm", "scheduler")},
        }
        server = server_url(ports)
        pki = layout.pki
        _write_kubeconfig(
            layout.kubeconfig,
            server=server,
            ca=ca.cert_path,
            cert=pki / "admin.crt",
            key=pki / "admin.key",
        )
        for name in clients:
            if name in ("admin", "apiserver-kubelet-client"):
                continue
            _write_kubeconfig(
                layout.kubeconfig_for(name),
                server=server,
                ca=ca.cert_path,
                cert=pki / f"{name}.crt",
                key=pki / f"{name}.key",
            )
        for plan in plans:
            write_node_files(layout, plan, dns=[str(DNS_SERVICE_ADDRESS)])
        layout.write_state(
            {
                "dir": str(layout.dir),
                "nodes": self.nodes,
                "ports": ports,
                "server": server,
                "bin_dir": str(self.bin_dir),
                "phase": "prepared",
                "procs": {},
            }
        )
        return ports

    def up(self, *, images: tuple[str, ...] = ("pause", "busybox", "dynvol")) -> bool:
        """Bring the cluster up unless it runs; returns whether this call started it.

        The cluster DNS's image is always built and imported with ``images``, and CoreDNS
        deployed, unless there is no checkout to build images from."""
        if images and "coredns" not in images:
            images = (*images, "coredns")
        if os.geteuid() != 0:
            raise ClusterError("run as root: namespaces, mounts and the kubelets need it")
        began, timings = time.monotonic(), {}
        with self._locked():
            if self.running():
                self.progress(f"already running; KUBECONFIG={self.kubeconfig}")
                return False
            if self.layout.read_state().get("procs") or network.exists(self.plans):
                self.progress("cleaning up after a previous run that did not go down")
                self._teardown(grace=0)
            self._check_tools()
            root = repo_root()
            if images and root is not None:
                t = time.monotonic()
                subprocess.run(
                    [sys.executable, str(root / "hack" / "images" / "build.py"), "build", *images],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                timings["images-build"] = time.monotonic() - t
            t = time.monotonic()
            network.create(self.plans, marker=self.layout.netns_marker)
            self._check_port()
            self._prepare()
            for plan in self.plans:
                isolation.create_mount_ns(self.layout, plan)
                isolation.create_cgroups(plan)
            timings["prepare"] = time.monotonic() - t
            t = time.monotonic()
            try:
                self._start_supervisor()
                timings["processes"] = time.monotonic() - t
                if images and root is not None:
                    t = time.monotonic()
                    self._import_images(root, images)
                    timings["images-import"] = time.monotonic() - t
                t = time.monotonic()
                self._post_start()
                timings["nodes-ready"] = time.monotonic() - t
                if "coredns" in images and root is not None:
                    t = time.monotonic()
                    self.apply(*dns.objects())
                    dns.wait_ready(self)
                    timings["dns-ready"] = time.monotonic() - t
            except BaseException:
                self.progress("start failed; stopping what was started")
                self._teardown(grace=0)
                raise
            state = self.layout.read_state()
            state["timings"] = {k: round(v, 1) for k, v in timings.items()}
            state["timings"]["total"] = round(time.monotonic() - began, 1)
            self.layout.write_state(state)
        self.progress("up in " + ", ".join(f"{k} {v}s" for k, v in state["timings"].items()))
        return True

    def _start_supervisor(self) -> None:
        log = self.layout.logs / "supervisor.log"
        with open(log, "ab") as out:
            sup = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dynvol.testing.cluster",
                    "_supervise",
                    "--dir",
                    str(self.dir),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd="/",
            )
        self.progress(f"supervisor {sup.pid}; logs in {self.layout.logs}")
        seen: set[str] = set()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            state = self.layout.read_state()
            for name, info in state.get("procs", {}).items():
                if "ready_after" in info and name not in seen:
                    seen.add(name)
                    self.progress(f"{name} ready ({info['pid']}, {info['ready_after']:.1f}s)")
            if state.get("phase") == "running":
                return
            if state.get("phase") == "failed":
                sup.wait(30)
                raise ClusterError(state.get("error") or f"the supervisor failed; see {log}")
            if sup.poll() is not None:
                raise ClusterError(f"the supervisor exited with {sup.returncode}; see {log}")
            time.sleep(0.3)
        raise ClusterError("the cluster did not start within 300 s")

    def import_images(self, *images: str) -> None:
        """Build (if missing) and import ``images`` of this checkout into every node of the
        running cluster, e.g. a rebuilt ``dynvol`` into one that :meth:`up` found running."""
        root = repo_root()
        if root is None:
            raise ClusterError("no checkout to build images from")
        subprocess.run(
            [sys.executable, str(root / "hack" / "images" / "build.py"), "build", *images],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        self._import_images(root, images)

    def _import_images(self, root: Path, images: tuple[str, ...]) -> None:
        for plan in self.plans:
            self.progress(f"importing {', '.join(images)} into {plan.name}")
            subprocess.run(
                [
                    sys.executable,
                    str(root / "hack" / "images" / "build.py"),
                    "import",
                    "--address",
                    str(self.layout.node(plan.name).containerd_sock),
                    *images,
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )

    def _post_start(self) -> None:
        binding = apiserver_kubelet_client_binding("dynvol-multinode")
        self.kubectl("apply", "-f", "-", input=json.dumps(binding))
        names = [f"node/{p.name}" for p in self.plans]
        deadline = time.monotonic() + 120
        while len(self.kubectl("get", "nodes", "-o", "name", check=False).stdout.split()) < len(
            names
        ):
            if time.monotonic() > deadline:
                raise ClusterError("not every node registered within 120 s; see the kubelet logs")
            time.sleep(0.5)
        self.kubectl("wait", "--for=condition=Ready", *names, "--timeout=120s", timeout=130)
        deadline = time.monotonic() + 60
        while self.kubectl("get", "serviceaccount", "default", check=False).returncode:
            if time.monotonic() > deadline:
                raise ClusterError("the default ServiceAccount never appeared; see the kcm log")
            time.sleep(0.3)

    # --- down -------------------------------------------------------------------------

    def down(self, *, grace: int = 10, purge: bool = False) -> list[str]:
        """Stop and undo everything; returns the problems that are left."""
        if not self.dir.exists():
            return []
        with self._locked():
            problems = self._teardown(grace=grace)
            if purge and not problems:
                subprocess.run(["rm", "-rf", str(self.dir)], check=False)
        return problems

    def _delete_pods(self, grace: int) -> None:
        listed = self.kubectl("get", "pods", "-A", "-o", "json", check=False, timeout=30)
        if listed.returncode:
            return
        namespaces = {p["metadata"]["namespace"] for p in json.loads(listed.stdout)["items"]}
        users = sorted(namespaces - set(SYSTEM_NAMESPACES))
        for group in (users, [n for n in SYSTEM_NAMESPACES if n in namespaces]):
            if not group:
                continue
            self.progress(f"deleting pods in {', '.join(group)}")
            for ns in group:
                self.kubectl(
                    "delete",
                    "pods",
                    "--all",
                    "-n",
                    ns,
                    "--wait=false",
                    f"--grace-period={grace}",
                    check=False,
                )
            deadline = time.monotonic() + grace + 30
            while any(
                self.kubectl("get", "pods", "-n", ns, "-o", "name", check=False).stdout.strip()
                for ns in group
            ):
                if time.monotonic() > deadline:
                    for ns in group:
                        self.kubectl(
                            "delete",
                            "pods",
                            "--all",
                            "-n",
                            ns,
                            "--force",
                            "--grace-period=0",
                            check=False,
                        )
                    break
                time.sleep(1)

    def _teardown(self, *, grace: int) -> list[str]:
        layout = self.layout
        state = layout.read_state()
        plans = plan_nodes(int(state.get("nodes", self.nodes)))
        procs = state.get("procs", {})

        def pid_of(name: str) -> int | None:
            pid = procs.get(name, {}).get("pid")
            return pid if _ours(pid, layout) else None

        # Nothing may recreate or reschedule what is deleted.
        for name in ("kube-controller-manager", "kube-scheduler"):
            if (pid := pid_of(name)) is not None:
                os.kill(pid, signal.SIGTERM)
        if pid_of("kube-apiserver") and grace >= 0:
            self._delete_pods(grace)
        sup = state.get("supervisor")
        if isinstance(sup, int) and _ours(sup, layout):
            self.progress(f"stopping the supervisor ({sup})")
            os.kill(sup, signal.SIGTERM)
            deadline = time.monotonic() + 180
            while _ours(sup, layout) and time.monotonic() < deadline:
                time.sleep(0.3)
            if _ours(sup, layout):
                for pid in descendants(sup):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                os.kill(sup, signal.SIGKILL)
        else:
            # No supervisor: stop what is still ours by PID, nodes first.
            for plan in plans:
                sock = layout.node(plan.name).containerd_sock
                if (pid := pid_of(f"{plan.name}/containerd")) is not None:
                    remove_containers(sock)
            for name in reversed(list(procs)):
                if (pid := pid_of(name)) is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            self._kill_shims(plans)
        problems = [f"{n} ({procs[n]['pid']}) still runs" for n in procs if pid_of(n)]
        problems += [
            f"mount namespace still held: {p}" for p in isolation.remove_mount_namespaces(layout)
        ]
        problems += [
            f"network still there: {n}" for n in network.remove(plans, marker=layout.netns_marker)
        ]
        for plan in plans:
            problems += [f"cgroup not empty: {c}" for c in isolation.remove_cgroups(plan)]
        stuck = [p for p in mounts_under(self.dir) if p != str(layout.namespaces)]
        problems += [f"still mounted: {p}" for p in stuck]
        if layout.state_file.exists():
            state.update(phase="down", procs={}, supervisor=None)
            layout.write_state(state)
        return problems

    def _kill_shims(self, plans: tuple[NodePlan, ...]) -> None:
        socks = {str(self.layout.node(p.name).containerd_sock) for p in plans}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = Path(entry, "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and b"containerd-shim" in argv[0] and any(s.encode() in argv for s in socks):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)

    # --- node loss, for tests ---------------------------------------------------------

    def stop_node(self, name: str) -> None:
        """Kill one node's kube-proxy, kubelet, containers and containerd (a lost machine);
        the supervisor notes that they exited and keeps the rest running."""
        state = self.layout.read_state()
        procs = state.get("procs", {})
        for part in ("kube-proxy", "kubelet"):
            pid = procs.get(f"{name}/{part}", {}).get("pid")
            if _ours(pid, self.layout):
                os.kill(pid, signal.SIGKILL)
        remove_containers(self.layout.node(name).containerd_sock)
        pid = procs.get(f"{name}/containerd", {}).get("pid")
        if _ours(pid, self.layout):
            os.kill(pid, signal.SIGKILL)
        plan = next(p for p in self.plans if p.name == name)
        self._kill_shims((plan,))
