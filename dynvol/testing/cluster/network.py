"""The node network: a host bridge, one network namespace per node, routes between them.

Applies what :mod:`dynvol.testing.cluster.addressing` plans, with ``ip`` and ``sysctl``.
The host gets the bridge address and routes to each node's pod network, and keeps
``net.ipv4.ip_forward`` as it is (off here): nodes talk to each other over the bridge
(switched, not forwarded) and forward for their own pods inside their namespaces.

Neighbours: :mod:`dynvol.testing.cluster.nodes` starts each node's processes in the
namespace made here; :mod:`dynvol.testing.cluster.cluster` calls :func:`create` and
:func:`remove`.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Sequence
from pathlib import Path

from dynvol.testing.cluster.addressing import BRIDGE, HOST_ADDRESS, NODE_NETWORK, NodePlan
from dynvol.testing.mounts import mounts_under
from dynvol.testing.processes import run

__all__ = ["create", "exists", "netns_path", "remove"]

NETNS_DIR = Path("/run/netns")


def netns_path(node: NodePlan) -> Path:
    return NETNS_DIR / node.netns


def _ip(*args: str, netns: str | None = None) -> str:
    argv = ["ip", *(("-n", netns) if netns else ()), *args]
    return run(argv, timeout=30)


def exists(nodes: Sequence[NodePlan]) -> list[str]:
    """What of the network is there now (bridge, namespaces, veths), by name."""
    found = []
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        found.append(BRIDGE)
    for node in nodes:
        if netns_path(node).exists():
            found.append(node.netns)
        if Path(f"/sys/class/net/{node.host_veth}").exists():
            found.append(node.host_veth)
    return found


def _netns_dir_mounted() -> bool:
    return str(NETNS_DIR) in mounts_under(NETNS_DIR)


def create(nodes: Sequence[NodePlan], *, marker: Path) -> None:
    """Make the bridge, each node's namespace and veth, addresses, routes and sysctls.

    The first ``ip netns add`` on a machine binds ``/run/netns`` onto itself (shared), and
    nothing else ever undoes that. When this call is the one that makes that mount,
    ``marker`` records it, so that :func:`remove` unmounts it again once the directory holds
    no namespace: the cluster leaves the mount table as it found it.
    """
    prefix = NODE_NETWORK.prefixlen
    if not _netns_dir_mounted() and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{NETNS_DIR} was not a mount point before this cluster\n")
    if not Path(f"/sys/class/net/{BRIDGE}").exists():
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{HOST_ADDRESS}/{prefix}", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    for node in nodes:
        if not netns_path(node).exists():
            _ip("netns", "add", node.netns)
        ns = node.netns
        if not Path(f"/sys/class/net/{node.host_veth}").exists():
            _ip("link", "add", node.host_veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", node.host_veth, "master", BRIDGE, "up")
        addrs = _ip("-4", "-o", "addr", "show", "dev", "eth0", netns=ns)
        if f"{node.address}/" not in addrs:
            _ip("addr", "add", f"{node.address}/{prefix}", "dev", "eth0", netns=ns)
        _ip("link", "set", "lo", "up", netns=ns)
        _ip("link", "set", "eth0", "up", netns=ns)
        # Pods of this node reach the apiserver and other nodes' pods through eth0; there
        # is no default route, so nothing is sent anywhere else.
        run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"])
        for dest, via in node.routes(tuple(nodes)):
            _ip("route", "replace", dest, "via", via, "dev", "eth0", netns=ns)
    for node in nodes:
        _ip("route", "replace", str(node.pod_cidr), "via", str(node.address), "dev", BRIDGE)


def remove(nodes: Sequence[NodePlan], *, marker: Path) -> list[str]:
    """Remove namespaces, veths, host routes and the bridge; returns what is left.

    ``/run/netns`` is unmounted too if :func:`create` recorded in ``marker`` that it made
    that mount and no namespace is left in it (another user's would keep it).
    """
    for node in nodes:
        with contextlib.suppress(RuntimeError):
            _ip("route", "del", str(node.pod_cidr))
        if Path(f"/sys/class/net/{node.host_veth}").exists():
            with contextlib.suppress(RuntimeError):
                _ip("link", "del", node.host_veth)
        if netns_path(node).exists():
            subprocess.run(["ip", "netns", "del", node.netns], capture_output=True, check=False)
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        with contextlib.suppress(RuntimeError):
            _ip("link", "del", BRIDGE)
    left = exists(nodes)
    if marker.exists():
        if _netns_dir_mounted() and not any(NETNS_DIR.iterdir()):
            subprocess.run(["umount", str(NETNS_DIR)], capture_output=True, check=False)
        if not _netns_dir_mounted():
            marker.unlink()
        else:
            left.append(f"{NETNS_DIR} (mounted by this cluster, still holds namespaces)")
    return left
