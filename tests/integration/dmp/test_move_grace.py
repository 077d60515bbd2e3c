"""A moved mountpoint waits for the files still open on the old one (docs/design.md §9.1,
§9.5): the new mountpoint serves at once, the old one keeps serving its open files until
they are closed or the class's unmount grace period is over, and the object shows phase
Unmounting with a message naming the move meanwhile. Real apiserver, MinIO, s3fs, mount
namespaces, as in :mod:`.test_unmount_grace`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from dynvol.testing.minio import MinioServer
from dynvol.testing.mounts import mounts_under
from dynvol_core import constants as c

from .conftest import (
    AgentRunner,
    Container,
    Hold,
    Mounts,
    Slot,
    assert_no_mounter_files,
    assert_nothing_mounted,
    assign,
    eventually,
    files_open,
    finished,
    phase_is,
    release,
)

pytestmark = pytest.mark.integration


def _move(mountpoint: str) -> dict[str, str]:
    return {"mountpoint": mountpoint, "dmpTargetPath": f"{c.DMP_XVOLS_DIR}{mountpoint}"}


def _waiting_for_move(obj: dict[str, Any] | None) -> bool:
    """Unmounting the old mount of a move, files still open on it."""
    message = ((obj or {}).get("status") or {}).get("message")
    return files_open(obj) and "the mountpoint moved from" in str(message)


async def test_a_file_open_across_a_move_is_completed_on_the_old_mountpoint(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
    holder: Hold,
) -> None:
    s3 = minio.client()
    bucket = minio.make_bucket("move-grace", {"hello.txt": b"hello\n"})
    agent = agent_factory(s3_keys)
    config = {"bucket": bucket, "endpoint": minio.endpoint}
    name = await assign(mounts, slot, agent, config, mountpoint="/m1")  # grace: 30 s
    (old_daemon,) = agent.daemons()
    path = container.root / "m1" / "held.txt"
    proc = await holder(path, first="before", seconds=8, then="after")
    moved = time.monotonic()
    await mounts.edit(name, **_move("/m2"))
    obj = await mounts.wait(name, _waiting_for_move, what="Unmounting, FilesOpen", agent=agent)
    assert obj is not None
    message = obj["status"]["message"]
    assert f"moved from {slot.path}/m1 to {slot.path}/m2 (mounted there already)" in message
    assert "unmount grace period of 30s" in message
    # The new mountpoint serves already, beside the old one, which serves the open file.
    assert container.read("m2/hello.txt") == "hello\n"
    assert sorted(mounts_under(slot.path)) == [str(slot.path / "m1"), str(slot.path / "m2")]
    daemons = agent.daemons()
    assert len(daemons) == 2, daemons
    assert old_daemon in daemons, daemons
    (new_daemon,) = set(daemons) - {old_daemon}
    # The passes that look again at it meanwhile neither mount again nor restart the wait.
    while proc.poll() is None and time.monotonic() - moved < 6:
        assert set(agent.daemons()) == {old_daemon, new_daemon}
        await asyncio.sleep(0.5)
    await finished(proc, within=15)
    obj = await mounts.wait(name, phase_is("Mounted"), what="Mounted again", agent=agent)
    done = time.monotonic() - moved
    assert obj is not None
    assert obj["status"]["message"] == f"mounted at {slot.path}/m2"
    # Unmounted once the file was closed (8 s after it was opened), well before the end of
    # the grace period; not at once.
    assert 4.0 < done < 25.0, done
    print(f"move with a file open 8 s: old mountpoint unmounted {done:.1f} s after the edit")
    body = s3.get_object(Bucket=bucket, Key="held.txt")["Body"].read()
    assert body == b"before\nafter\n"
    await eventually(lambda: agent.daemons() == [new_daemon], what="the old daemon to exit")
    assert mounts_under(slot.path) == [str(slot.path / "m2")]
    assert container.mounts() == [str(container.root / "m2"), str(container.root)]
    assert not (slot.path / "m1").exists()
    assert container.read("m2/held.txt") == "before\nafter\n"
    await release(mounts, name, agent)
    assert_nothing_mounted(slot, agent)
    assert_no_mounter_files(agent)
    assert agent.stop() == 0, agent.log_tail()


async def test_the_grace_period_of_a_move_ends_and_the_old_mount_goes(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
    holder: Hold,
) -> None:
    bucket = minio.make_bucket("move-grace-end", {"hello.txt": b"hello\n"})
    agent = agent_factory(s3_keys)
    config = {"bucket": bucket, "endpoint": minio.endpoint}
    name = await assign(
        mounts, slot, agent, config, mountpoint="/m1",
        class_parameters={c.PARAM_UNMOUNT_GRACE: "3"},
    )  # fmt: skip
    proc = await holder(container.root / "m1" / "held.txt")
    moved = time.monotonic()
    await mounts.edit(name, **_move("/m2"))
    await mounts.wait(name, _waiting_for_move, what="Unmounting, FilesOpen", agent=agent)
    await mounts.wait(name, phase_is("Mounted"), what="Mounted after the grace", agent=agent)
    done = time.monotonic() - moved
    assert 3.0 <= done < 15.0, done
    print(f"move with a file held open, grace 3 s: old mountpoint gone after {done:.1f} s")
    events = await mounts.events(name)
    expired = [e for e in events if e.get("reason") == "UnmountGraceExpired"]
    assert expired, events
    assert f"{slot.path}/m1" in expired[0]["message"]
    assert mounts_under(slot.path) == [str(slot.path / "m2")]
    assert container.read("m2/hello.txt") == "hello\n"
    assert len(agent.daemons()) == 1
    proc.stop(timeout=5)
    await release(mounts, name, agent)
    assert_nothing_mounted(slot, agent)
    assert agent.stop() == 0, agent.log_tail()


async def test_a_move_below_the_old_mountpoint_waits_before_the_new_mount(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
    holder: Hold,
) -> None:
    s3 = minio.client()
    bucket = minio.make_bucket("move-nested", {"hello.txt": b"hello\n"})
    agent = agent_factory(s3_keys)
    config = {"bucket": bucket, "endpoint": minio.endpoint}
    name = await assign(mounts, slot, agent, config, mountpoint="/m1")
    (old_daemon,) = agent.daemons()
    proc = await holder(container.root / "m1" / "nested.txt", first="one", seconds=5, then="two")
    # The new target lies inside the old mount: it cannot be made before the old one goes.
    await mounts.edit(name, **_move("/m1/deeper"))
    obj = await mounts.wait(name, _waiting_for_move, what="Unmounting, FilesOpen", agent=agent)
    assert obj is not None
    assert "(mounted there once the old one is gone)" in obj["status"]["message"]
    assert mounts_under(slot.path) == [str(slot.path / "m1")]
    assert agent.daemons() == [old_daemon]
    await finished(proc, within=15)
    await mounts.wait(name, phase_is("Mounted"), what="Mounted below", agent=agent)
    body = s3.get_object(Bucket=bucket, Key="nested.txt")["Body"].read()
    assert body == b"one\ntwo\n"
    await eventually(
        lambda: mounts_under(slot.path) == [str(slot.path / "m1" / "deeper")]
        and container.read("m1/deeper/hello.txt") == "hello\n",
        what="the new mount below the old mountpoint", agent=agent,
    )  # fmt: skip
    assert old_daemon not in agent.daemons()
    # Nothing was made inside the bucket on the way to the new target.
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == [
        "hello.txt", "nested.txt",
    ]  # fmt: skip
    await release(mounts, name, agent)
    assert_nothing_mounted(slot, agent)
    assert agent.stop() == 0, agent.log_tail()


async def test_a_mount_deleted_while_its_old_mountpoint_drains_waits_for_both(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
    holder: Hold,
) -> None:
    s3 = minio.client()
    bucket = minio.make_bucket("move-delete")
    agent = agent_factory(s3_keys)
    config = {"bucket": bucket, "endpoint": minio.endpoint}
    name = await assign(mounts, slot, agent, config, mountpoint="/m1")
    proc = await holder(container.root / "m1" / "last.txt", first="a", seconds=6, then="b")
    await mounts.edit(name, **_move("/m2"))
    await mounts.wait(name, _waiting_for_move, what="Unmounting, FilesOpen", agent=agent)
    await mounts.delete(name)
    # The old mount still serves the open file; the object stays until it is closed.
    await asyncio.sleep(1.0)
    assert await mounts.get(name) is not None
    assert str(slot.path / "m1") in mounts_under(slot.path)
    await finished(proc, within=15)
    await mounts.wait(name, lambda obj: obj is None, what="released", agent=agent)
    assert s3.get_object(Bucket=bucket, Key="last.txt")["Body"].read() == b"a\nb\n"
    assert_nothing_mounted(slot, agent)
    assert_no_mounter_files(agent)
    assert agent.stop() == 0, agent.log_tail()
