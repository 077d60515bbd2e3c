"""Fixtures for the CSI node plugin's integration tests: a real ``dynvol node --csi-only``
process, a grpclib client on its UNIX socket, and helper mount namespaces.

Everything runs inside the lead's ``rshared_dir`` (a scratch directory that is an rshared
mount), whose finaliser lazily unmounts whatever is left below it. The plugin process and
the namespace holders are stopped by PID in finalisers that run before that.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import pytest
from grpclib.client import Channel

from dynvol.testing.processes import Process, wait_until
from dynvol_core.mountinfo import MountEntry, entries_under, parse_mountinfo
from dynvol_csi._proto.csi import v1 as csi


def mounts_of(pid: int | str = "self") -> tuple[MountEntry, ...]:
    """The mount table of the mount namespace of ``pid``."""
    return parse_mountinfo(Path(f"/proc/{pid}/mountinfo").read_text())


def mount_points_under(path: Path, *, pid: int | str = "self") -> list[str]:
    """Mount points at or below ``path`` in the namespace of ``pid``."""
    return [e.mount_point for e in entries_under(mounts_of(pid), str(path), include_self=True)]


def sh(*argv: str) -> str:
    """Run a short command, wait for it, return stdout; fail with its stderr."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr}")
    return result.stdout


@attrs.define
class NodePluginProcess:
    """A ``dynvol node --csi-only`` child process over fixed directories (restartable)."""

    base: Path
    socket: Path
    log: Path
    proc: Process | None = None

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def kubelet_dir(self) -> Path:
        return self.base / "kubelet"

    @property
    def state_dir(self) -> Path:
        return self.root / "state" / "volumes"

    @property
    def xvols(self) -> Path:
        return self.root / "xvols"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        argv = [
            sys.executable, "-m", "dynvol", "--log-level", "DEBUG",
            "node", "--csi-only", "--publish-guard", "off",
            "--endpoint", f"unix://{self.socket}",
            "--node-id", "test-node",
            "--root", str(self.root),
            "--kubelet-dir", str(self.kubelet_dir),
            "--registration-dir", str(self.socket.parent / "registry"),
        ]  # fmt: skip
        self.proc = Process.start(argv, name="dynvol-node", log=self.log)
        # A killed predecessor leaves its socket file behind: wait for one that answers.
        wait_until(self._accepting, timeout=20, what="the CSI socket", alive=self.proc)

    def _accepting(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(self.socket))
            except OSError:
                return False
            return True

    def kill(self) -> None:
        """SIGKILL (no drain, no cleanup) and reap."""
        assert self.proc is not None
        self.proc.kill()

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        return self.proc.stop(timeout=10)


@pytest.fixture
def node_plugin(rshared_dir: Path) -> Iterator[NodePluginProcess]:
    """A running node plugin with its root and kubelet directory under ``rshared_dir``."""
    # UNIX socket paths are limited to 108 bytes; pytest's tmp paths can be longer.
    sock_dir = Path(tempfile.mkdtemp(prefix="dvcsi-", dir="/tmp"))
    (rshared_dir / "kubelet" / "pods").mkdir(parents=True)
    plugin = NodePluginProcess(
        base=rshared_dir, socket=sock_dir / "csi.sock", log=rshared_dir.parent / "node.log"
    )
    try:
        plugin.start()
        yield plugin
    finally:
        plugin.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


@attrs.define
class CsiClient:
    """grpclib stubs over one channel to the plugin's socket."""

    socket: Path
    channel: Channel = attrs.field(init=False)
    node: csi.NodeStub = attrs.field(init=False)
    identity: csi.IdentityStub = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._connect()

    def _connect(self) -> None:
        self.channel = Channel(path=str(self.socket))
        self.node = csi.NodeStub(self.channel)
        self.identity = csi.IdentityStub(self.channel)

    def reconnect(self) -> None:
        """A new connection, after the plugin was restarted (as kubelet redials)."""
        self.channel.close()
        self._connect()

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
async def csi_client(node_plugin: NodePluginProcess) -> AsyncIterator[CsiClient]:
    client = CsiClient(node_plugin.socket)
    try:
        yield client
    finally:
        client.close()


