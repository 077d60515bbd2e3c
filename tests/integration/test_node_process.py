"""``dynvol node`` as one process: the CSI plugin and the node reconciler wired together.

kubelet is played by a CSI client on the real socket; the apiserver is real. Publishing a
pod's volume must give the reconciler that pod's slot at once (no waiting for a recheck),
and the DynamicVolumeMount it creates must point at the slot the plugin minted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from grpclib.client import Channel

from dynvol.testing import ControlPlane, Process, wait_until
from dynvol_controllers import standalone_slicer
from dynvol_core import constants as c
from dynvol_csi._proto.csi import v1 as csi
from dynvol_kube import APIConflict, APINotFound, Client
from dynvol_kube.resources import CLAIMS, CLASSES, MOUNTS, NAMESPACES, PODS

pytestmark = pytest.mark.integration

NODE = "node-under-test"
OWN_POD = "dynvol-node-under-test"
DMP_IMAGE = "localhost/dynvol/dynvol:test"


@pytest.fixture
def node_process(
    rshared_dir: Path, control_plane: ControlPlane
) -> Iterator[tuple[Process, Path, Path]]:
    sock_dir = Path(tempfile.mkdtemp(prefix="dvnode-", dir="/tmp"))
    socket = sock_dir / "csi.sock"
    (rshared_dir / "kubelet" / "pods").mkdir(parents=True)
    # No --dmp-image: as in the manifests, DMPs run the node plugin's own image, read from
    # its Pod (the downward API gives the process its name and namespace).
    own_pod = sock_dir / "own-pod.json"
    own_pod.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": c.DEFAULT_SYSTEM_NAMESPACE}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": OWN_POD, "namespace": c.DEFAULT_SYSTEM_NAMESPACE},
         "spec": {"nodeName": NODE, "containers": [
             {"name": "sidecar", "image": "registry.invalid/other:1"},
             {"name": "node", "image": DMP_IMAGE},
         ]}},
    ]}))  # fmt: skip
    control_plane.kubectl("delete", "pod", "-n", c.DEFAULT_SYSTEM_NAMESPACE, OWN_POD,
                          "--ignore-not-found", "--grace-period=0", "--force")  # fmt: skip
    control_plane.kubectl("apply", "-f", str(own_pod))
    argv = [
        sys.executable, "-m", "dynvol", "--log-level", "DEBUG", "node",
        "--endpoint", f"unix://{socket}", "--node-id", NODE,
        "--root", str(rshared_dir / "root"), "--kubelet-dir", str(rshared_dir / "kubelet"),
        "--registration-dir", "", "--kubeconfig", str(control_plane.kubeconfig),
        "--shared-idle-grace", "1",
    ]  # fmt: skip
    env = {**os.environ, "POD_NAME": OWN_POD, "POD_NAMESPACE": c.DEFAULT_SYSTEM_NAMESPACE}
    env.pop("DYNVOL_IMAGE", None)
    proc = Process.start(argv, name="dynvol-node", log=rshared_dir.parent / "node.log", env=env)
    try:
        wait_until(socket.exists, timeout=30, what="the CSI socket", alive=proc)
        yield proc, socket, rshared_dir
    finally:
        proc.stop(timeout=20)
        control_plane.kubectl("delete", "pod", "-n", c.DEFAULT_SYSTEM_NAMESPACE, OWN_POD,
                              "--ignore-not-found", "--grace-period=0", "--force")  # fmt: skip
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture
async def client(control_plane: ControlPlane) -> AsyncIterator[Client]:
    api = await Client.from_kubeconfig(control_plane.kubeconfig)
    try:
        yield api
    finally:
        await api.close()


async def _eventually(probe: Any, *, within: float = 30.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {within}s: {probe.__name__}")
        await asyncio.sleep(0.2)


@pytest.fixture
async def slicer(client: Client) -> AsyncIterator[None]:
    """The claim slices ``dynvol controller`` would keep: the node reads its claims there."""
    manager = standalone_slicer(client)
    await manager.start()
    try:
        yield
    finally:
        await manager.close()


async def test_publish_feeds_the_reconciler(
    node_process: tuple[Process, Path, Path], client: Client, namespace: str, slicer: None
) -> None:
    proc, socket, base = node_process
    class_name = f"spc-{secrets.token_hex(3)}"
    with contextlib.suppress(APIConflict):
        await client.create(NAMESPACES, {"metadata": {"name": c.DEFAULT_SYSTEM_NAMESPACE}})
    await client.create(CLASSES, {
        "apiVersion": c.API_VERSION, "kind": c.KIND_CLASS, "metadata": {"name": class_name},
        "spec": {"provider": "s3", "parameters": {}, "connection": {"allowLoopback": True}},
    })  # fmt: skip
    volume = {
        "name": c.VOLUME_NAME,
        "csi": {
            "driver": c.DRIVER_NAME, "readOnly": True,
            "volumeAttributes": {c.VOLUME_ATTR_CLASS: class_name,
                                 c.VOLUME_ATTR_POLICY: c.POLICY_INDEPENDENT},
        },
    }  # fmt: skip
    pod = await client.create(
        PODS,
        {
            "metadata": {"name": "app", "labels": {"app": "wired"},
                         # The publish guard wants the opt-in the volume was made from.
                         "annotations": {c.ANNOTATION_STORAGE_PROVIDER_CLASS: class_name}},
            "spec": {
                "nodeName": NODE,
                "terminationGracePeriodSeconds": 0,
                "volumes": [volume],
                "containers": [{"name": "app", "image": "registry.invalid/app:1",
                                "volumeMounts": [{"name": c.VOLUME_NAME, "mountPath": "/dynamic",
                                                  "mountPropagation": "HostToContainer"}]}],
            },
        },
        namespace=namespace,
    )  # fmt: skip
    pod_uid = pod["metadata"]["uid"]
    await client.create(
        CLAIMS,
        {
            "apiVersion": c.API_VERSION, "kind": c.KIND_CLAIM,
            "metadata": {"name": "wired"},
            "spec": {"storageProvider": "s3", "mountpoint": "/data",
                     "selector": {"matchLabels": {"app": "wired"}},
                     "s3Config": {"bucket": "wired-bucket", "endpoint": "http://127.0.0.1:9"}},
        },
        namespace=namespace,
    )  # fmt: skip

    async def mounts() -> list[Any]:
        listed = await client.list(MOUNTS, namespace=namespace)
        return list(listed["items"])

    # Not published yet: the reconciler has no slot and creates nothing.
    await asyncio.sleep(1.0)
    assert await mounts() == []

    target = base / "kubelet" / "pods" / pod_uid / "volumes" / "kubernetes.io~csi"
    target = target / c.VOLUME_NAME / "mount"
    target.parent.mkdir(parents=True)  # as kubelet does before NodePublishVolume
    channel = Channel(path=str(socket))
    node = csi.NodeStub(channel)
    try:
        await node.node_publish_volume(
            csi.NodePublishVolumeRequest(
                volume_id=f"csi-{uuid.uuid4().hex}",
                target_path=str(target),
                readonly=True,
                volume_capability=csi.VolumeCapability(
                    mount=csi.VolumeCapabilityMountVolume(),
                    access_mode=csi.VolumeCapabilityAccessMode(
                        mode=csi.VolumeCapabilityAccessModeMode.SINGLE_NODE_WRITER
                    ),
                ),
                volume_context={
                    c.CSI_CTX_POD_UID: pod_uid, c.CSI_CTX_POD_NAME: "app",
                    c.CSI_CTX_POD_NAMESPACE: namespace, c.CSI_CTX_EPHEMERAL: "true",
                    c.VOLUME_ATTR_CLASS: class_name, c.VOLUME_ATTR_POLICY: c.POLICY_INDEPENDENT,
                },
            )
        )  # fmt: skip
        # Only the publish's nudge can wake the reconciler here: nothing else changed in the
        # API and its safety resync is 600 s away. The bound is generous on purpose (this is
        # not a latency test; bench/bench_csi.py and bench/bench_e2e.py measure latency).
        created = await _eventually(mounts, within=60.0)
    finally:
        channel.close()
    (dvm,) = created
    slot_path = Path(dvm["spec"]["slotPath"])
    assert slot_path.parent.parent == base / "root" / "xvols" / class_name
    assert slot_path.name == pod_uid
    assert await asyncio.to_thread(slot_path.is_dir)
    assert dvm["spec"]["nodeName"] == NODE
    dmp_name = dvm["spec"]["dmpName"]

    async def the_dmp() -> Any:
        # Made in the same pass, right after the mounts.
        with contextlib.suppress(APINotFound):
            return await client.get(PODS, dmp_name, namespace=c.DEFAULT_SYSTEM_NAMESPACE)
        return None

    dmp = await _eventually(the_dmp)
    host_paths = [v["hostPath"]["path"] for v in dmp["spec"]["volumes"] if "hostPath" in v]
    assert str(slot_path) in host_paths
    assert dmp["spec"]["nodeName"] == NODE
    assert dmp["spec"]["containers"][0]["image"] == DMP_IMAGE  # the node plugin's own

    await client.delete(CLAIMS, "wired", namespace=namespace)

    async def no_mounts() -> bool:
        return not [m for m in await mounts() if not m["metadata"].get("deletionTimestamp")]

    assert await _eventually(no_mounts, within=30.0)
    assert proc.poll() is None
