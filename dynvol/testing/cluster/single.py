"""The single-node cluster of ``hack/local-cluster`` (``--nodes 1``, the default).

A real node from real parts on this machine's own namespaces, on loopback: etcd,
kube-apiserver, kube-controller-manager, kube-scheduler and a kubelet (the pinned release
in ``.tools/bin``), containerd and runc from Debian, and a bridge CNI network (``dynvol0``)
with no route off the node: pods reach each other and nothing else, and pods that must
reach the apiserver use hostNetwork. Every TCP listener is on 127.0.0.1; the node is named
``127.0.0.1`` so that the apiserver reaches the kubelet there (a kubelet refuses a
loopback ``--node-ip`` but takes its address from an IP-shaped node name).

State lives under one directory (:class:`SingleNodeLayout`), except what the parts insist
on: the kubelet's root ``/var/lib/kubelet``, the shim sockets under ``/run/containerd``,
the CNI result cache under ``/var/lib/cni``, the cgroups ``kubepods/...`` and the rshared
bind of ``/var/lib/dynamic``. ``down`` removes all of it; ``down --purge`` also removes the
directory (and with it the imported images). See docs/local-cluster.md.

It shares the multi-node cluster's parts: the certificates of
:mod:`~dynvol.testing.cluster.pki`, the configuration writers and control-plane specs of
:mod:`~dynvol.testing.cluster.configs` (with :data:`PROFILE`), and the
:class:`~dynvol.testing.cluster.supervisor.Supervisor`.

Neighbours: ``hack/local-cluster`` runs :func:`main` (``python -m
dynvol.testing.cluster.single``); :mod:`dynvol.testing.localcluster` drives that script
and reads :attr:`SingleNodeLayout.state_file`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from dynvol.testing.cluster import isolation, pids
from dynvol.testing.cluster.configs import (
    CNI_BIN,
    HOST_PATH,
    ControlPlaneProfile,
    Spec,
    apiserver_kubelet_client_binding,
    bridge_network,
    containerd_ready,
    containerd_toml,
    control_plane_specs,
    http_ok,
    kubelet_configuration,
    write_kubeconfig,
)
from dynvol.testing.cluster.layout import Layout
from dynvol.testing.cluster.pki import CertificateAuthority
from dynvol.testing.cluster.supervisor import Supervisor, descendants, remove_containers
from dynvol.testing.controlplane import default_bin_dir, repo_root
from dynvol.testing.processes import free_port
from dynvol_core.mountinfo import MountEntry, entries_at, entries_under, parse_mountinfo

__all__ = [
    "NODE_NAME",
    "PROFILE",
    "SingleNodeCluster",
    "SingleNodeLayout",
    "default_dir",
    "main",
    "node_specs",
    "write_node_files",
]

#: Run as ``python -m`` (its ``__name__`` is then ``__main__``).
_MODULE = "dynvol.testing.cluster.single"
NODE_NAME = "127.0.0.1"
ADDRESS = "127.0.0.1"
KUBELET_ROOT = Path("/var/lib/kubelet")
#: Host paths that pods mount with Bidirectional propagation must be shared mounts.
SHARED_PATHS = (Path("/var/lib/dynamic"),)
CONTAINERD_RUN = Path("/run/containerd")
NETNS_DIR = Path("/run/netns")
CNI_CACHE = Path("/var/lib/cni")
BRIDGE = "dynvol0"
NETWORK_NAME = "dynvol-local"
POD_SUBNET = "10.244.0.0/24"
SERVICE_SUBNET = "10.96.0.0/24"
#: Fixed, so that manifests can point hostNetwork pods at https://127.0.0.1:6443 (there is
#: no kube-proxy to make the kubernetes Service's ClusterIP work).
DEFAULT_APISERVER_PORT = 6443
#: Marks /var/lib/kubelet as made here, so that ``down`` may remove it.
KUBELET_MARKER = ".dynvol-local-cluster"
#: Namespaces whose pods ``down`` deletes last (the system's, after the users').
SYSTEM_NAMESPACES = ("kube-system", "dynvol-system")
#: Chains a kubelet makes when makeIPTablesUtilChains is on (older runs of this cluster).
KUBELET_CHAINS = ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT")
#: Every TCP port of the cluster; all but the apiserver's are free ones.
PORT_NAMES = (
    "etcd",
    "etcd-peer",
    "etcd-metrics",
    "apiserver",
    "kcm",
    "scheduler",
    "kubelet",
    "kubelet-healthz",
)
KUBE_BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kubectl",
)
#: Binaries from Debian packages; the package to install when one is missing.
HOST_TOOLS = {
    "containerd": "containerd",
    "containerd-shim-runc-v2": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "debootstrap": "debootstrap",
    "busybox": "busybox-static",
    "ip": "iproute2",
}
#: The processes' start order; ``down`` stops them in its own order (see ``_teardown``).
PROCESSES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "containerd",
    "kubelet",
)


#: The single node's control plane: on 127.0.0.1, the kubelet reached by its name.
PROFILE = ControlPlaneProfile(
    name="dynvol-local",
    address=ADDRESS,
    service_network=SERVICE_SUBNET,
    kubelet_address_types="Hostname,InternalIP",
    etcd_args=(f"--quota-backend-bytes={4 << 30}",),
    # No Service has endpoints the apiserver could reach (hostNetwork pods are 127.0.0.1),
    # so it keeps none for ``kubernetes`` either.
    apiserver_args=("--endpoint-reconciler-type=none",),
    controller_manager_args=(),
)


class ClusterError(RuntimeError):
    """A step failed; the message says what to do."""


def say(msg: str) -> None:
    print(f"local-cluster: {msg}", flush=True)


def default_dir() -> Path:
    """``$DYNVOL_CLUSTER_DIR``, else ``${XDG_STATE_HOME:-~/.local/state}/dynvol/local-cluster``:
    outside the checkout, where containerd's snapshots (whole Python trees) would be
    linted and grepped."""
    env = os.environ.get("DYNVOL_CLUSTER_DIR")
    if env:
        return Path(env)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "dynvol" / "local-cluster"


@attrs.frozen
class SingleNodeLayout(Layout):
    """The single node's directory: the control plane's files where a multi-node cluster
    has them, and the node's own (containerd, CNI, kubelet) at the top."""

    @property
    def run(self) -> Path:
        return self.dir / "run"

    @property
    def state_file(self) -> Path:
        return self.run / "state.json"

    @property
    def containerd(self) -> Path:
        return self.dir / "containerd"

    @property
    def containerd_sock(self) -> Path:
        return self.containerd / "containerd.sock"

    @property
    def containerd_config(self) -> Path:
        return self.containerd / "config.toml"

    @property
    def cni(self) -> Path:
        return self.dir / "cni"

    @property
    def cni_conf(self) -> Path:
        return self.cni / "net.d"

    @property
    def kubelet_config(self) -> Path:
        # JSON is YAML; the kubelet reads either.
        return self.dir / "kubelet" / "config.yaml"


