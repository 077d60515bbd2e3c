"""free_port(): ports outside the kernel's ephemeral range, from the lane's own range, never
the same one twice, and never one that is taken."""

from __future__ import annotations

import itertools
import socket

import pytest

from dynvol.testing import processes
from dynvol.testing.lanes import LANE_PORTS
from dynvol.testing.processes import DEFAULT_PORTS, PORTS_ENV, free_port, port_range


def _ephemeral() -> tuple[int, int]:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = f.read().split()
    return int(low), int(high)


def test_the_default_range_lies_below_nodeports_and_the_kernels_ephemeral_ports() -> None:
    assert port_range({}) == DEFAULT_PORTS
    low, high = DEFAULT_PORTS
    assert 1024 < low <= high < _ephemeral()[0]
    assert high < 30000, "Kubernetes' default NodePort range starts at 30000"


def test_the_lanes_split_the_default_range_without_overlap() -> None:
    ranges = sorted(port_range({PORTS_ENV: r}) for r in LANE_PORTS.values())
    for (_, high), (low, _) in itertools.pairwise(ranges):
        assert high < low
    assert ranges[0][0] >= DEFAULT_PORTS[0]
    assert ranges[-1][1] <= DEFAULT_PORTS[1]


@pytest.mark.parametrize("raw", ["20000", "a-b", "2000-1999", "80-90", "20000-70000", "-1-5"])
def test_a_malformed_range_is_refused_naming_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match=PORTS_ENV):
        port_range({PORTS_ENV: raw})


def test_ports_come_from_the_range_once_each_and_never_taken_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(processes, "_GIVEN", set())
    with socket.socket() as held:
        # A narrow range with one port already listening: only the others come out.
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        monkeypatch.setenv(PORTS_ENV, f"{taken}-{taken + 3}")
        got = {free_port() for _ in range(3)}
        assert taken not in got
        assert len(got) == 3
        assert got <= set(range(taken + 1, taken + 4))
        # Every port handed out: the range is used up, and it says so.
        with pytest.raises(RuntimeError, match=PORTS_ENV):
            free_port()