@attrs.frozen
class PodVolume:
    """One pod's dynvol volume as kubelet would ask for it."""

    pod_uid: str
    volume_id: str
    target: Path
    read_only: bool = False
    class_name: str = "s3-sample"

    def publish_request(self) -> csi.NodePublishVolumeRequest:
        return csi.NodePublishVolumeRequest(
            volume_id=self.volume_id,
            target_path=str(self.target),
            readonly=self.read_only,
            volume_capability=csi.VolumeCapability(
                mount=csi.VolumeCapabilityMountVolume(),
                access_mode=csi.VolumeCapabilityAccessMode(
                    mode=csi.VolumeCapabilityAccessModeMode.SINGLE_NODE_WRITER
                ),
            ),
            volume_context={
                "csi.storage.k8s.io/pod.uid": self.pod_uid,
                "csi.storage.k8s.io/pod.name": f"pod-{self.pod_uid[:8]}",
                "csi.storage.k8s.io/pod.namespace": "default",
                "csi.storage.k8s.io/ephemeral": "true",
                "storageProviderClass": self.class_name,
                "mountPodDispatchPolicy": "independent",
            },
        )

    def unpublish_request(self) -> csi.NodeUnpublishVolumeRequest:
        return csi.NodeUnpublishVolumeRequest(
            volume_id=self.volume_id, target_path=str(self.target)
        )


def new_pod_volume(plugin: NodePluginProcess, *, read_only: bool = False) -> PodVolume:
    """A pod directory laid out as kubelet does (the parent of the target exists)."""
    pod_uid = str(uuid.uuid4())
    volume_dir = (
        plugin.kubelet_dir / "pods" / pod_uid / "volumes" / "kubernetes.io~csi"
        / "dynamic-volume-root-path"
    )  # fmt: skip
    volume_dir.mkdir(parents=True)
    return PodVolume(
        pod_uid=pod_uid,
        volume_id=f"csi-{uuid.uuid4().hex}",
        target=volume_dir / "mount",
        read_only=read_only,
    )


@attrs.define
class MountNamespace:
    """A mount namespace kept alive by a holder process; commands run in it via nsenter."""

    holder: Process

    @property
    def pid(self) -> int:
        return self.holder.pid

    def run(self, *argv: str) -> str:
        return sh("nsenter", "-t", str(self.pid), "-m", "--", *argv)

    def mount_points_under(self, path: Path) -> list[str]:
        return mount_points_under(path, pid=self.pid)


@pytest.fixture
def mount_namespaces(rshared_dir: Path) -> Iterator[list[MountNamespace]]:
    """Factory list: append ``spawn()``-ed namespaces; all holders are stopped afterwards.

    A namespace is made with ``unshare -m --propagation unchanged`` so that its copies of
    the host's shared mounts stay peers of them, as a container runtime's are.
    """
    spawned: list[MountNamespace] = []
    try:
        yield spawned
    finally:
        for ns in reversed(spawned):
            ns.holder.stop(timeout=5)


def spawn_namespace(spawned: list[MountNamespace], log: Path) -> MountNamespace:
    holder = Process.start(
        ["unshare", "-m", "--propagation", "unchanged", "--", "sleep", "3600"],
        name="mntns-holder",
        log=log,
    )
    ns = MountNamespace(holder)
    spawned.append(ns)
    # unshare has switched namespaces once /proc/PID/ns/mnt differs from ours.
    ours = Path("/proc/self/ns/mnt").readlink()

    def switched() -> bool:
        proc = Path(f"/proc/{holder.pid}")
        return (proc / "ns/mnt").readlink() != ours and (proc / "cmdline").read_bytes().startswith(
            b"sleep"
        )

    wait_until(
        switched,
        timeout=10,
        what="the helper mount namespace",
        alive=holder,
    )
    return ns
