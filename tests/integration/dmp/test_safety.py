"""The mount pod's defences (docs/design.md §6.2, §6.3) against a real apiserver, real MinIO,
real s3fs and real mount namespaces.

* A symbolic link planted where a mount goes fails that mount (``UnsafeMountTarget``) and
  nothing is mounted through it; a directory swapped for a link in a loop while mounts are
  made never gets a mount outside the slot. Other claims' mounts stay up throughout.
* A DynamicVolumeMount that does not check out (another node, another pod, a class that
  does not allow the namespace, a claim that does not exist) gets a Warning Event
  ``UntrustedMount`` and is otherwise left alone: no finalizer, no status, no mount.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from dynvol.testing.minio import MinioServer
from dynvol.testing.mounts import mounts_under
from dynvol_core import constants as c
from dynvol_core.dispatch import DmpSpec, dmp_pod_manifest
from dynvol_core.mountinfo import parse_mountinfo
from dynvol_core.paths import path_is_within

from .conftest import (
    NODE,
    AgentRunner,
    Container,
    Mounts,
    Slot,
    assign,
    gone,
    phase_is,
    ready_condition,
    user_pod_manifest,
)

pytestmark = pytest.mark.integration

FINALIZER = "dynamicvolume.csi.cloudnative101.net/unmount"


def _fuse_mounts(pid: int) -> list[str]:
    """The FUSE mount points in the mount namespace of ``pid``."""
    table = parse_mountinfo(Path(f"/proc/{pid}/mountinfo").read_text())
    return [e.mount_point for e in table if e.fs_type.startswith("fuse.")]


def _outside(points: list[str], slot: Slot, private: Path | None = None) -> list[str]:
    """The mount points in this test's directory (where the planted links point) but not in
    the slot nor in the agent's ``private`` staging tree. Other tests on the machine mount
    elsewhere under /tmp, and those mounts can propagate into these namespaces too."""
    mine = PurePosixPath(slot.root.parent)
    allowed = [PurePosixPath(slot.path)] + ([PurePosixPath(private)] if private else [])
    return [
        p for p in points
        if path_is_within(PurePosixPath(p), mine)
        and not any(path_is_within(PurePosixPath(p), a) for a in allowed)
    ]  # fmt: skip


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _settled(obj: dict[str, Any] | None) -> bool:
    return obj is not None and (obj.get("status") or {}).get("phase") in ("Mounted", "Failed")


@pytest.fixture
def dmp_etc(tmp_path: Path) -> Path:
    """A directory outside the slot standing for the mount pod's own /etc."""
    etc = tmp_path / "dmp-etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    return etc


@pytest.mark.parametrize(("mountpoint", "link"), [("/data", "data"), ("/deep/er", "deep")])
async def test_a_link_planted_in_the_slot_fails_the_mount_and_nothing_lands_outside(
    mountpoint: str,
    link: str,
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
    dmp_etc: Path,
) -> None:
    bucket = minio.make_bucket("plant", {"ld.so.preload": b"/tmp/evil.so\n"})
    config = {"bucket": bucket, "endpoint": minio.endpoint}
    agent = agent_factory(s3_keys)
    # Another claim of the pod, mounted first; it must stay mounted.
    await assign(mounts, slot, agent, config, mountpoint="/other", what="the other claim")
    assert agent.process is not None

    (slot.path / link).symlink_to(dmp_etc)  # what a writable slot used to allow
    name = await mounts.create(slot=slot, config=config, mountpoint=mountpoint)
    obj = await mounts.wait(name, phase_is("Failed"), what="Failed", agent=agent)
    ready = ready_condition(obj)
    assert ready["reason"] == "UnsafeMountTarget", obj
    assert f"{slot.path / link} is a symbolic link" in ready["message"]
    assert FINALIZER not in (obj or {})["metadata"].get("finalizers", [])
    events = await mounts.events(name)
    assert any(e["reason"] == "UnsafeMountTarget" and e["type"] == "Warning" for e in events)

    # Nothing was mounted through the link, nor created behind it, in any namespace.
    assert _listing(dmp_etc) == ["passwd"]
    staging = agent.work_dir / ".staging"
    assert _outside(_fuse_mounts(agent.process.pid), slot, staging) == []
    assert _outside(_fuse_mounts(os.getpid()), slot, staging) == []
    assert mounts_under(slot.path) == [str(slot.path / "other")]
    assert len(agent.daemons()) == 1
    # The other claim is still there for the pod.
    assert container.read("other/ld.so.preload") == "/tmp/evil.so\n"

    # Once the link is gone the same object mounts (the agent retries it).
    (slot.path / link).unlink()
    await mounts.wait(name, phase_is("Mounted"), limit=90, what="Mounted", agent=agent)
    assert container.read(f"{mountpoint.lstrip('/')}/ld.so.preload") == "/tmp/evil.so\n"
    assert agent.stop() == 0
    assert mounts_under(slot.path) == []


