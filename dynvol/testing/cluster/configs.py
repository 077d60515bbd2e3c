"""What each process of a multi-node cluster runs with: argv, configuration, readiness.

Pure functions of the layout, the node plans, the ports and the binaries' paths; they
write configuration files but start nothing. The control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler) runs in the host's namespaces; each node's
containerd, kubelet and kube-proxy run through ``nsenter`` in that node's network and
mount namespaces.

Neighbours: :mod:`dynvol.testing.cluster.supervisor` starts the :class:`Spec` values in
order; :mod:`dynvol.testing.cluster.cluster` writes the files before that.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from dynvol.testing.cluster.addressing import (
    HOST_ADDRESS,
    POD_NETWORK,
    SERVICE_NETWORK,
    NodePlan,
)
from dynvol.testing.cluster.layout import Layout, NodeLayout
from dynvol.testing.cluster.network import netns_path

__all__ = [
    "MULTINODE",
    "PAUSE_IMAGE",
    "ControlPlaneProfile",
    "Spec",
    "apiserver_kubelet_client_binding",
    "bridge_network",
    "containerd_toml",
    "control_plane_specs",
    "kubelet_configuration",
    "node_specs",
    "write_kubeconfig",
    "write_node_files",
]

PAUSE_IMAGE = "localhost/dynvol/pause:dev"
CNI_BIN = Path("/usr/lib/cni")
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Ports of each node's kubelet and kube-proxy on the node's own address.
KUBELET_PORT = 10250
KUBELET_HEALTHZ_PORT = 10248
KUBE_PROXY_HEALTHZ_PORT = 10256


@attrs.frozen(kw_only=True)
class Spec:
    """A process, how to start it and when it is ready."""

    name: str
    argv: tuple[str, ...]
    ready: Callable[[], bool]
    timeout: float = 90.0
    env: tuple[tuple[str, str], ...] = ()


def http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _admin_context(layout: Layout, *, verify: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(layout.pki / "ca.crt"))
    if not verify:
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.load_cert_chain(str(layout.pki / "admin.crt"), str(layout.pki / "admin.key"))
    return ctx


def containerd_ready(sock: Path) -> bool:
    if not sock.exists():
        return False
    proc = subprocess.run(
        ["ctr", "--address", str(sock), "version"], capture_output=True, timeout=10, check=False
    )
    return proc.returncode == 0


def server_url(ports: dict[str, int]) -> str:
    return f"https://{HOST_ADDRESS}:{ports['apiserver']}"


@attrs.frozen(kw_only=True)
class ControlPlaneProfile:
    """What differs between the control planes of the clusters this package runs; the
    defaults are the multi-node cluster's (:data:`MULTINODE`), the single node's are in
    :mod:`dynvol.testing.cluster.single`."""

    #: etcd's member name.
    name: str = "dynvol-multinode"
    #: Where the apiserver listens and what it advertises.
    address: str = str(HOST_ADDRESS)
    service_network: str = str(SERVICE_NETWORK)
    kubelet_address_types: str = "InternalIP"
    etcd_args: tuple[str, ...] = ()
    apiserver_args: tuple[str, ...] = ()
    # A lost node is noticed within 20 s (the default is 50 s).
    controller_manager_args: tuple[str, ...] = ("--node-monitor-grace-period=20s",)
    scheduler_args: tuple[str, ...] = ()

    def server(self, ports: dict[str, int]) -> str:
        return f"https://{self.address}:{ports['apiserver']}"


MULTINODE = ControlPlaneProfile()


def control_plane_specs(
    layout: Layout,
    ports: dict[str, int],
    bin_dir: Path,
    profile: ControlPlaneProfile = MULTINODE,
) -> list[Spec]:
    pki = layout.pki
    etcd_url = f"http://127.0.0.1:{ports['etcd']}"
    peer = f"http://127.0.0.1:{ports['etcd-peer']}"
    server = profile.server(ports)

    def component(name: str) -> tuple[str, ...]:
        kubeconfig = str(layout.kubeconfig_for(name))
        return (
            "--kubeconfig",
            kubeconfig,
            "--authentication-kubeconfig",
            kubeconfig,
            "--authorization-kubeconfig",
            kubeconfig,
            "--bind-address",
            "127.0.0.1",
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
        )

    return [
        Spec(
            name="etcd",
            argv=(
                str(bin_dir / "etcd"),
                f"--name={profile.name}",
                f"--data-dir={layout.etcd_data}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster={profile.name}={peer}",
                f"--listen-metrics-urls=http://127.0.0.1:{ports['etcd-metrics']}",
                "--logger=zap",
                "--log-outputs=stderr",
                *profile.etcd_args,
            ),
            ready=lambda: http_ok(f"{etcd_url}/health"),
            timeout=30,
        ),
        Spec(
            name="kube-apiserver",
            argv=(
                str(bin_dir / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                # The host end of the node network: kubelets and pods reach it there.
                f"--bind-address={profile.address}",
                f"--advertise-address={profile.address}",
                f"--secure-port={ports['apiserver']}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
                f"--kubelet-certificate-authority={pki / 'ca.crt'}",
                f"--kubelet-preferred-address-types={profile.kubelet_address_types}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={profile.service_network}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                # The host has no kube-proxy: the apiserver calls webhook Services through
                # their endpoints (pod addresses, routed to each node).
                "--enable-aggregator-routing=true",
                "--profiling=false",
                "--v=1",
                *profile.apiserver_args,
            ),
            ready=lambda: http_ok(f"{server}/readyz", _admin_context(layout)),
        ),
        Spec(
            name="kube-controller-manager",
            argv=(
                str(bin_dir / "kube-controller-manager"),
                *component("kube-controller-manager"),
                f"--secure-port={ports['kcm']}",
                f"--cert-dir={layout.dir / 'kcm-certs'}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                "--use-service-account-credentials=true",
                f"--service-cluster-ip-range={profile.service_network}",
                "--allocate-node-cidrs=false",
                *profile.controller_manager_args,
            ),
            ready=lambda: http_ok(
                f"https://127.0.0.1:{ports['kcm']}/healthz", _admin_context(layout, verify=False)
            ),
        ),
        Spec(
            name="kube-scheduler",
            argv=(
                str(bin_dir / "kube-scheduler"),
                *component("kube-scheduler"),
                f"--secure-port={ports['scheduler']}",
                *profile.scheduler_args,
            ),
            ready=lambda: http_ok(
                f"https://127.0.0.1:{ports['scheduler']}/healthz",
                _admin_context(layout, verify=False),
            ),
        ),
    ]


def _in_node(layout: Layout, node: NodePlan, argv: tuple[str, ...]) -> tuple[str, ...]:
    """``argv`` run in the node's network and mount namespaces (nsenter execs it, so the
    PID is the process's own)."""
    return (
        shutil.which("nsenter") or "/usr/bin/nsenter",
        f"--net={netns_path(node)}",
        f"--mount={layout.mount_ns(node.name)}",
        "--",
        *argv,
    )