# --- configuration -----------------------------------------------------------------------


def certificates() -> dict[str, tuple[str, tuple[str, ...], tuple[str, ...] | None]]:
    """name -> (common name, organisations, hosts, or None for a client certificate)."""
    return {
        "apiserver": (
            "kube-apiserver",
            (),
            (
                ADDRESS,
                "localhost",
                "10.96.0.1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
        ),
        "kubelet-serving": (NODE_NAME, (), (ADDRESS, "localhost")),
        "admin": ("dynvol-admin", ("system:masters",), None),
        "apiserver-kubelet-client": ("kube-apiserver-kubelet-client", (), None),
        "kube-controller-manager": ("system:kube-controller-manager", (), None),
        "kube-scheduler": ("system:kube-scheduler", (), None),
        "kubelet": (f"system:node:{NODE_NAME}", ("system:nodes",), None),
    }


def write_pki(layout: SingleNodeLayout) -> None:
    """The CA (kept across runs; made again when it is not one of ours), every certificate
    and the ServiceAccount key pair."""
    ca = CertificateAuthority(dir=layout.pki, common_name="dynvol-local-cluster-ca")
    try:
        ca.load_or_create()
    except ValueError:
        # An older run's CA (RSA, from openssl): start over; nothing else trusts it.
        shutil.rmtree(layout.pki, ignore_errors=True)
        ca.load_or_create()
    ca.service_account_keys()
    for name, (cn, orgs, hosts) in certificates().items():
        ca.issue(name, common_name=cn, organisations=orgs, hosts=hosts or (), server=bool(hosts))


def kubelet_config(layout: SingleNodeLayout, ports: dict[str, int]) -> dict[str, Any]:
    pki = layout.pki
    return kubelet_configuration(
        address=ADDRESS,
        port=ports["kubelet"],
        healthz_port=ports["kubelet-healthz"],
        serving=(pki / "kubelet-serving.crt", pki / "kubelet-serving.key"),
        client_ca=pki / "ca.crt",
        runtime_sock=layout.containerd_sock,
        cluster_dns=[],
    )


def cni_config(layout: SingleNodeLayout) -> dict[str, Any]:
    # A closed segment: the host does not forward for it.
    return bridge_network(
        name=NETWORK_NAME,
        bridge=BRIDGE,
        subnet=POD_SUBNET,
        ipam_dir=layout.cni / "ipam",
        gateway=None,
    )


def containerd_config(layout: SingleNodeLayout) -> str:
    return containerd_toml(
        root=layout.containerd,
        sock=layout.containerd_sock,
        stream_address=ADDRESS,
        cni_conf=layout.cni_conf,
        header="Written by hack/local-cluster; every path is under the cluster's directory.",
    )


def write_node_files(layout: SingleNodeLayout, ports: dict[str, int]) -> str:
    """The kubeconfigs, containerd's, the CNI's and the kubelet's configuration; returns
    the apiserver's URL."""
    server = PROFILE.server(ports)
    pki = layout.pki
    for d in (layout.containerd, layout.cni_conf, layout.kubelet_config.parent):
        d.mkdir(parents=True, exist_ok=True)
    write_kubeconfig(
        layout.kubeconfig,
        server=server,
        ca=pki / "ca.crt",
        cert=pki / "admin.crt",
        key=pki / "admin.key",
        cluster=NETWORK_NAME,
        user="dynvol-admin",
    )
    for component in ("kube-controller-manager", "kube-scheduler", "kubelet"):
        write_kubeconfig(
            layout.kubeconfig_for(component),
            server=server,
            ca=pki / "ca.crt",
            cert=pki / f"{component}.crt",
            key=pki / f"{component}.key",
            cluster=NETWORK_NAME,
            user=component,
        )
    layout.containerd_config.write_text(containerd_config(layout))
    (layout.cni_conf / "10-dynvol.conflist").write_text(json.dumps(cni_config(layout), indent=1))
    layout.kubelet_config.write_text(json.dumps(kubelet_config(layout, ports), indent=1))
    return server


def node_specs(layout: SingleNodeLayout, ports: dict[str, int], bin_dir: Path) -> list[Spec]:
    """containerd and the kubelet, in the host's namespaces."""
    return [
        Spec(
            name="containerd",
            argv=(
                shutil.which("containerd") or "/usr/bin/containerd",
                "--config",
                str(layout.containerd_config),
            ),
            ready=lambda: containerd_ready(layout.containerd_sock),
            timeout=60,
            env=(("PATH", HOST_PATH),),
        ),
        Spec(
            name="kubelet",
            argv=(
                str(bin_dir / "kubelet"),
                f"--config={layout.kubelet_config}",
                f"--kubeconfig={layout.kubeconfig_for('kubelet')}",
                f"--hostname-override={NODE_NAME}",
                f"--root-dir={KUBELET_ROOT}",
                "--node-labels=dynvol.local/cluster=true",
                "--v=2",
            ),
            ready=lambda: http_ok(f"http://{ADDRESS}:{ports['kubelet-healthz']}/healthz"),
            env=(("PATH", HOST_PATH),),
        ),
    ]


def process_specs(layout: SingleNodeLayout, ports: dict[str, int], bin_dir: Path) -> list[Spec]:
    """Every process, in start order."""
    profile = attrs.evolve(
        PROFILE, scheduler_args=(f"--cert-dir={layout.dir / 'scheduler-certs'}",)
    )
    return [
        *control_plane_specs(layout, ports, bin_dir, profile),
        *node_specs(layout, ports, bin_dir),
    ]


# --- the host's mounts, firewall and cgroups ---------------------------------------------


def _mount_table() -> tuple[MountEntry, ...]:
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text())


