"""A node's mount namespace (dynvol.testing.cluster.isolation): its mounts stay in it.

Real namespaces and mounts: two node namespaces are made under a temporary cluster
directory, a tmpfs is mounted below one node's /var/lib/dynamic, and neither the host nor
the other node sees it; removing the namespaces drops every mount in them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynvol.testing.cluster import isolation
from dynvol.testing.cluster.addressing import plan_nodes
from dynvol.testing.cluster.layout import Layout
from dynvol.testing.mounts import lazy_unmount_tree, mounts_under

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None,
    reason="needs root, unshare and nsenter",
)


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[Layout]:
    layout = Layout(tmp_path / "cluster")
    try:
        yield layout
    finally:
        isolation.remove_mount_namespaces(layout)
        lazy_unmount_tree(layout.dir)


def _in_node(layout: Layout, node: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", f"--mount={layout.mount_ns(node)}", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _points(layout: Layout, node: str) -> list[str]:
    table = _in_node(layout, node, "cat", "/proc/self/mountinfo")
    assert table.returncode == 0, table.stderr
    return [line.split()[4] for line in table.stdout.splitlines()]


def test_a_nodes_mounts_stay_in_its_namespace(layout: Layout) -> None:
    one, two = plan_nodes(2)
    for plan in (one, two):
        for d in (
            layout.node(plan.name).kubelet_root,
            layout.node(plan.name).dynamic,
            layout.node(plan.name).cni_cache,
        ):
            d.mkdir(parents=True)
        isolation.create_mount_ns(layout, plan)

    for node in (one.name, two.name):
        points = _points(layout, node)
        for path in ("/run", "/var/lib", "/var/lib/kubelet", "/var/lib/dynamic", "/var/lib/cni"):
            assert path in points, f"{node} has its own {path}"
        table = _in_node(layout, node, "cat", "/proc/self/mountinfo").stdout
        # The last mount at a path is the one on top (the host's, if any, is below /var/lib).
        dynamic = [line for line in table.splitlines() if line.split()[4] == "/var/lib/dynamic"][-1]
        assert "shared:" in dynamic, "the node's /var/lib/dynamic is rshared, as containerd needs"

    made = _in_node(
        layout, one.name, "sh", "-c",
        "mkdir -p /var/lib/dynamic/xvols/t && mount -t tmpfs probe /var/lib/dynamic/xvols/t"
        " && echo data > /var/lib/dynamic/xvols/t/f",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "/var/lib/dynamic/xvols/t" in _points(layout, one.name)
    assert "/var/lib/dynamic/xvols/t" not in _points(layout, two.name)
    host = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    assert "/var/lib/dynamic/xvols/t" not in host
    assert not [p for p in mounts_under(layout.dir) if not p.startswith(str(layout.namespaces))]
    # The directory below the mount is the node's own, on the host's disk: the tmpfs hides
    # what is there only inside the node.
    assert (layout.node(one.name).dynamic / "xvols" / "t").is_dir()
    assert not (layout.node(one.name).dynamic / "xvols" / "t" / "f").exists()

    assert isolation.remove_mount_namespaces(layout) == []
    assert mounts_under(layout.namespaces) == []


def test_making_the_namespace_again_keeps_the_first(layout: Layout) -> None:
    (plan,) = plan_nodes(1)
    for d in (
        layout.node(plan.name).kubelet_root,
        layout.node(plan.name).dynamic,
        layout.node(plan.name).cni_cache,
    ):
        d.mkdir(parents=True)
    isolation.create_mount_ns(layout, plan)
    marker = _in_node(layout, plan.name, "sh", "-c", "mount -t tmpfs keep /var/lib/cni")
    assert marker.returncode == 0, marker.stderr
    isolation.create_mount_ns(layout, plan)
    table = _in_node(layout, plan.name, "cat", "/proc/self/mountinfo").stdout
    assert any(
        line.split()[4] == "/var/lib/cni" and " keep " in line for line in table.splitlines()
    )
