"""Test support for dynvol and for projects that build on it.

Real components only: :class:`ControlPlane` (etcd + kube-apiserver with dynvol's CRDs),
:class:`MinioServer` (S3), rshared scratch directories for mount tests (:func:`rshared_dir`),
and child processes that are always reaped. :func:`install_tools` builds the control plane's
binaries outside a checkout (``dynvol dev tools install``). The pytest plugin
:mod:`dynvol.testing.pytest_plugin` exposes them as fixtures. The names below are the public
surface (docs/library.md); everything here works with the base install, except the
``kube_client`` and ``namespace`` fixtures (``dynvol[testing]``) and the node reconciler
helpers of :mod:`dynvol.testing.slots` (dynvol's own tests).
"""

from dynvol.testing.controlplane import ControlPlane, ToolsMissing, WrongRelease, default_bin_dir
from dynvol.testing.minio import MinioServer
from dynvol.testing.mounts import rshared_dir
from dynvol.testing.processes import Process, free_port, wait_until
from dynvol.testing.tools import ToolsBuildFailed
from dynvol.testing.tools import install as install_tools

__all__ = [
    "ControlPlane",
    "MinioServer",
    "Process",
    "ToolsBuildFailed",
    "ToolsMissing",
    "WrongRelease",
    "default_bin_dir",
    "free_port",
    "install_tools",
    "rshared_dir",
    "wait_until",
]