class _Swapper(threading.Thread):
    """Swaps ``slot/race`` between a directory and a link to ``outside``, over and over."""

    def __init__(self, slot: Path, outside: Path) -> None:
        super().__init__(daemon=True)
        self.race, self.aside, self.outside = slot / "race", slot / "race.d", outside
        self.stopping = threading.Event()
        self.swaps = 0

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                os.rename(self.race, self.aside)
            except OSError:
                time.sleep(0.0005)  # a mount point (EBUSY) or not there: try again
                continue
            with contextlib.suppress(OSError):  # the agent may have made a new one
                os.symlink(self.outside, self.race)
                time.sleep(0)
                os.unlink(self.race)
            try:
                os.rename(self.aside, self.race)
            except OSError:
                with contextlib.suppress(OSError):
                    os.rmdir(self.aside)  # "race" is back as the agent's own directory
            self.swaps += 1
            time.sleep(0.001 * (self.swaps % 8))  # a directory for varying spells

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)
        assert not self.is_alive()


class _Watcher(threading.Thread):
    """Samples a namespace's mount table: FUSE mounts outside the slot, and whether a
    mount that must stay up ever went missing."""

    def __init__(self, pid: int, slot: Slot, stays: str, private: Path) -> None:
        super().__init__(daemon=True)
        self.pid, self.slot, self.stays, self.private = pid, slot, stays, private
        self.stopping = threading.Event()
        self.outside: set[str] = set()
        self.missing = 0
        self.samples = 0

    def run(self) -> None:
        while not self.stopping.is_set():
            points = _fuse_mounts(self.pid)
            self.outside.update(_outside(points, self.slot, self.private))
            if self.stays not in points:
                self.missing += 1
            self.samples += 1
            time.sleep(0.002)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)
        assert not self.is_alive()


async def test_a_directory_swapped_for_a_link_while_mounting_never_gets_a_mount_outside(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
    dmp_etc: Path,
) -> None:
    bucket = minio.make_bucket("race", {"hello.txt": b"hello\n"})
    config = {"bucket": bucket, "endpoint": minio.endpoint}
    agent = agent_factory(s3_keys)
    await assign(mounts, slot, agent, config, mountpoint="/stable", what="the stable claim")
    assert agent.process is not None

    (slot.path / "race").mkdir()
    swapper = _Swapper(slot.path, dmp_etc)
    # The agent's staging tree (its private work directory, which no pod reaches) is where
    # its mounters mount before it attaches their mounts to the opened targets.
    staging = agent.work_dir / ".staging"
    watchers = [
        _Watcher(agent.process.pid, slot, str(slot.path / "stable"), staging),
        _Watcher(os.getpid(), slot, str(slot.path / "stable"), staging),
    ]
    outcomes: list[str] = []
    for thread in (swapper, *watchers):
        thread.start()
    try:
        for _ in range(8):  # bounded: each attempt starts a real s3fs
            name = await mounts.create(slot=slot, config=config, mountpoint="/race")
            obj = await mounts.wait(name, _settled, limit=60, what="an outcome", agent=agent)
            assert obj is not None
            ready = ready_condition(obj)
            if obj["status"]["phase"] == "Mounted":
                outcomes.append("Mounted")
                # It is at the planned directory, which holds the bucket.
                assert (slot.path / "race" / "hello.txt").read_text() == "hello\n"
            else:
                assert ready["reason"] == "UnsafeMountTarget", ready
                outcomes.append(ready["message"])
            await mounts.delete(name)
            await mounts.wait(name, gone, what="deletion", agent=agent)
            await asyncio.sleep(0.05)
    finally:
        swapper.stop()
        for watcher in watchers:
            watcher.stop()

    assert swapper.swaps > 0
    assert all(w.samples > 100 for w in watchers)
    print("outcomes:", *outcomes, sep="\n  ")
    assert [w.outside for w in watchers] == [set(), set()], outcomes
    assert [w.missing for w in watchers] == [0, 0]
    assert _listing(dmp_etc) == ["passwd"]
    assert not (slot.path / "race").is_symlink()
    assert mounts_under(slot.path) == [str(slot.path / "stable")]
    assert agent.stop() == 0
    assert mounts_under(slot.path) == []