def mounts_under(prefixes: Sequence[Path]) -> list[MountEntry]:
    """Every mount at or below one of ``prefixes`` (each once)."""
    table, found, seen = _mount_table(), [], set()
    for prefix in prefixes:
        for entry in entries_under(table, str(prefix), include_self=True):
            if entry.mount_id not in seen:
                seen.add(entry.mount_id)
                found.append(entry)
    return found


def unmount_all(prefixes: Sequence[Path]) -> list[str]:
    """Unmount everything at or below ``prefixes``, deepest and newest first; lazily when a
    plain unmount fails. Returns what could not be unmounted."""
    for _ in range(50):
        found = mounts_under(prefixes)
        if not found:
            return []
        found.sort(key=lambda e: (e.mount_point.count("/"), e.mount_id), reverse=True)
        for entry in found:
            point = entry.mount_point
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True)
    return [e.mount_point for e in mounts_under(prefixes)]


def make_rshared(path: Path) -> None:
    """Bind ``path`` onto itself and make it rshared, unless it already is a shared mount."""
    path.mkdir(parents=True, exist_ok=True)
    if any(e.is_shared for e in entries_at(_mount_table(), str(path))):
        return
    _run(["mount", "--bind", str(path), str(path)])
    _run(["mount", "--make-rshared", str(path)])


