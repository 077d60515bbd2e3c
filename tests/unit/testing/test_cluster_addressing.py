"""The multi-node cluster's address plan: distinct, inside its own ranges, valid names."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynvol.testing.cluster.addressing import (
    HOST_ADDRESS,
    MAX_NODES,
    NODE_NETWORK,
    POD_NETWORK,
    SERVICE_NETWORK,
    plan_nodes,
)

counts = st.integers(min_value=1, max_value=MAX_NODES)


@given(counts)
def test_every_node_has_its_own_address_pod_network_and_names(count: int) -> None:
    plans = plan_nodes(count)
    assert [p.index for p in plans] == list(range(1, count + 1))
    assert len({p.address for p in plans}) == count
    assert len({p.pod_cidr for p in plans}) == count
    assert len({p.name for p in plans}) == len({p.netns for p in plans}) == count
    assert len({p.host_veth for p in plans}) == count
    for p in plans:
        assert p.address in NODE_NETWORK
        assert p.address != HOST_ADDRESS
        assert p.pod_cidr.subnet_of(POD_NETWORK)  # type: ignore[arg-type]
        assert p.pod_gateway in p.pod_cidr
        assert len(p.host_veth) <= 15, "Linux limits interface names to 15 characters"
    for a in plans:
        for b in plans:
            if a is not b:
                assert not a.pod_cidr.overlaps(b.pod_cidr)


@given(counts)
def test_routes_reach_every_other_node_through_that_node(count: int) -> None:
    plans = plan_nodes(count)
    for p in plans:
        routes = dict(p.routes(plans))
        assert str(p.pod_cidr) not in routes, "a node's own pods are on its bridge"
        assert routes == {str(o.pod_cidr): str(o.address) for o in plans if o is not p}


def test_ranges_are_private_and_disjoint() -> None:
    nets = (NODE_NETWORK, POD_NETWORK, SERVICE_NETWORK)
    for net in nets:
        assert net.is_private
    for a in nets:
        for b in nets:
            if a is not b:
                assert not a.overlaps(b)  # type: ignore[arg-type]
    assert ipaddress.ip_network("127.0.0.0/8").overlaps(NODE_NETWORK) is False


@pytest.mark.parametrize("bad", [0, -1, MAX_NODES + 1])
def test_a_node_count_out_of_range_is_refused_by_name(bad: int) -> None:
    with pytest.raises(ValueError, match="nodes: must be between 1 and"):
        plan_nodes(bad)


@pytest.mark.parametrize("bad", ["3", 2.0, True, None])
def test_a_node_count_that_is_not_an_integer_is_refused(bad: object) -> None:
    with pytest.raises(TypeError, match="nodes: expected an integer"):
        plan_nodes(bad)  # type: ignore[arg-type]