# ---- DynamicVolumeMounts that do not check out -------------------------------------------


async def _assert_refused(
    mounts: Mounts, name: str, agent: AgentRunner, field: str, *, limit: float = 30.0
) -> None:
    deadline = time.monotonic() + limit
    while True:
        events = [e for e in await mounts.events(name) if e["reason"] == "UntrustedMount"]
        if events:
            break
        assert time.monotonic() < deadline, f"no UntrustedMount Event for {name}{agent.log_tail()}"
        await asyncio.sleep(0.1)
    assert events[0]["type"] == "Warning"
    assert field in events[0]["message"], events[0]["message"]
    obj = await mounts.get(name)
    assert obj is not None
    assert FINALIZER not in obj["metadata"].get("finalizers", [])
    assert "status" not in obj or not obj["status"], obj.get("status")


async def test_mounts_that_do_not_check_out_are_left_alone(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
) -> None:
    bucket = minio.make_bucket("trust", {"hello.txt": b"trusted\n"})
    config = {"bucket": bucket, "endpoint": minio.endpoint}
    agent = agent_factory(s3_keys)
    await assign(mounts, slot, agent, config, mountpoint="/good", what="the genuine mount")

    forged = {
        "spec.nodeName": await mounts.create(
            slot=slot, config=config, mountpoint="/a", node_name="another-node"
        ),
        "spec.podUID": await mounts.create(
            slot=slot, config=config, mountpoint="/b", pod_uid=str(uuid.uuid4())
        ),
        "spec.claimName": await mounts.create(
            slot=slot, config=config, mountpoint="/c", claim_name="no-such-claim"
        ),
        "spec.claimUID": await mounts.create(
            slot=slot, config=config, mountpoint="/d", claim_uid=str(uuid.uuid4())
        ),
        "spec.dmpTargetPath": await mounts.create(
            slot=slot, config=config, mountpoint="/e", dmp_target_path="/xvols/good"
        ),
    }
    for field, name in forged.items():
        await _assert_refused(mounts, name, agent, field)
    await asyncio.sleep(1.0)  # any late action on them would show now
    for field, name in forged.items():
        await _assert_refused(mounts, name, agent, field, limit=0)
    # Nothing was mounted for them, and the genuine mount was not touched.
    assert mounts_under(slot.path) == [str(slot.path / "good")]
    assert sorted(p.name for p in slot.path.iterdir()) == ["good"]
    assert container.read("good/hello.txt") == "trusted\n"
    assert len(agent.daemons()) == 1

    # Going away does not unmount what is not theirs either (the /e forgery names /good).
    for name in forged.values():
        await mounts.delete(name)
        await mounts.wait(name, gone, what="deletion", agent=agent)
    await asyncio.sleep(0.5)
    assert container.read("good/hello.txt") == "trusted\n"
    assert agent.stop() == 0
    assert mounts_under(slot.path) == []


async def test_a_class_that_does_not_allow_the_namespace_is_refused(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
) -> None:
    await mounts.create_class(name=slot.class_name, allowed_namespaces=["someone-else"])
    agent = agent_factory(s3_keys)
    agent.start()
    config = {"bucket": minio.make_bucket("deny"), "endpoint": minio.endpoint}
    name = await mounts.create(slot=slot, config=config)
    await _assert_refused(mounts, name, agent, "does not allow namespace")
    assert mounts_under(slot.path) == []
    assert agent.daemons() == []
    assert list(slot.path.iterdir()) == []
    assert agent.stop() == 0


async def test_an_agent_that_is_not_a_mount_pod_refuses_to_start(
    slot: Slot,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
    s3_keys: dict[str, str],
) -> None:
    agent = agent_factory(s3_keys)
    agent.name = "dmp-that-does-not-exist"
    proc = agent.start()
    deadline = time.monotonic() + 30
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the agent did not give up"
        await asyncio.sleep(0.1)
    agent.process = None
    assert proc.poll() != 0
    assert "does not exist" in proc.log_tail(60)