def kubelet_rules_to_delete(listing: str) -> list[list[str]]:
    """The rules of ``iptables -S`` output that jump to a kubelet chain from another
    chain, as ``-D`` arguments (without the table)."""
    found = []
    for line in listing.splitlines():
        parts = line.split()
        if (
            parts[:1] == ["-A"]
            and "-j" in parts
            and parts.index("-j") + 1 < len(parts)
            and parts[parts.index("-j") + 1] in KUBELET_CHAINS
            and parts[1] not in KUBELET_CHAINS
        ):
            found.append(parts[1:])
    return found


def remove_kubelet_chains() -> None:
    for tool in ("iptables", "ip6tables"):
        if not shutil.which(tool):
            continue
        for table in ("filter", "nat", "mangle"):
            listed = _run([tool, "-t", table, "-S"], check=False, timeout=30)
            if listed.returncode:
                continue
            for rule in kubelet_rules_to_delete(listed.stdout):
                _run([tool, "-t", table, "-D", *rule], check=False)
            for chain in KUBELET_CHAINS:
                if f"-N {chain}" in listed.stdout.splitlines():
                    _run([tool, "-t", table, "-F", chain], check=False)
                    _run([tool, "-t", table, "-X", chain], check=False)


def remove_empty_cgroups() -> None:
    """The kubelet's pod cgroups (cgroupfs driver), deepest first; only empty ones go."""
    isolation.remove_cgroup_trees("kubepods")


def _run(
    argv: Sequence[str], *, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), text=True, capture_output=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise ClusterError(
            f"{' '.join(argv[:4])}... failed ({proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
        )
    return proc


# --- the cluster -------------------------------------------------------------------------


def _quiet(_: str) -> None:
    pass


def _resolved(path: str | Path) -> Path:
    return Path(path).resolve()


