"""Each node's own mount namespace and cgroup root.

A node's mount namespace is a slave of the host's (the host's unmounts reach it; its
mounts never reach the host), kept alive by a bind of its nsfs file under
``DIR/ns`` (itself a private bind, as ``unshare --mount=FILE`` requires). In it, fresh
tmpfs mounts cover ``/run`` and ``/var/lib``, and the node's directories are bound to
``/var/lib/kubelet``, ``/var/lib/dynamic`` (made rshared, as on a real node whose ``/`` is
shared) and ``/var/lib/cni``: nodes share no mounts, and nothing of them is made on the host.

Neighbours: :mod:`dynvol.testing.cluster.configs` runs each node's processes with
``nsenter --mount`` on the file made here.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
from pathlib import Path

from dynvol.testing.cluster.addressing import NodePlan
from dynvol.testing.cluster.configs import cgroup_root
from dynvol.testing.cluster.layout import Layout
from dynvol.testing.mounts import mounts_under
from dynvol.testing.processes import run

__all__ = [
    "create_cgroups",
    "create_mount_ns",
    "remove_cgroup_trees",
    "remove_cgroups",
    "remove_mount_namespaces",
]

CGROUP_FS = Path("/sys/fs/cgroup")


def _ensure_private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if str(path) not in mounts_under(path):
        run(["mount", "--bind", str(path), str(path)])
    run(["mount", "--make-private", str(path)])


def create_mount_ns(layout: Layout, node: NodePlan) -> None:
    """Make (or keep) the node's mount namespace with its own /run and /var/lib."""
    _ensure_private_dir(layout.namespaces)
    ns_file = layout.mount_ns(node.name)
    if str(ns_file) in mounts_under(layout.namespaces):
        return
    ns_file.touch()
    nl = layout.node(node.name)
    binds = (
        (nl.kubelet_root, "/var/lib/kubelet"),
        (nl.dynamic, "/var/lib/dynamic"),
        (nl.cni_cache, "/var/lib/cni"),
    )
    script = ["set -e"]
    # The host's own mounts there (the single-node cluster's /var/lib/kubelet and
    # /var/lib/dynamic binds, and its pods' volumes) arrive as slave copies. Left beneath
    # the tmpfs they still come first in the node's mount table, where containerd, looking
    # for the mount of a Bidirectional hostPath, would take the host's (not shared) for the
    # node's own. Unmounting a slave copy does not reach the host.
    for _, dst in binds:
        script.append(f"while mountpoint -q {dst}; do umount -l {dst}; done")
    script += [
        "mount -t tmpfs -o mode=0755 dvmn-run /run",
        "mount -t tmpfs -o mode=0755 dvmn-varlib /var/lib",
        "mkdir -p /run/containerd /run/netns",
    ]
    for src, dst in binds:
        script += [f"mkdir -p {dst}", f"mount --bind {shlex.quote(str(src))} {dst}"]
    # As on a machine whose / is shared: containerd wants a shared source for Bidirectional.
    script += ["mount --make-rshared /var/lib/dynamic", "mount --make-rshared /var/lib/kubelet"]
    run(
        [
            "unshare",
            f"--mount={ns_file}",
            "--propagation",
            "slave",
            "--",
            "/bin/sh",
            "-c",
            "\n".join(script),
        ],
        timeout=30,
    )


def remove_mount_namespaces(layout: Layout) -> list[str]:
    """Unmount every node's namespace file and the private dir; returns what is left."""
    if not layout.namespaces.exists():
        return []
    for point in sorted(mounts_under(layout.namespaces), reverse=True):
        if point != str(layout.namespaces):
            subprocess.run(["umount", point], capture_output=True, check=False)
    left = [p for p in mounts_under(layout.namespaces) if p != str(layout.namespaces)]
    if not left:
        subprocess.run(["umount", str(layout.namespaces)], capture_output=True, check=False)
    return left


def _hierarchies() -> list[Path]:
    if (CGROUP_FS / "cgroup.controllers").exists():
        return [CGROUP_FS]
    return [p for p in CGROUP_FS.iterdir() if p.is_dir() and not p.is_symlink()]


def create_cgroups(node: NodePlan) -> None:
    """The node's cgroup root in every hierarchy (the kubelet requires it to exist)."""
    rel = cgroup_root(node).lstrip("/")
    for hierarchy in _hierarchies():
        path = hierarchy / rel
        path.mkdir(exist_ok=True)
        # A new cpuset cgroup (v1) has no CPUs and memory nodes until given its parent's.
        for name in ("cpuset.cpus", "cpuset.mems"):
            if (path / name).exists() and not (path / name).read_text().strip():
                (path / name).write_text((hierarchy / name).read_text())


def remove_cgroup_trees(rel: str) -> list[str]:
    """Remove the cgroup ``rel`` (``kubepods``, ``dvmn-1``) and what is below it in every
    hierarchy, deepest first (only empty cgroups can go); returns the tops still there."""
    left = []
    for hierarchy in _hierarchies():
        top = hierarchy / rel.lstrip("/")
        if not top.is_dir():
            continue
        for path in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir():
                with contextlib.suppress(OSError):
                    path.rmdir()
        try:
            top.rmdir()
        except OSError:
            left.append(str(top))
    return left


def remove_cgroups(node: NodePlan) -> list[str]:
    """Remove the node's cgroups, deepest first; returns those that are not empty."""
    return remove_cgroup_trees(cgroup_root(node))