async def test_unmounts_never_follow_a_link(rshared_dir: Path) -> None:
    """The host's unmount walks the path without following links: a link to a mount
    point, or through a link to its parent, does not unmount it."""
    from dynvol_providers.hosting import LocalHost, _umount2

    real = rshared_dir / "real"
    (real / "x").mkdir(parents=True)
    argv = ["mount", "-t", "tmpfs", "-o", "size=1m", "victim", str(real / "x")]
    await asyncio.to_thread(subprocess.run, argv, check=True)
    (rshared_dir / "link").symlink_to(real)
    (real / "y").symlink_to(real / "x")
    host = LocalHost()
    try:
        for path in (rshared_dir / "link" / "x", real / "y"):
            assert _umount2(str(path), 2) in (errno.ELOOP, errno.ENOTDIR, errno.EINVAL)
            await host.unmount(PurePosixPath(path), lazy=True)
            assert mounts_under(real) == [str(real / "x")], path
        await host.unmount(PurePosixPath(real / "x"), lazy=True)
        assert mounts_under(real) == []
    finally:
        host._watch.close()


async def test_a_shared_mount_pod_mounts_only_into_the_slot_of_the_mounts_pod(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    kube_client: Any,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
) -> None:
    """A shared mount pod sees the whole class directory: its mounts go into the slot of
    the mount's own pod (which must exist: only the mountpoint is made), never another's."""
    from kubernetes_asyncio import client

    core = client.CoreV1Api(kube_client)
    class_dir = slot.path.parent.parent
    manifest = user_pod_manifest(f"shared-{uuid.uuid4().hex[:6]}", slot.class_name)
    manifest["spec"]["volumes"][0]["csi"]["volumeAttributes"][c.VOLUME_ATTR_POLICY] = "shared"
    pod = await core.create_namespaced_pod(slot.namespace, manifest)
    pod_slot = class_dir / str(uuid.uuid4()) / pod.metadata.uid
    pod_slot.mkdir(parents=True)
    other_slot = class_dir / str(uuid.uuid4()) / str(uuid.uuid4())  # someone else's
    other_slot.mkdir(parents=True)
    dmp = DmpSpec(
        name=f"dmp-shared-{uuid.uuid4().hex[:6]}", namespace=c.DEFAULT_SYSTEM_NAMESPACE,
        node_name=NODE, class_name=slot.class_name, policy=c.POLICY_SHARED,
        image="registry.invalid/dynvol:test", host_path=str(class_dir),
    )  # fmt: skip
    await core.create_namespaced_pod(c.DEFAULT_SYSTEM_NAMESPACE, dmp_pod_manifest(dmp))
    try:
        bucket = minio.make_bucket("shared", {"hello.txt": b"shared\n"})
        config = {"bucket": bucket, "endpoint": minio.endpoint}
        await mounts.create_class(name=slot.class_name)
        agent = agent_factory(s3_keys)
        agent.name, agent.xvols = dmp.name, class_dir
        agent.start()
        served = Slot(
            slot.root, slot.class_name, pod.metadata.uid, pod_slot, slot.container_root,
            namespace=slot.namespace, pod_name=manifest["metadata"]["name"], dmp_name=dmp.name,
        )  # fmt: skip
        relative = pod_slot.relative_to(class_dir)
        good = await mounts.create(
            slot=served, config=config, dmp_target_path=f"/xvols/{relative}/data"
        )
        await mounts.wait(good, phase_is("Mounted"), what="Mounted", agent=agent)
        assert (pod_slot / "data" / "hello.txt").read_text() == "shared\n"

        other = other_slot.relative_to(class_dir)
        forged = await mounts.create(
            slot=served, config=config, mountpoint="/x", dmp_target_path=f"/xvols/{other}/x"
        )
        await _assert_refused(mounts, forged, agent, "in the slot of pod UID")
        # A slot that does not exist is not made.
        gone = await mounts.create(
            slot=served, config=config, mountpoint="/y",
            dmp_target_path=f"/xvols/{uuid.uuid4()}/{pod.metadata.uid}/y",
        )  # fmt: skip
        obj = await mounts.wait(gone, phase_is("Failed"), what="Failed", agent=agent)
        assert ready_condition(obj)["reason"] == "UnsafeMountTarget"
        assert "does not exist" in ready_condition(obj)["message"]
        assert list(other_slot.iterdir()) == []
        assert mounts_under(class_dir) == [str(pod_slot / "data")]
        assert agent.stop() == 0
        assert mounts_under(class_dir) == []
    finally:
        for ns, name in (
            (slot.namespace, manifest["metadata"]["name"]),
            (c.DEFAULT_SYSTEM_NAMESPACE, dmp.name),
        ):
            await core.delete_namespaced_pod(name, ns, grace_period_seconds=0)