@attrs.define(kw_only=True)
class SingleNodeCluster:
    """Drives the single-node cluster in ``dir``; every method is safe to call again."""

    dir: Path = attrs.field(factory=default_dir, converter=_resolved)
    bin_dir: Path = attrs.field(factory=default_bin_dir)
    progress: Callable[[str], None] = _quiet

    @property
    def layout(self) -> SingleNodeLayout:
        return SingleNodeLayout(self.dir)

    @property
    def kubeconfig(self) -> Path:
        return self.layout.kubeconfig

    def _ours(self, pid: object) -> bool:
        return pids.ours(pid, self.dir)

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

    def supervisor_pid(self) -> int | None:
        pid = self.layout.read_state().get("supervisor")
        return pid if isinstance(pid, int) and self._ours(pid) else None

    # --- status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What runs (by PID), the mounts it holds and, when it runs, the node."""
        state = self.layout.read_state()
        report: dict[str, Any] = {
            "dir": str(self.dir),
            "phase": state.get("phase", "absent"),
            "supervisor": self.supervisor_pid(),
            "kubeconfig": str(self.kubeconfig),
            "server": state.get("server"),
            "processes": {
                name: {"pid": info.get("pid"), "running": self._ours(info.get("pid"))}
                for name, info in state.get("procs", {}).items()
            },
            "timings": state.get("timings"),
            "mounts": len(mounts_under([KUBELET_ROOT, self.dir, CONTAINERD_RUN])),
        }
        running = report["supervisor"] is not None and all(
            p["running"] for p in report["processes"].values()
        )
        if running:
            nodes = self.kubectl("get", "nodes", "-o", "wide", check=False, timeout=15)
            report["nodes"] = nodes.stdout.strip() or nodes.stderr.strip()
        report["running"] = running
        return report

    # --- up ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ClusterError(f"another local-cluster command is using {self.dir}") from None
            yield

    def _check_tools(self, *, build: bool) -> None:
        packages = {pkg for tool, pkg in HOST_TOOLS.items() if not shutil.which(tool)}
        if not (CNI_BIN / "bridge").exists():
            packages.add("containernetworking-plugins")
        if packages:
            raise ClusterError(
                "missing Debian packages: apt-get install " + " ".join(sorted(packages))
            )
        missing = [b for b in KUBE_BINARIES if not os.access(self.bin_dir / b, os.X_OK)]
        root = repo_root()
        if missing and build and root is not None:
            self.progress(
                f"building {', '.join(missing)} with hack/tools/build.sh "
                "(cached after the first time)"
            )
            subprocess.run(
                [
                    "bash",
                    str(root / "hack" / "tools" / "build.sh"),
                    "etcd",
                    "kubernetes",
                    "kubernetes-node",
                ],
                check=True,
            )
            missing = [b for b in KUBE_BINARIES if not os.access(self.bin_dir / b, os.X_OK)]
        if missing:
            raise ClusterError(
                f"missing {', '.join(missing)} in {self.bin_dir}: run "
                "'bash hack/tools/build.sh etcd kubernetes kubernetes-node'"
            )

    def _ports(self, apiserver_port: int) -> dict[str, int]:
        ports = {name: free_port() for name in PORT_NAMES}
        if apiserver_port:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                # As the apiserver binds (SO_REUSEADDR): connections of the previous run left
                # in TIME_WAIT do not make the port taken, a listener does.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((ADDRESS, apiserver_port))
                    sock.listen(1)
                except OSError as exc:
                    raise ClusterError(
                        f"{ADDRESS}:{apiserver_port} is taken ({exc.strerror}); pass "
                        "--apiserver-port with another port, or 0 for any free one"
                    ) from None
            ports["apiserver"] = apiserver_port
        return ports

    def _prepare(self, apiserver_port: int) -> None:
        """Fresh cluster state (etcd, logs, kubelet root); the CA, the ServiceAccount key
        and containerd's store are kept."""
        layout = self.layout
        for stale in (
            layout.etcd_data,
            layout.logs,
            layout.run,
            layout.cni / "ipam",
            layout.dir / "kcm-certs",
            layout.dir / "scheduler-certs",
        ):
            shutil.rmtree(stale, ignore_errors=True)
        for d in (layout.logs, layout.run):
            d.mkdir(parents=True, exist_ok=True)
        write_pki(layout)
        ports = self._ports(apiserver_port)
        server = write_node_files(layout, ports)
        if (
            KUBELET_ROOT.exists()
            and not (KUBELET_ROOT / KUBELET_MARKER).exists()
            and any(KUBELET_ROOT.iterdir())
        ):
            raise ClusterError(
                f"{KUBELET_ROOT} exists and was not made by hack/local-cluster; "
                "is another kubelet installed here?"
            )
        KUBELET_ROOT.mkdir(parents=True, exist_ok=True)
        (KUBELET_ROOT / KUBELET_MARKER).write_text(str(layout.dir) + "\n")
        for path in SHARED_PATHS:
            make_rshared(path)
        layout.write_state(
            {
                "dir": str(layout.dir),
                "ports": ports,
                "server": server,
                "node": NODE_NAME,
                "bin_dir": str(self.bin_dir),
                "phase": "prepared",
                "procs": {},
            }
        )

    def up(
        self,
        *,
        images: Sequence[str] = ("pause", "busybox", "dynvol"),
        apiserver_port: int = DEFAULT_APISERVER_PORT,
        build: bool = True,
    ) -> bool:
        """Bring the cluster up unless it runs; returns whether this call started it."""
        if os.geteuid() != 0:
            raise ClusterError("run as root: the kubelet, containerd and mounts need it")
        began = time.monotonic()
        timings: dict[str, float] = {}
        images = ["pause", *(i for i in images if i and i != "pause")]
        root = repo_root()
        with self._locked():
            pid = self.supervisor_pid()
            if pid:
                self.progress(f"already running (supervisor {pid}); KUBECONFIG={self.kubeconfig}")
                return False
            if self.layout.read_state().get("procs"):
                self.progress("cleaning up after a previous run that did not go down")
                self._teardown(purge=False, quiet=True)
            self._check_tools(build=build)
            timings["tools"] = time.monotonic() - began
            if root is not None:
                t = time.monotonic()
                subprocess.run(
                    [sys.executable, str(root / "hack" / "images" / "build.py"), "build", *images],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                timings["images-build"] = time.monotonic() - t
            t = time.monotonic()
            self._prepare(apiserver_port)
            timings["prepare"] = time.monotonic() - t
            try:
                t = time.monotonic()
                self._start_supervisor()
                timings["processes"] = time.monotonic() - t
                if root is not None:
                    t = time.monotonic()
                    self._import_images(root, images)
                    timings["images-import"] = time.monotonic() - t
                t = time.monotonic()
                self._post_start()
                timings["node-ready"] = time.monotonic() - t
            except BaseException:
                self.progress("start failed; stopping what was started")
                self._teardown(purge=False, quiet=True)
                raise
            timings["total"] = time.monotonic() - began
            state = self.layout.read_state()
            state["timings"] = {k: round(v, 1) for k, v in timings.items()}
            self.layout.write_state(state)
        self.progress("up in " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
        return True

    def _start_supervisor(self) -> None:
        log = self.layout.logs / "supervisor.log"
        argv = [sys.executable, "-m", _MODULE, "_supervise", "--dir", str(self.dir)]
        with open(log, "ab") as out:
            sup = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd="/",
            )
        # The supervisor runs on after ``up`` returns; ``down`` stops it by PID, and as a
        # child of this short-lived process it is re-parented, and reaped, when we exit.
        self.progress(f"supervisor {sup.pid}; logs in {self.layout.logs}")
        seen: set[str] = set()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            state = self.layout.read_state()
            for name, info in state.get("procs", {}).items():
                if "ready_after" in info and name not in seen:
                    seen.add(name)
                    self.progress(f"{name} ready ({info['pid']}, {info['ready_after']:.1f}s)")
            phase = state.get("phase", "")
            if phase == "running":
                return
            if phase == "failed":
                sup.wait(60)
                raise ClusterError(state.get("error") or f"the supervisor failed; see {log}")
            if sup.poll() is not None:
                raise ClusterError(f"the supervisor exited with {sup.returncode}; see {log}")
            time.sleep(0.2)
        raise ClusterError("the cluster did not start within 300 s")

    def _import_images(self, root: Path, images: Sequence[str]) -> None:
        subprocess.run(
            [
                sys.executable,
                str(root / "hack" / "images" / "build.py"),
                "import",
                "--address",
                str(self.layout.containerd_sock),
                *images,
            ],
            check=True,
        )

    def _post_start(self) -> None:
        # The apiserver's client identity at the kubelet (exec, logs, port-forward).
        binding = apiserver_kubelet_client_binding("dynvol-local")
        self.kubectl("apply", "-f", "-", input=json.dumps(binding))
        self.kubectl(
            "wait", "--for=condition=Ready", f"node/{NODE_NAME}", "--timeout=120s", timeout=130
        )
        # Pods are admitted only once their namespace's default ServiceAccount exists.
        deadline = time.monotonic() + 60
        while self.kubectl(
            "get", "serviceaccount", "default", "-n", "default", check=False
        ).returncode:
            if time.monotonic() > deadline:
                raise ClusterError(
                    "the default ServiceAccount never appeared; "
                    "see logs/kube-controller-manager.log"
                )
            time.sleep(0.3)

    # --- down -------------------------------------------------------------------------

    def down(self, *, purge: bool = False, grace: int = 10) -> list[str]:
        """Stop and undo everything; returns the problems it could not fix."""
        if not self.dir.exists():
            return []
        with self._locked():
            return self._teardown(purge=purge, grace=grace)

    def _pods_in(self, namespaces: Sequence[str]) -> list[str]:
        found = []
        for ns in namespaces:
            listed = self.kubectl("get", "pods", "-n", ns, "-o", "name", check=False, timeout=30)
            if listed.returncode:
                return []  # the apiserver is gone; containerd's cleanup takes over
            found += listed.stdout.split()
        return found

    def _delete_pods(self, grace: int) -> None:
        """Delete the users' pods, then the system's, each through the kubelet (so that
        volumes are unpublished); force what is still there after the grace period."""
        listed = self.kubectl("get", "pods", "-A", "-o", "json", check=False, timeout=30)
        if listed.returncode:
            self.progress("the apiserver does not answer; skipping pod deletion")
            return
        namespaces = {p["metadata"]["namespace"] for p in json.loads(listed.stdout)["items"]}
        users = sorted(namespaces - set(SYSTEM_NAMESPACES))
        system = [ns for ns in SYSTEM_NAMESPACES if ns in namespaces]
        for group in (users, system):
            if not group:
                continue
            self.progress(f"deleting pods in {', '.join(group)}")
            for ns in group:
                self.kubectl(
                    "delete", "pods", "--all", "-n", ns, "--wait=false",
                    f"--grace-period={grace}", check=False,
                )  # fmt: skip
            deadline = time.monotonic() + grace + 30
            while self._pods_in(group):
                if time.monotonic() > deadline:
                    self.progress("pods still there after the grace period; forcing their deletion")
                    for ns in group:
                        self.kubectl(
                            "delete", "pods", "--all", "-n", ns, "--force", "--grace-period=0",
                            check=False,
                        )  # fmt: skip
                    break
                time.sleep(1)

    def _kill_shims(self) -> None:
        """Without a supervisor: the shims of this containerd, found by their command line."""
        sock = str(self.layout.containerd_sock)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            argv = pids.cmdline(int(entry.name))
            if argv and "containerd-shim" in Path(argv[0]).name and sock in argv:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)

    def _teardown(self, *, purge: bool, quiet: bool = False, grace: int = 10) -> list[str]:
        """Stop and undo everything; returns the problems it could not fix."""
        layout = self.layout
        state = layout.read_state()
        procs: dict[str, dict[str, Any]] = state.get("procs", {})
        sup = state.get("supervisor")
        sup = sup if self._ours(sup) else None

        def pid_of(name: str) -> int | None:
            pid = procs.get(name, {}).get("pid")
            return pid if isinstance(pid, int) and self._ours(pid) else None

        def stop(name: str) -> None:
            if (pid := pid_of(name)) is not None:
                if name in ("kubelet", "containerd"):
                    self.progress(f"stopping {name} ({pid})")
                pids.stop_pid(pid, name, say=self.progress)

        # No controller may recreate or reschedule what is being deleted.
        stop("kube-controller-manager")
        stop("kube-scheduler")
        if pid_of("kube-apiserver") and pid_of("kubelet"):
            self._delete_pods(grace)
        stop("kubelet")
        if pid_of("containerd") is not None:
            remove_containers(layout.containerd_sock)
            stop("containerd")
        # What containerd started (shims, containers) is re-parented to the supervisor.
        if sup is not None:
            keep = {pid_of(n) for n in ("kube-apiserver", "etcd")}
            strays = [p for p in descendants(sup) if p not in keep and pids.alive(p)]
            for p in strays:
                if not quiet:
                    self.progress(f"killing {' '.join(pids.cmdline(p))[:100]} ({p})")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            pids.wait_gone(strays, 10)
        else:
            self._kill_shims()
        stop("kube-apiserver")
        stop("etcd")
        if sup is not None:
            pids.stop_pid(sup, "supervisor", timeout=30, say=self.progress)
        problems = self._undo_host_changes()
        problems += [
            f"{name} ({info.get('pid')}) is still running"
            for name, info in procs.items()
            if self._ours(info.get("pid"))
        ]
        stuck = any(p.startswith("still mounted") for p in problems)
        if purge and not stuck:
            shutil.rmtree(layout.dir, ignore_errors=True)
        elif layout.state_file.exists():
            state.update(phase="down", procs={}, supervisor=None)
            layout.write_state(state)
        return problems

    def _undo_host_changes(self) -> list[str]:
        """Unmount, and remove what the parts left outside the directory."""
        netns = [
            e.mount_point
            for e in mounts_under([NETNS_DIR])
            if e.fs_type == "nsfs" and Path(e.mount_point).name.startswith("cni-")
        ]
        stuck = unmount_all(
            [KUBELET_ROOT, self.dir, CONTAINERD_RUN, *map(Path, netns), *SHARED_PATHS]
        )
        for p in netns:
            with contextlib.suppress(OSError):
                Path(p).unlink()
        if Path(f"/sys/class/net/{BRIDGE}").exists():
            _run(["ip", "link", "delete", BRIDGE], check=False)
        if (KUBELET_ROOT / KUBELET_MARKER).exists() and not stuck:
            shutil.rmtree(KUBELET_ROOT, ignore_errors=True)
        remove_empty_cgroups()
        remove_kubelet_chains()
        for sub in (
            "s",
            "fifo",
            "runc",
            "io.containerd.runtime.v2.task",
            "io.containerd.runtime.v1.linux",
        ):
            shutil.rmtree(CONTAINERD_RUN / sub, ignore_errors=True)
        with contextlib.suppress(OSError):
            CONTAINERD_RUN.rmdir()
        for leftover in (CNI_CACHE / "results", CNI_CACHE / "networks" / NETWORK_NAME):
            shutil.rmtree(leftover, ignore_errors=True)
        return [f"still mounted: {p}" for p in stuck]


