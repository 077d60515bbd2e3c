"""Names and addresses of a multi-node local cluster: pure planning, no I/O.

Every address is in ranges that this package uses and nothing else on the machine does:

- ``10.233.0.0/24`` is the node network: the host bridge ``dvmn0`` has ``10.233.0.1`` (the
  apiserver listens there), node ``i`` (1-based) has ``10.233.0.(10 + i)`` on the ``eth0``
  end of a veth pair whose host end ``dvmn-h<i>`` is a port of the bridge.
- ``10.234.<i>.0/24`` is node ``i``'s pod network, behind the node's own CNI bridge
  ``cni0`` (gateway ``10.234.<i>.1``). Every node, and the host, routes the other nodes'
  pod networks via those nodes' addresses; the host does not forward, so nothing from a
  pod leaves the machine.
- ``10.235.0.0/24`` is the Service network that each node's kube-proxy programs; the
  ``kubernetes`` Service is ``10.235.0.1`` and the cluster DNS address ``10.235.0.10``.

Neighbours: :mod:`dynvol.testing.cluster.network` applies a :class:`NodePlan`,
:mod:`dynvol.testing.cluster.nodes` configures each node's processes from it.
"""

from __future__ import annotations

import ipaddress

import attrs

__all__ = [
    "BRIDGE",
    "HOST_ADDRESS",
    "MAX_NODES",
    "NODE_NETWORK",
    "POD_NETWORK",
    "SERVICE_NETWORK",
    "NodePlan",
    "plan_nodes",
]

BRIDGE = "dvmn0"
NODE_NETWORK = ipaddress.ip_network("10.233.0.0/24")
HOST_ADDRESS = ipaddress.ip_address("10.233.0.1")
POD_NETWORK = ipaddress.ip_network("10.234.0.0/16")
SERVICE_NETWORK = ipaddress.ip_network("10.235.0.0/24")
KUBERNETES_SERVICE_ADDRESS = ipaddress.ip_address("10.235.0.1")
DNS_SERVICE_ADDRESS = ipaddress.ip_address("10.235.0.10")
#: Node addresses are .11 to .(10 + MAX_NODES) of the node network; pod networks 10.234.1-.
MAX_NODES = 32


@attrs.frozen(kw_only=True)
class NodePlan:
    """Where node ``index`` lives on the network, and what it is called."""

    index: int
    name: str
    address: ipaddress.IPv4Address
    pod_cidr: ipaddress.IPv4Network
    #: The network namespace under /run/netns.
    netns: str
    #: The host end of the node's veth pair (at most 15 characters, as Linux wants).
    host_veth: str

    @property
    def pod_gateway(self) -> ipaddress.IPv4Address:
        return self.pod_cidr.network_address + 1

    def routes(self, nodes: tuple[NodePlan, ...]) -> tuple[tuple[str, str], ...]:
        """(destination, via) for every other node's pod network, as this node needs them."""
        return tuple(
            (str(other.pod_cidr), str(other.address))
            for other in nodes
            if other.index != self.index
        )


def plan_nodes(count: int) -> tuple[NodePlan, ...]:
    """The plans of nodes ``1..count``; ``count`` must be between 1 and :data:`MAX_NODES`."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"nodes: expected an integer, got {type(count).__name__}")
    if not 1 <= count <= MAX_NODES:
        raise ValueError(f"nodes: must be between 1 and {MAX_NODES}, got {count}")
    plans = []
    for index in range(1, count + 1):
        plans.append(
            NodePlan(
                index=index,
                name=f"node-{index}",
                address=ipaddress.IPv4Address(int(NODE_NETWORK.network_address) + 10 + index),
                pod_cidr=ipaddress.IPv4Network(f"10.234.{index}.0/24"),
                netns=f"dvmn-{index}",
                host_veth=f"dvmn-h{index}",
            )
        )
    return tuple(plans)