def node_specs(layout: Layout, node: NodePlan, bin_dir: Path) -> list[Spec]:
    nl = layout.node(node.name)
    addr = str(node.address)
    return [
        Spec(
            name=f"{node.name}/containerd",
            argv=_in_node(
                layout,
                node,
                (
                    shutil.which("containerd") or "/usr/bin/containerd",
                    "--config",
                    str(nl.config / "containerd.toml"),
                ),
            ),
            ready=lambda: containerd_ready(nl.containerd_sock),
            timeout=60,
            env=(("PATH", HOST_PATH),),
        ),
        Spec(
            name=f"{node.name}/kubelet",
            argv=_in_node(
                layout,
                node,
                (
                    str(bin_dir / "kubelet"),
                    f"--config={nl.config / 'kubelet.json'}",
                    f"--kubeconfig={layout.kubeconfig_for(node.name)}",
                    f"--hostname-override={node.name}",
                    f"--node-ip={addr}",
                    "--root-dir=/var/lib/kubelet",
                    f"--node-labels=dynvol.local/cluster=multinode,dynvol.local/node-index={node.index}",
                    "--v=2",
                ),
            ),
            ready=lambda: http_ok(f"http://{addr}:{KUBELET_HEALTHZ_PORT}/healthz"),
            env=(("PATH", HOST_PATH),),
        ),
        Spec(
            name=f"{node.name}/kube-proxy",
            argv=_in_node(
                layout,
                node,
                (str(bin_dir / "kube-proxy"), f"--config={nl.config / 'kube-proxy.json'}", "--v=1"),
            ),
            ready=lambda: http_ok(f"http://{addr}:{KUBE_PROXY_HEALTHZ_PORT}/healthz"),
            timeout=60,
            env=(("PATH", HOST_PATH),),
        ),
    ]