# --- the command line --------------------------------------------------------------------


def format_status(report: dict[str, Any]) -> str:
    """``status``'s text: the directory, phase, each process and, when it runs, the node."""
    running = bool(report.get("running"))
    lines = [
        f"dir:        {report['dir']}",
        f"phase:      {report['phase']}"
        + ("" if running or report["phase"] != "running" else " (but something stopped)"),
        f"supervisor: {report['supervisor']}",
    ]
    for name, p in report["processes"].items():
        lines.append(f"  {name:24} {p['pid']!s:>8} {'running' if p['running'] else 'STOPPED'}")
    lines.append(f"mounts:     {report['mounts']} under {KUBELET_ROOT}, {CONTAINERD_RUN} and DIR")
    if running:
        lines.append(f"kubeconfig: {report['kubeconfig']}\n{report['nodes']}")
    return "\n".join(lines)


def _supervise(directory: Path) -> int:
    layout = SingleNodeLayout(directory)
    state = layout.read_state()
    specs = process_specs(layout, state["ports"], Path(state["bin_dir"]))
    return Supervisor(layout, specs, env_name="DYNVOL_LOCAL_CLUSTER").serve()


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hack/local-cluster",
        description="A real single-node Kubernetes cluster on this machine, on loopback.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("up", "down", "status", "_supervise"):
        p = sub.add_parser(name)
        p.add_argument("--dir", type=Path, default=default_dir(), help="state directory")
        if name != "_supervise":
            p.add_argument(
                "--nodes",
                type=int,
                default=1,
                choices=[1],
                help="1 (default): this single node; more: dynvol.testing.cluster",
            )
        if name == "up":
            p.add_argument(
                "--apiserver-port",
                type=int,
                default=DEFAULT_APISERVER_PORT,
                help="the apiserver's port on 127.0.0.1 (default 6443, so that hostNetwork "
                "pods can be given KUBERNETES_SERVICE_PORT; 0 picks a free one)",
            )
            p.add_argument(
                "--images",
                default="pause,busybox,dynvol",
                help="comma-separated images to build and import "
                "(default: pause,busybox,dynvol; pause is always included)",
            )
            p.add_argument(
                "--no-build",
                action="store_true",
                help="fail instead of building missing Kubernetes binaries",
            )
        if name == "down":
            p.add_argument(
                "--purge",
                action="store_true",
                help="also delete the state directory and the imported images",
            )
            p.add_argument(
                "--grace",
                type=int,
                default=10,
                help="grace period in seconds for deleting pods (default 10)",
            )
        if name == "status":
            p.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.cmd == "_supervise":
        return _supervise(args.dir.resolve())
    cluster = SingleNodeCluster(dir=args.dir, progress=say)
    try:
        if args.cmd == "up":
            started = cluster.up(
                images=args.images.split(","),
                apiserver_port=args.apiserver_port,
                build=not args.no_build,
            )
            if started:
                say(f"export KUBECONFIG={cluster.kubeconfig}")
            return 0
        if args.cmd == "down":
            if not cluster.dir.exists():
                say(f"nothing at {cluster.dir}")
                return 0
            began = time.monotonic()
            problems = cluster.down(purge=args.purge, grace=args.grace)
            for problem in problems:
                say(f"PROBLEM: {problem}")
            took = time.monotonic() - began
            say(f"down in {took:.1f}s" + (" (purged)" if args.purge else ""))
            return 1 if problems else 0
        report = cluster.status()
        if args.json:
            print(json.dumps({k: v for k, v in report.items() if k != "running"}, indent=1))
        else:
            print(format_status(report))
        return 0 if report["running"] else 3
    except ClusterError as exc:
        say(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
