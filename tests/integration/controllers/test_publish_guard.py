"""NodePublishVolume re-checks the pod and its class against the real apiserver.

A ``dynvol node --csi-only --publish-guard api`` process (the guard the full node process
always has) is asked, as kubelet would ask it, to publish volumes for pods that admission
should have stopped: they are created here as the admin in a namespace outside the
admission policies, so only the node plugin's own check stands between them and a slot.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from grpclib import Status
from grpclib.client import Channel
from grpclib.exceptions import GRPCError

from dynvol.testing import ControlPlane, Process, wait_until
from dynvol_core import constants as c
from dynvol_core.mountinfo import parse_mountinfo
from dynvol_csi._proto.csi import v1 as csi
from dynvol_kube import APINotFound, Client
from dynvol_kube.resources import CLASSES, PODS

from .controller_support import pod_manifest

pytestmark = pytest.mark.integration

NODE = "guarded-node"


@pytest.fixture
def plugin(rshared_dir: Path, control_plane: ControlPlane) -> Iterator[tuple[Path, Path]]:
    """The plugin process; yields (socket, kubelet dir)."""
    sock_dir = Path(tempfile.mkdtemp(prefix="dvguard-", dir="/tmp"))
    socket = sock_dir / "csi.sock"
    kubelet = rshared_dir / "kubelet"
    (kubelet / "pods").mkdir(parents=True)
    argv = [
        sys.executable, "-m", "dynvol", "--log-level", "DEBUG", "node", "--csi-only",
        "--publish-guard", "api", "--kubeconfig", str(control_plane.kubeconfig),
        "--endpoint", f"unix://{socket}", "--node-id", NODE,
        "--root", str(rshared_dir / "root"), "--kubelet-dir", str(kubelet),
        "--registration-dir", "",
    ]  # fmt: skip
    proc = Process.start(argv, name="dynvol-node", log=rshared_dir.parent / "guard-node.log")
    try:
        wait_until(socket.exists, timeout=30, what="the CSI socket", alive=proc)
        yield socket, kubelet
    finally:
        proc.stop(timeout=20)
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture
async def node_stub(plugin: tuple[Path, Path]) -> AsyncIterator[csi.NodeStub]:
    channel = Channel(path=str(plugin[0]))
    try:
        yield csi.NodeStub(channel)
    finally:
        channel.close()


async def _publish(
    node: csi.NodeStub, kubelet: Path, pod: dict[str, Any], *, class_name: str
) -> tuple[str, Path]:
    """NodePublishVolume for ``pod`` as kubelet sends it; returns (volume id, target)."""
    meta = pod["metadata"]
    target = kubelet / "pods" / meta["uid"] / "volumes" / "kubernetes.io~csi" / c.VOLUME_NAME
    target.mkdir(parents=True, exist_ok=True)
    target = target / "mount"
    volume_id = f"csi-{uuid.uuid4().hex}"
    await node.node_publish_volume(
        csi.NodePublishVolumeRequest(
            volume_id=volume_id,
            target_path=str(target),
            readonly=True,
            volume_capability=csi.VolumeCapability(
                mount=csi.VolumeCapabilityMountVolume(),
                access_mode=csi.VolumeCapabilityAccessMode(
                    mode=csi.VolumeCapabilityAccessModeMode.SINGLE_NODE_WRITER
                ),
            ),
            volume_context={
                c.CSI_CTX_POD_UID: meta["uid"], c.CSI_CTX_POD_NAME: meta["name"],
                c.CSI_CTX_POD_NAMESPACE: meta["namespace"], c.CSI_CTX_EPHEMERAL: "true",
                c.VOLUME_ATTR_CLASS: class_name, c.VOLUME_ATTR_POLICY: c.POLICY_INDEPENDENT,
            },
        )
    )  # fmt: skip
    return volume_id, target


def _mounted(path: Path) -> bool:
    entries = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    return any(e.mount_point == str(path) for e in entries)


@pytest.fixture
async def spc(client: Client) -> AsyncIterator[Any]:
    """``spc(allowed_namespaces)``: a class, deleted afterwards."""
    made: list[str] = []

    async def make(allowed: list[str] | None = None) -> str:
        name = f"guard-{secrets.token_hex(3)}"
        spec: dict[str, Any] = {"provider": "s3", "parameters": {}}
        if allowed is not None:
            spec["allowedNamespaces"] = allowed
        body = {"apiVersion": c.API_VERSION, "kind": c.KIND_CLASS, "metadata": {"name": name}}
        await client.create(CLASSES, {**body, "spec": spec})
        made.append(name)
        return name

    try:
        yield make
    finally:
        for name in made:
            with contextlib.suppress(APINotFound):
                await client.delete(CLASSES, name)


async def test_publish_checks_the_pod_and_class(
    client: Client, namespace: str, node_stub: csi.NodeStub, plugin: tuple[Path, Path], spc: Any
) -> None:
    _, kubelet = plugin
    class_name = await spc()

    async def pod(
        name: str, *, annotations: dict[str, str], node: str = NODE, spc_name: str = class_name
    ) -> Any:
        """A pod carrying the injected volume, with the annotations given (none or not)."""
        body = pod_manifest(name, labels={}, node=node, class_name=spc_name)
        body["metadata"]["annotations"] = annotations
        return await client.create(PODS, body, namespace=namespace)

    opted_in = {c.ANNOTATION_STORAGE_PROVIDER_CLASS: class_name}

    # The good path: an opted-in pod on this node whose volume is the injected one.
    good = await pod("good", annotations=opted_in)
    volume_id, target = await _publish(node_stub, kubelet, good, class_name=class_name)
    try:
        assert _mounted(target)
    finally:
        await node_stub.node_unpublish_volume(
            csi.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
        )
    assert not _mounted(target)

    async def refused(obj: Any, message: str, *, class_name: str = class_name) -> None:
        with pytest.raises(GRPCError) as caught:
            await _publish(node_stub, kubelet, obj, class_name=class_name)
        assert caught.value.status is Status.FAILED_PRECONDITION
        assert message in (caught.value.message or "")

    # The pod: the volume without the opt-in.
    await refused(await pod("no-opt-in", annotations={}), "without the annotation")
    # A volume context (or pod) naming another class than the annotations say.
    other = await spc()
    await refused(good, f"asks for class {other!r}", class_name=other)
    # Bound elsewhere, or a UID that is not the pod's.
    await refused(await pod("elsewhere", annotations=opted_in, node="n2"), "bound to node 'n2'")
    forged = {**good, "metadata": {**good["metadata"], "uid": str(uuid.uuid4())}}
    await refused(forged, "has UID")
    # The class's namespace guardrail, and a class that does not exist.
    fenced = await spc(allowed=["somewhere-else"])
    fenced_pod = await pod(
        "fenced", annotations={c.ANNOTATION_STORAGE_PROVIDER_CLASS: fenced}, spc_name=fenced
    )
    await refused(fenced_pod, "may not be used in namespace", class_name=fenced)
    await client.delete(CLASSES, fenced)
    await refused(fenced_pod, "does not exist", class_name=fenced)