def containerd_toml(
    *, root: Path, sock: Path, stream_address: str, cni_conf: Path, header: str
) -> str:
    """containerd's configuration: its root, state, runc root and opt directory under
    ``root``, its socket at ``sock``, the CRI streaming server on ``stream_address``, CNI
    configuration from ``cni_conf``; ``header`` is the comment at the top."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    runc = shutil.which("runc") or "/usr/sbin/runc"
    return f"""\
# {header}
version = 2
root = "{root / "root"}"
state = "{root / "state"}"
plugin_dir = ""
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{root / "opt"}"

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "{stream_address}"
  stream_server_port = "0"
  # Pod network namespaces under containerd's state directory, not /run/netns.
  netns_mounts_under_state_dir = true
  # This machine withholds CAP_SYS_RESOURCE, so no process may lower its OOM score below
  # its parent's; the kubelet asks -998 for sandboxes, and runc would fail with "failed to
  # update /proc/self/oom_score_adj: Permission denied" (see local-cluster.md).
  restrict_oom_score_adj = true
  enable_selinux = false
  disable_apparmor = true
  max_concurrent_downloads = 1

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  BinaryName = "{runc}"
  Root = "{root / "runc"}"
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{cni_conf}"
  max_conf_num = 1
"""


def containerd_config(nl: NodeLayout, node: NodePlan) -> str:
    return containerd_toml(
        root=nl.containerd,
        sock=nl.containerd_sock,
        stream_address=str(node.address),
        cni_conf=nl.cni_conf,
        header=f"Written by dynvol.testing.cluster for {node.name}; paths are under the "
        "cluster's directory,\n# except /run/containerd, which is the node's own tmpfs in "
        "its mount namespace.",
    )


def bridge_network(
    *, name: str, bridge: str, subnet: str, ipam_dir: Path, gateway: str | None
) -> dict[str, Any]:
    """A CNI network list: a ``bridge`` with ``host-local`` addresses from ``subnet``.

    With a ``gateway``, the bridge has that address and is the pods' default route (with
    hairpin mode and port mappings). Without one, the bridge is a closed segment: no
    address, no gateway, no routes, so pods reach each other and nothing else. Never any
    masquerading.
    """
    ranges: dict[str, str] = {"subnet": subnet}
    if gateway is not None:
        ranges["gateway"] = gateway
    plugins: list[dict[str, Any]] = [
        {
            "type": "bridge",
            "bridge": bridge,
            "isGateway": gateway is not None,
            "isDefaultGateway": gateway is not None,
            "ipMasq": False,
            "hairpinMode": gateway is not None,
            "ipam": {"type": "host-local", "ranges": [[ranges]], "dataDir": str(ipam_dir)},
        }
    ]
    if gateway is not None:
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True}})
    return {"cniVersion": "1.0.0", "name": name, "plugins": plugins}


def cni_config(nl: NodeLayout, node: NodePlan) -> dict[str, Any]:
    # The node's bridge is its pods' gateway; no masquerading, so pods keep their
    # addresses across nodes (the routes of network.create carry them).
    return bridge_network(
        name="dynvol-multinode",
        bridge="cni0",
        subnet=str(node.pod_cidr),
        ipam_dir=nl.ipam,
        gateway=str(node.pod_gateway),
    )


def cgroup_root(node: NodePlan) -> str:
    """Each kubelet's own cgroup root, so that nodes do not manage each other's pods."""
    return f"/dvmn-{node.index}"


def kubelet_configuration(
    *,
    address: str,
    port: int,
    healthz_port: int,
    serving: tuple[Path, Path],
    client_ca: Path,
    runtime_sock: Path,
    cluster_dns: list[str],
    cgroup_root: str | None = None,
) -> dict[str, Any]:
    """A KubeletConfiguration: serving on ``address`` with the certificate and key
    ``serving``, clients checked against ``client_ca`` and the apiserver, the runtime at
    ``runtime_sock``; ``cgroup_root`` None for the kubelet's default."""
    config: dict[str, Any] = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": address,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": address,
        "healthzPort": healthz_port,
        "tlsCertFile": str(serving[0]),
        "tlsPrivateKeyFile": str(serving[1]),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(client_ca)},
        },
        "authorization": {"mode": "Webhook"},
        "cgroupDriver": "cgroupfs",
        # This kernel mounts only cgroup v1 controllers under /sys/fs/cgroup. From v1.35
        # on, a kubelet refuses to start on cgroup v1 unless this is false; see
        # docs/local-cluster.md.
        "failCgroupV1": False,
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{runtime_sock}",
        "imageServiceEndpoint": f"unix://{runtime_sock}",
        "clusterDomain": "cluster.local",
        "clusterDNS": cluster_dns,
        "resolvConf": "/etc/resolv.conf",
        # Images cannot be pulled again here, so the kubelet must never collect them, and
        # a nearly full disk must not evict the pods of a test run.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "serializeImagePulls": False,
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "staticPodPath": "",
        "maxPods": 110,
        "nodeStatusUpdateFrequency": "5s",
        "shutdownGracePeriod": "0s",
        # No kubelet chains: on the single node they would be the host's firewall, on a
        # node of several its own network namespace's, whose NAT rules kube-proxy owns.
        "makeIPTablesUtilChains": False,
        "containerLogMaxSize": "10Mi",
    }
    if cgroup_root is not None:
        config["cgroupRoot"] = cgroup_root
    return config


