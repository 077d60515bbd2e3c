"""The CSI node plugin against real mounts, through a real grpclib client on its socket.

Each test starts ``dynvol node --csi-only`` as a child process, over a root and a kubelet
directory inside an rshared scratch mount. The other mount namespaces of docs/design.md §1 are
real too: a "DMP" namespace holding an rshared (peer) bind of the pod's slot, and a
"container" namespace holding an rslave bind of kubelet's target path.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import uuid
from pathlib import Path

import pytest
from grpclib import GRPCError, Status

from dynvol_core.mountinfo import MountEntry
from dynvol_csi._proto.csi import v1 as csi

from .conftest import (
    CsiClient,
    MountNamespace,
    NodePluginProcess,
    PodVolume,
    mount_points_under,
    mounts_of,
    new_pod_volume,
    sh,
    spawn_namespace,
)

pytestmark = pytest.mark.integration


def slot_of(plugin: NodePluginProcess, vol: PodVolume) -> Path:
    slots = list(plugin.xvols.glob(f"{vol.class_name}/*/{vol.pod_uid}"))
    assert len(slots) == 1, slots
    return slots[0]


def assert_gone(plugin: NodePluginProcess, vol: PodVolume, slot: Path) -> None:
    """No mount and no directory left of ``vol``, and no record."""
    assert mount_points_under(vol.target) == []
    assert mount_points_under(slot) == []
    assert not vol.target.exists()
    assert not slot.exists()
    assert not slot.parent.exists()  # the slot-uuid directory
    assert not (plugin.state_dir / f"{vol.volume_id}.json").exists()


def is_mount_point(path: Path, *, pid: int | str = "self") -> bool:
    return any(e.mount_point == str(path) for e in mounts_of(pid))


async def test_identity(csi_client: CsiClient) -> None:
    info = await csi_client.identity.get_plugin_info(csi.GetPluginInfoRequest())
    assert info.name == "dynamicvolume.csi.cloudnative101.net"
    assert info.vendor_version
    probe = await csi_client.identity.probe(csi.ProbeRequest())
    assert probe.ready is True
    caps = await csi_client.identity.get_plugin_capabilities(csi.GetPluginCapabilitiesRequest())
    assert caps.capabilities == []  # node-only
    node_caps = await csi_client.node.node_get_capabilities(csi.NodeGetCapabilitiesRequest())
    assert [c.rpc.type for c in node_caps.capabilities] == [
        csi.NodeServiceCapabilityRpcType.GET_VOLUME_STATS
    ]
    assert (await csi_client.node.node_get_info(csi.NodeGetInfoRequest())).node_id == "test-node"


async def test_xvols_is_rshared(node_plugin: NodePluginProcess, csi_client: CsiClient) -> None:
    [entry] = [e for e in mounts_of() if e.mount_point == str(node_plugin.xvols)]
    assert entry.shared_peer_group is not None


async def test_mounts_propagate_from_dmp_to_pod_and_container(
    node_plugin: NodePluginProcess,
    csi_client: CsiClient,
    mount_namespaces: list[MountNamespace],
    rshared_dir: Path,
) -> None:
    vol = new_pod_volume(node_plugin)
    await csi_client.node.node_publish_volume(vol.publish_request())
    slot = slot_of(node_plugin, vol)
    assert is_mount_point(vol.target)
    assert os.stat(vol.target).st_ino == os.stat(slot).st_ino

    # The container: kubelet's target bound rslave (HostToContainer). Its base is made a
    # slave first so that its own mounts do not propagate back to the host.
    ctr = spawn_namespace(mount_namespaces, rshared_dir.parent / "ctr.log")
    ctr_root = rshared_dir / "ctr"
    ctr_root.mkdir()
    ctr.run("mount", "--make-slave", str(rshared_dir))
    ctr.run("mount", "--bind", str(vol.target), str(ctr_root))
    ctr.run("mount", "--make-rslave", str(ctr_root))

    # The DMP: an rshared bind of the slot (Bidirectional), then a filesystem in it.
    dmp = spawn_namespace(mount_namespaces, rshared_dir.parent / "dmp.log")
    dmp_root = rshared_dir / "dmp"
    dmp_root.mkdir()
    dmp.run("mount", "--make-slave", str(rshared_dir))
    dmp.run("mount", "--bind", str(slot), str(dmp_root))
    dmp.run("mount", "--make-shared", str(dmp_root))
    (slot / "data").mkdir()
    dmp.run("mount", "-t", "tmpfs", "-o", "size=1m", "dmp-data", str(dmp_root / "data"))
    dmp.run("sh", "-c", f"echo from-the-dmp > {dmp_root}/data/hello")

    # It appears at kubelet's target path on the host and inside the container.
    assert is_mount_point(vol.target / "data")
    assert (vol.target / "data" / "hello").read_text() == "from-the-dmp\n"
    assert is_mount_point(ctr_root / "data", pid=ctr.pid)
    assert ctr.run("cat", str(ctr_root / "data" / "hello")) == "from-the-dmp\n"
    # ...and the container's own mounts did not leak to the host.
    assert not is_mount_point(ctr_root)

    # The unmount propagates the same way.
    dmp.run("umount", str(dmp_root / "data"))
    assert not is_mount_point(vol.target / "data")
    assert not is_mount_point(slot / "data")
    assert not is_mount_point(ctr_root / "data", pid=ctr.pid)

    # Unpublish with a sub-mount still there: nothing is left behind.
    dmp.run("mount", "-t", "tmpfs", "-o", "size=1m", "dmp-data", str(dmp_root / "data"))
    (slot / "data" / "deeper").mkdir()
    dmp.run("mount", "-t", "tmpfs", "-o", "size=1m", "dmp-deeper", str(dmp_root / "data/deeper"))
    assert is_mount_point(vol.target / "data" / "deeper")
    await csi_client.node.node_unpublish_volume(vol.unpublish_request())
    assert_gone(node_plugin, vol, slot)
    # The unmounts reached the DMP's and the container's views as well.
    assert dmp.mount_points_under(dmp_root / "data") == []
    assert ctr.mount_points_under(ctr_root / "data") == []


async def test_read_only_volume_is_a_read_only_bind(
    node_plugin: NodePluginProcess, csi_client: CsiClient
) -> None:
    vol = new_pod_volume(node_plugin, read_only=True)
    await csi_client.node.node_publish_volume(vol.publish_request())
    [entry] = [e for e in mounts_of() if e.mount_point == str(vol.target)]
    assert "ro" in entry.options
    with pytest.raises(OSError, match="Read-only") as info:
        (vol.target / "x").write_text("no")
    assert info.value.errno == errno.EROFS
    slot = slot_of(node_plugin, vol)
    await csi_client.node.node_unpublish_volume(vol.unpublish_request())
    assert_gone(node_plugin, vol, slot)


def _entry_at(path: Path) -> MountEntry:
    [entry] = [e for e in mounts_of() if e.mount_point == str(path)]
    return entry


def _assert_not_writable(root: Path) -> None:
    """Nothing can be made at ``root``: no file, no directory, no symbolic link."""
    attempts = [
        lambda: (root / "file").write_text("no"),
        lambda: (root / "dir").mkdir(),
        lambda: (root / "data").symlink_to("/etc"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError, match="Read-only file system") as info:
            attempt()
        assert info.value.errno == errno.EROFS
    assert list(root.iterdir()) == []


async def test_the_slot_is_read_only_in_the_pod_whatever_the_volume_says(
    node_plugin: NodePluginProcess,
    csi_client: CsiClient,
    mount_namespaces: list[MountNamespace],
    rshared_dir: Path,
) -> None:
    # The volume asks for a writable root (readOnly: false, as a hand-written pod could).
    vol = new_pod_volume(node_plugin, read_only=False)
    await csi_client.node.node_publish_volume(vol.publish_request())
    slot = slot_of(node_plugin, vol)
    assert "ro" in _entry_at(vol.target).options
    _assert_not_writable(vol.target)
    # The bind is still a peer of the slot: a DMP's later mount propagates into it, and
    # keeps its own flags there (the claim's storage stays writable).
    assert _entry_at(vol.target).shared_peer_group == _entry_at(node_plugin.xvols).shared_peer_group
    dmp = spawn_namespace(mount_namespaces, rshared_dir.parent / "dmp.log")
    dmp_root = rshared_dir / "dmp"
    dmp_root.mkdir()
    dmp.run("mount", "--make-slave", str(rshared_dir))
    dmp.run("mount", "--bind", str(slot), str(dmp_root))
    dmp.run("mount", "--make-shared", str(dmp_root))
    (slot / "data").mkdir()  # the DMP makes its mount points: the slot is writable there
    dmp.run("mount", "-t", "tmpfs", "-o", "size=1m", "claim-data", str(dmp_root / "data"))
    assert is_mount_point(vol.target / "data")
    (vol.target / "data" / "written-by-the-pod").write_text("ok")
    assert dmp.run("cat", str(dmp_root / "data" / "written-by-the-pod")) == "ok"
    assert "ro" not in _entry_at(vol.target / "data").options

    # A restart of the node plugin keeps it so, and propagation still works.
    node_plugin.kill()
    node_plugin.start()
    csi_client.reconnect()
    assert "ro" in _entry_at(vol.target).options
    await csi_client.node.node_publish_volume(vol.publish_request())  # kubelet's retry
    assert "ro" in _entry_at(vol.target).options
    (slot / "logs").mkdir()
    dmp.run("mount", "-t", "tmpfs", "-o", "size=1m", "claim-logs", str(dmp_root / "logs"))
    assert is_mount_point(vol.target / "logs")
    dmp.run("umount", str(dmp_root / "logs"))
    assert not is_mount_point(vol.target / "logs")

    await csi_client.node.node_unpublish_volume(vol.unpublish_request())
    assert_gone(node_plugin, vol, slot)
    assert dmp.mount_points_under(dmp_root / "data") == []


@pytest.mark.parametrize("when", ["restart", "publish"])
async def test_a_writable_bind_left_behind_is_made_read_only(
    node_plugin: NodePluginProcess, csi_client: CsiClient, when: str
) -> None:
    vol = new_pod_volume(node_plugin)
    await csi_client.node.node_publish_volume(vol.publish_request())
    slot = slot_of(node_plugin, vol)
    # What an earlier version (or a hand) left: the same bind, writable.
    sh("mount", "-o", "remount,bind,rw", str(vol.target))
    assert "rw" in _entry_at(vol.target).options
    if when == "restart":
        node_plugin.kill()
        node_plugin.start()
        csi_client.reconnect()
    else:
        await csi_client.node.node_publish_volume(vol.publish_request())
    assert "ro" in _entry_at(vol.target).options
    _assert_not_writable(vol.target)
    assert len(mount_points_under(vol.target)) == 1
    await csi_client.node.node_unpublish_volume(vol.unpublish_request())
    assert_gone(node_plugin, vol, slot)


async def test_publish_is_idempotent_and_detects_conflicts(
    node_plugin: NodePluginProcess, csi_client: CsiClient
) -> None:
    vol = new_pod_volume(node_plugin)
    for _ in range(3):
        await csi_client.node.node_publish_volume(vol.publish_request())
    assert len(mount_points_under(vol.target)) == 1
    slot = slot_of(node_plugin, vol)

    # Same volume ID, other parameters: refused, and the published volume is untouched.
    other = vol.publish_request()
    other.readonly = True
    with pytest.raises(GRPCError) as info:
        await csi_client.node.node_publish_volume(other)
    assert info.value.status is Status.ALREADY_EXISTS
    assert "read_only" in (info.value.message or "")
    assert len(mount_points_under(vol.target)) == 1

    # Someone unmounted the bind behind our back: publishing again repairs it.
    sh("umount", "-l", str(vol.target))
    await csi_client.node.node_publish_volume(vol.publish_request())
    assert is_mount_point(vol.target)

    await csi_client.node.node_unpublish_volume(vol.unpublish_request())
    await csi_client.node.node_unpublish_volume(vol.unpublish_request())  # idempotent
    assert_gone(node_plugin, vol, slot)


async def test_concurrent_calls_for_one_volume_are_serialised(
    node_plugin: NodePluginProcess, csi_client: CsiClient
) -> None:
    vol = new_pod_volume(node_plugin)
    await asyncio.gather(
        *(csi_client.node.node_publish_volume(vol.publish_request()) for _ in range(10))
    )
    assert len(mount_points_under(vol.target)) == 1
    assert len(list(node_plugin.xvols.glob(f"*/*/{vol.pod_uid}"))) == 1
    slot = slot_of(node_plugin, vol)
    await asyncio.gather(
        *(csi_client.node.node_unpublish_volume(vol.unpublish_request()) for _ in range(10))
    )
    assert_gone(node_plugin, vol, slot)


async def test_unpublish_of_unknown_volume_succeeds(
    node_plugin: NodePluginProcess, csi_client: CsiClient
) -> None:
    vol = new_pod_volume(node_plugin)
    await csi_client.node.node_unpublish_volume(vol.unpublish_request())


async def test_volume_stats(node_plugin: NodePluginProcess, csi_client: CsiClient) -> None:
    vol = new_pod_volume(node_plugin)
    await csi_client.node.node_publish_volume(vol.publish_request())
    stats = await csi_client.node.node_get_volume_stats(
        csi.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=str(vol.target))
    )
    units = {u.unit: u for u in stats.usage}
    assert set(units) == {csi.VolumeUsageUnit.BYTES, csi.VolumeUsageUnit.INODES}
    assert units[csi.VolumeUsageUnit.BYTES].total > 0
    for request, status in [
        (csi.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path="/elsewhere"),
         Status.NOT_FOUND),
        (csi.NodeGetVolumeStatsRequest(volume_id="csi-unknown", volume_path=str(vol.target)),
         Status.NOT_FOUND),
        (csi.NodeGetVolumeStatsRequest(volume_path=str(vol.target)), Status.INVALID_ARGUMENT),
    ]:  # fmt: skip
        with pytest.raises(GRPCError) as info:
            await csi_client.node.node_get_volume_stats(request)
        assert info.value.status is status
    await csi_client.node.node_unpublish_volume(vol.unpublish_request())


async def test_unpublish_after_the_plugin_was_killed(
    node_plugin: NodePluginProcess, csi_client: CsiClient
) -> None:
    vol = new_pod_volume(node_plugin)
    await csi_client.node.node_publish_volume(vol.publish_request())
    slot = slot_of(node_plugin, vol)
    # A mount made in the slot (as a DMP would) is under the target too.
    (slot / "data").mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=1m", "dmp-data", str(slot / "data"))
    assert is_mount_point(vol.target / "data")

    node_plugin.kill()
    node_plugin.start()
    csi_client.reconnect()

    # The published volume survived the restart untouched...
    assert is_mount_point(vol.target)
    assert is_mount_point(vol.target / "data")
    await csi_client.node.node_publish_volume(vol.publish_request())
    assert len(mount_points_under(vol.target)) == 2
    # ...and unpublish still cleans everything.
    await csi_client.node.node_unpublish_volume(vol.unpublish_request())
    assert_gone(node_plugin, vol, slot)


@pytest.mark.parametrize("phase", ["publishing", "unpublishing"])
async def test_interrupted_operation_is_finished_at_start(
    node_plugin: NodePluginProcess, csi_client: CsiClient, phase: str
) -> None:
    vol = new_pod_volume(node_plugin)
    await csi_client.node.node_publish_volume(vol.publish_request())
    slot = slot_of(node_plugin, vol)
    node_plugin.kill()
    # What a crash in the middle of the operation leaves: the record in that phase, with
    # the slot made and bound.
    record_path = node_plugin.state_dir / f"{vol.volume_id}.json"
    record = json.loads(record_path.read_text())
    record["phase"] = phase
    record_path.write_text(json.dumps(record))

    node_plugin.start()
    csi_client.reconnect()
    assert_gone(node_plugin, vol, slot)
    # kubelet retries an unanswered publish; it works as a fresh one.
    await csi_client.node.node_publish_volume(vol.publish_request())
    assert is_mount_point(vol.target)
    await csi_client.node.node_unpublish_volume(vol.unpublish_request())


async def test_lost_bind_is_restored_at_start(
    node_plugin: NodePluginProcess, csi_client: CsiClient
) -> None:
    vol = new_pod_volume(node_plugin)
    await csi_client.node.node_publish_volume(vol.publish_request())
    node_plugin.kill()
    sh("umount", "-l", str(vol.target))  # as after a node reboot
    node_plugin.start()
    csi_client.reconnect()
    assert is_mount_point(vol.target)
    await csi_client.node.node_unpublish_volume(vol.unpublish_request())


async def test_200_concurrent_publish_unpublish_pairs(
    node_plugin: NodePluginProcess, csi_client: CsiClient
) -> None:
    volumes = [new_pod_volume(node_plugin, read_only=i % 2 == 0) for i in range(200)]

    async def pair(vol: PodVolume) -> None:
        await csi_client.node.node_publish_volume(vol.publish_request())
        assert (vol.target).is_dir()
        await csi_client.node.node_unpublish_volume(vol.unpublish_request())

    await asyncio.gather(*(pair(vol) for vol in volumes))
    assert mount_points_under(node_plugin.kubelet_dir) == []
    assert mount_points_under(node_plugin.xvols) == [str(node_plugin.xvols)]
    assert list(node_plugin.state_dir.iterdir()) == []
    assert [p for p in node_plugin.xvols.glob("*/*")] == []
    assert all(not vol.target.exists() for vol in volumes)


async def test_sigterm_drains_and_removes_the_socket(
    node_plugin: NodePluginProcess, csi_client: CsiClient
) -> None:
    vol = new_pod_volume(node_plugin)
    await csi_client.node.node_publish_volume(vol.publish_request())
    assert node_plugin.proc is not None
    node_plugin.proc.send_signal(signal.SIGTERM)
    assert node_plugin.proc.popen.wait(10) == 0
    assert not node_plugin.socket.exists()
    assert is_mount_point(vol.target)  # shutting down never unpublishes
    node_plugin.start()
    csi_client.reconnect()
    await csi_client.node.node_unpublish_volume(vol.unpublish_request())
    assert mount_points_under(vol.target) == []


# ---- bad input -------------------------------------------------------------------------


def _mutations() -> list[tuple[str, str, object]]:
    other_pod = str(uuid.uuid4())
    return [
        ("no volume id", "volume_id", ""),
        ("volume id with a slash", "volume_id", "../../etc/passwd"),
        ("volume id starting with a dot", "volume_id", ".hidden"),
        ("no target path", "target_path", ""),
        ("relative target path", "target_path", "pods/x/volumes/mount"),
        ("target path with ..", "target_path", "{kubelet}/pods/{pod}/volumes/../../../../etc"),
        ("target path outside kubelet", "target_path", "/tmp/elsewhere/mount"),
        ("target path is kubelet itself", "target_path", "{kubelet}"),
        ("target path of another pod", "target_path",
         "{kubelet}/pods/" + other_pod + "/volumes/kubernetes.io~csi/v/mount"),
        ("target path not normalised", "target_path", "{kubelet}/pods/{pod}//volumes/x/mount"),
        ("target path with NUL", "target_path", "{kubelet}/pods/{pod}/volumes/x\0/mount"),
        ("no capability", "volume_capability", None),
        ("block capability", "volume_capability", "block"),
        ("no pod uid", "csi.storage.k8s.io/pod.uid", None),
        ("pod uid with traversal", "csi.storage.k8s.io/pod.uid", "../../../etc"),
        ("no pod name", "csi.storage.k8s.io/pod.name", None),
        ("no pod namespace", "csi.storage.k8s.io/pod.namespace", None),
        ("pod namespace with a slash", "csi.storage.k8s.io/pod.namespace", "a/b"),
        ("not ephemeral", "csi.storage.k8s.io/ephemeral", "false"),
        ("no ephemeral flag", "csi.storage.k8s.io/ephemeral", None),
        ("no class", "storageProviderClass", None),
        ("class with traversal", "storageProviderClass", "../../.."),
        ("class with a slash", "storageProviderClass", "a/b"),
        ("unknown dispatch policy", "mountPodDispatchPolicy", "everyone"),
    ]  # fmt: skip


def _tree(base: Path) -> set[str]:
    return {str(p) for p in base.rglob("*") if p.name != "node.log"}


def _bad_publish_request(
    plugin: NodePluginProcess, vol: PodVolume, field: str, value: object
) -> csi.NodePublishVolumeRequest:
    request = vol.publish_request()
    if field in ("volume_id", "target_path"):
        assert isinstance(value, str)
        setattr(request, field, value.format(kubelet=plugin.kubelet_dir, pod=vol.pod_uid))
    elif field == "volume_capability":
        if value is None:
            request = csi.NodePublishVolumeRequest(
                volume_id=request.volume_id,
                target_path=request.target_path,
                volume_context=request.volume_context,
            )
        else:
            request.volume_capability = csi.VolumeCapability(
                block=csi.VolumeCapabilityBlockVolume()
            )
    elif value is None:
        del request.volume_context[field]
    else:
        assert isinstance(value, str)
        request.volume_context[field] = value
    return request


async def test_bad_publish_input_is_rejected_and_creates_nothing(
    node_plugin: NodePluginProcess, csi_client: CsiClient
) -> None:
    # One plugin for the whole table (starting one costs a second); every case is checked
    # and all failures are reported together.
    vol = new_pod_volume(node_plugin)
    before_tree = _tree(node_plugin.base)
    before_mounts = mount_points_under(node_plugin.base)
    failures = []
    for name, field, value in _mutations():
        request = _bad_publish_request(node_plugin, vol, field, value)
        try:
            await csi_client.node.node_publish_volume(request)
        except GRPCError as exc:
            message = exc.message or ""
            if exc.status is not Status.INVALID_ARGUMENT:
                failures.append(f"{name}: got {exc.status.name}: {message}")
            elif field.rsplit("/", 1)[-1] not in message:
                failures.append(f"{name}: message does not name {field!r}: {message}")
        else:
            failures.append(f"{name}: accepted")
        if _tree(node_plugin.base) != before_tree:
            failures.append(f"{name}: created {_tree(node_plugin.base) - before_tree}")
        if mount_points_under(node_plugin.base) != before_mounts:
            failures.append(f"{name}: mounted something")
    assert not failures, "\n".join(failures)
    # The same volume, valid, still publishes: nothing was left half-done.
    await csi_client.node.node_publish_volume(vol.publish_request())
    await csi_client.node.node_unpublish_volume(vol.unpublish_request())


async def test_bad_unpublish_input_is_rejected(
    node_plugin: NodePluginProcess, csi_client: CsiClient
) -> None:
    cases = [
        ("", "{kubelet}/pods/p/volumes/x/mount"),
        ("csi-1", ""),
        ("csi-1", "relative/mount"),
        ("csi-1", "/etc"),
        ("a/../../b", "{kubelet}/pods/p/volumes/x/mount"),
        ("csi-1", "{kubelet}/pods/../../../etc"),
    ]
    for volume_id, target in cases:
        request = csi.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=target.format(kubelet=node_plugin.kubelet_dir)
        )
        with pytest.raises(GRPCError) as info:
            await csi_client.node.node_unpublish_volume(request)
        assert info.value.status is Status.INVALID_ARGUMENT, (volume_id, target)


async def test_kubelet_registration(node_plugin: NodePluginProcess) -> None:
    from grpclib.client import Channel

    from dynvol_csi._proto import pluginregistration as reg

    path = node_plugin.socket.parent / "registry" / "dynamicvolume.csi.cloudnative101.net-reg.sock"
    channel = Channel(path=str(path))
    try:
        stub = reg.RegistrationStub(channel)
        info = await stub.get_info(reg.InfoRequest())
        assert info.type == "CSIPlugin"
        assert info.name == "dynamicvolume.csi.cloudnative101.net"
        assert info.endpoint == str(node_plugin.socket)
        assert info.supported_versions == ["1.0.0"]
        await stub.notify_registration_status(reg.RegistrationStatus(plugin_registered=True))
    finally:
        channel.close()
