"""The three-node cluster the multi-node e2e files share (``dynvol.testing.cluster``).

``test_multinode.py`` and ``test_upstream.py`` both bring it up with dynvol deployed from
the base manifests; their module fixtures call :func:`deployed_cluster`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from dynvol.testing.cluster import ClusterError, MultiNodeCluster, deploying
from dynvol.testing.controlplane import repo_root
from dynvol.testing.localcluster import ClusterError as LocalClusterError

NODES = ("node-1", "node-2", "node-3")


def unavailable() -> str | None:
    """Why the multi-node cluster cannot run on this machine, or None."""
    if os.geteuid() != 0:
        return "the multi-node cluster needs root"
    for tool in ("containerd", "runc", "ctr", "ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make setup)"
    if not Path("/usr/lib/cni/bridge").exists():
        return "containernetworking-plugins is not installed (make setup)"
    return None


class Cluster(MultiNodeCluster):
    """The multi-node cluster with the interface the e2e helpers (``Storage``) expect."""

    def kubectl(
        self, *args: str, timeout: float = 120, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        try:
            return super().kubectl(*args, timeout=timeout, check=check, input=input)
        except ClusterError as exc:
            # The shared helpers retry on the single-node driver's error type.
            raise LocalClusterError(str(exc)) from exc


@contextlib.contextmanager
def deployed_cluster(
    *,
    reason: str | None = None,
    images: Sequence[str] | None = None,
    reused: Callable[[Cluster], None] | None = None,
) -> Iterator[Cluster]:
    """Three nodes with dynvol deployed; taken down afterwards if this brought them up.

    ``reason`` (or :func:`unavailable`) skips, or fails under ``CI=true``; ``images`` are
    imported into every node when the cluster comes up; ``reused`` is called on a cluster
    someone else brought up (for images it may lack).
    """
    reason = unavailable() or reason
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    checkout = repo_root()
    assert checkout is not None
    c = Cluster(nodes=len(NODES), progress=print)
    started = c.up(images=images) if images is not None else c.up()
    try:
        if not started and reused is not None:
            reused(c)
        deploying.deploy(c, checkout)
        yield c
    finally:
        if started:
            problems = c.down(grace=5)
            assert not problems, problems