def kubelet_config(layout: Layout, node: NodePlan, dns: list[str]) -> dict[str, Any]:
    nl, pki = layout.node(node.name), layout.pki
    return kubelet_configuration(
        address=str(node.address),
        port=KUBELET_PORT,
        healthz_port=KUBELET_HEALTHZ_PORT,
        serving=(pki / f"{node.name}-serving.crt", pki / f"{node.name}-serving.key"),
        client_ca=pki / "ca.crt",
        runtime_sock=nl.containerd_sock,
        cluster_dns=dns,
        cgroup_root=cgroup_root(node),
    )


def kube_proxy_config(layout: Layout, node: NodePlan) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(layout.kubeconfig_for(f"{node.name}-proxy"))},
        "hostnameOverride": node.name,
        "bindAddress": str(node.address),
        "healthzBindAddress": f"{node.address}:{KUBE_PROXY_HEALTHZ_PORT}",
        "metricsBindAddress": "127.0.0.1:10249",
        "clusterCIDR": str(POD_NETWORK),
        # The conntrack table is the kernel's, not the namespace's: leave its sizes and
        # timeouts alone (0 means "do not set").
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }


def write_node_files(layout: Layout, node: NodePlan, dns: list[str]) -> None:
    nl = layout.node(node.name)
    for d in (nl.config, nl.cni_conf, nl.containerd, nl.kubelet_root, nl.dynamic, nl.cni_cache):
        d.mkdir(parents=True, exist_ok=True)
    (nl.config / "containerd.toml").write_text(containerd_config(nl, node))
    (nl.cni_conf / "10-dynvol.conflist").write_text(json.dumps(cni_config(nl, node), indent=1))
    (nl.config / "kubelet.json").write_text(json.dumps(kubelet_config(layout, node, dns), indent=1))
    (nl.config / "kube-proxy.json").write_text(
        json.dumps(kube_proxy_config(layout, node), indent=1)
    )


def write_kubeconfig(
    path: Path,
    *,
    server: str,
    ca: Path,
    cert: Path,
    key: Path,
    cluster: str = "dynvol-multinode",
    user: str = "user",
) -> None:
    """A kubeconfig for ``server`` with a client certificate, readable by root only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": cluster, "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [
            {"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}
        ],
        "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": user}}],
        "current-context": cluster,
    }
    path.write_text(json.dumps(config, indent=1))
    path.chmod(0o600)


def apiserver_kubelet_client_binding(prefix: str) -> dict[str, Any]:
    """The ClusterRoleBinding that lets the apiserver's kubelet client identity use the
    kubelets' API (exec, logs, port-forward)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": f"{prefix}:apiserver-kubelet-client"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "system:kubelet-api-admin",
        },
        "subjects": [
            {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "User",
                "name": "kube-apiserver-kubelet-client",
            }
        ],
    }
