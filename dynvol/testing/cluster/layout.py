"""Where a multi-node cluster keeps its state, and the state file itself.

Everything is under one directory (default ``$DYNVOL_MULTINODE_DIR``, else
``${XDG_STATE_HOME:-~/.local/state}/dynvol/multinode``), apart from the kernel objects
(bridge, network namespaces, cgroups) named in :mod:`dynvol.testing.cluster.addressing`.
Each node's ``/var/lib/kubelet``, ``/var/lib/dynamic``, ``/var/lib/cni`` and containerd
root and state live in ``nodes/<name>/`` and are bind-mounted into that node's mount
namespace only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import attrs

__all__ = ["Layout", "NodeLayout", "default_dir"]


def default_dir() -> Path:
    env = os.environ.get("DYNVOL_MULTINODE_DIR")
    if env:
        return Path(env)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "dynvol" / "multinode"


@attrs.frozen
class NodeLayout:
    """A node's directory."""

    dir: Path

    @property
    def kubelet_root(self) -> Path:
        return self.dir / "kubelet-root"

    @property
    def dynamic(self) -> Path:
        return self.dir / "dynamic"

    @property
    def cni_cache(self) -> Path:
        return self.dir / "cni-cache"

    @property
    def cni_conf(self) -> Path:
        return self.dir / "cni" / "net.d"

    @property
    def ipam(self) -> Path:
        return self.dir / "cni" / "ipam"

    @property
    def containerd(self) -> Path:
        return self.dir / "containerd"

    @property
    def containerd_sock(self) -> Path:
        return self.containerd / "containerd.sock"

    @property
    def config(self) -> Path:
        return self.dir / "config"


@attrs.frozen
class Layout:
    """The cluster's directory."""

    dir: Path

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def etcd_data(self) -> Path:
        return self.dir / "etcd"

    @property
    def netns_marker(self) -> Path:
        """There while ``/run/netns`` is a mount that this cluster's ``ip netns add`` made."""
        return self.dir / "netns-dir-mounted"

    @property
    def namespaces(self) -> Path:
        """Holds one file per node on which that node's mount namespace is kept."""
        return self.dir / "ns"

    def mount_ns(self, node: str) -> Path:
        return self.namespaces / f"{node}.mnt"

    def node(self, name: str) -> NodeLayout:
        return NodeLayout(self.dir / "nodes" / name)

    def kubeconfig_for(self, identity: str) -> Path:
        return self.dir / "kubeconfigs" / f"{identity}.kubeconfig"

    def read_state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return state

    def write_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.rename(self.state_file)
