"""Test support for dynvol and for projects that build on it.

Real components only: :class:`ControlPlane` (etcd + kube-apiserver), :class:`MinioServer`
(S3), rshared scratch directories for mount tests, and child processes that are always
reaped. The pytest plugin :mod:`dynvol.testing.pytest_plugin` exposes them as fixtures.
"""

from dynvol.testing.controlplane import ControlPlane, ToolsMissing
from dynvol.testing.minio import MinioServer
from dynvol.testing.processes import Process, free_port, wait_until

__all__ = ["ControlPlane", "MinioServer", "Process", "ToolsMissing", "free_port", "wait_until"]
