"""A deleted mount with a file still open in a container gets the class's unmount grace
period (docs/design.md §9.5): phase Unmounting with reason FilesOpen meanwhile, and what
was written and closed reaches the bucket. Real apiserver, MinIO, s3fs, mount namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import PurePosixPath

import pytest

from dynvol.testing.minio import MinioServer
from dynvol.testing.mounts import mounts_under
from dynvol_core import constants as c
from dynvol_providers.builtin.rclone import pending_uploads

from .conftest import (
    AgentRunner,
    Container,
    Hold,
    Mounts,
    Slot,
    assert_nothing_mounted,
    assert_read_only,
    assign,
    descendants,
    eventually,
    files_open,
    finished,
    gone,
    phase_is,
    release,
)

pytestmark = pytest.mark.integration


async def test_a_file_open_across_deletion_is_completed_before_unmount(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
    holder: Hold,
) -> None:
    s3 = minio.client()
    bucket = minio.make_bucket("grace")
    agent = agent_factory(s3_keys)
    config = {"bucket": bucket, "endpoint": minio.endpoint}
    name = await assign(mounts, slot, agent, config)  # the default grace: 30 s
    path = container.root / "data" / "long.txt"
    proc = await holder(path, first="part1", seconds=10, then="part2")
    deleted = time.monotonic()
    await mounts.delete(name)
    obj = await mounts.wait(name, files_open, what="Unmounting, FilesOpen", agent=agent)
    assert obj is not None
    assert "unmount grace period of 30s" in obj["status"]["message"]
    assert mounts_under(slot.path) == [str(slot.path / "data")]  # still mounted meanwhile
    await mounts.wait(name, gone, limit=40, what="released", agent=agent)
    released = time.monotonic() - deleted
    status = await asyncio.to_thread(proc.stop, timeout=5)
    assert status == 0, proc.log_tail()
    # Released once the file was closed (about 10 s after it was opened), not at once and
    # not only at the end of the grace period.
    assert 5.0 < released < 25.0, released
    body = s3.get_object(Bucket=bucket, Key="long.txt")["Body"].read()
    assert body == b"part1\npart2\n"
    assert_nothing_mounted(slot, agent)
    assert container.mounts() == [str(container.root)]
    assert agent.stop() == 0, agent.log_tail()


async def test_the_grace_period_ends_and_the_mount_goes(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
    holder: Hold,
) -> None:
    bucket = minio.make_bucket("grace-end")
    agent = agent_factory(s3_keys)
    config = {"bucket": bucket, "endpoint": minio.endpoint}
    name = await assign(mounts, slot, agent, config, class_parameters={c.PARAM_UNMOUNT_GRACE: "2"})
    path = container.root / "data" / "held.txt"
    await holder(path)
    deleted = time.monotonic()
    await release(mounts, name, agent)
    released = time.monotonic() - deleted
    assert 2.0 <= released < 15.0, released
    events = await mounts.events(name)
    assert any(e.get("reason") == "UnmountGraceExpired" for e in events), events
    assert_nothing_mounted(slot, agent)
    assert agent.stop() == 0, agent.log_tail()


async def _rclone_wrote(
    minio: MinioServer,
    mounts: Mounts,
    slot: Slot,
    agent: AgentRunner,
    container: Container,
    bucket: str,
    key: str,
) -> str:
    """Mount ``bucket`` at /data with rclone and write 64 MiB to ``key`` in it from the
    container (the file is closed on return); the mount's name."""
    config = {"bucket": bucket, "endpoint": minio.endpoint}
    name = await assign(mounts, slot, agent, config, class_parameters={"s3-mounter": "rclone"})
    path = container.root / "data" / key
    result = container.sh(f"head -c 67108864 /dev/urandom > '{path}'", timeout=60)
    assert result.returncode == 0, result.stderr
    return name


async def test_rclone_uploads_what_was_closed_before_it_is_stopped(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
) -> None:
    s3 = minio.client()
    bucket = minio.make_bucket("grace-rclone")
    agent = agent_factory(s3_keys)
    # rclone's write cache uploads a file after it is closed: the deletion right after the
    # close must not stop rclone before the upload is done.
    name = await _rclone_wrote(minio, mounts, slot, agent, container, bucket, "big.bin")
    await release(mounts, name, agent, limit=60)
    head = s3.head_object(Bucket=bucket, Key="big.bin")
    assert head["ContentLength"] == 64 * 1024 * 1024
    assert_nothing_mounted(slot, agent)
    assert agent.stop() == 0, agent.log_tail()


async def test_rclone_resumes_an_upload_cut_by_a_killed_mount_pod(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
) -> None:
    s3 = minio.client()
    bucket = minio.make_bucket("resume-rclone")
    agent = agent_factory(s3_keys)
    name = await _rclone_wrote(minio, mounts, slot, agent, container, bucket, "cut.bin")
    # rclone records a closed file as to be uploaded in its cache (vfsMeta/); the upload
    # that is cut is one it has recorded.
    await eventually(
        lambda: sum(pending_uploads(PurePosixPath(m.parent)) for m in
                    agent.work_dir.glob("*/cache/vfsMeta")) >= 1,
        within=10, interval=0.01, what="rclone to record the closed file as dirty", agent=agent,
    )  # fmt: skip
    # The mount pod's container dies mid-upload (every process in it at once); its work
    # dir, an emptyDir in a real DMP, stays. Nothing was uploaded yet.
    assert agent.process is not None
    victims = [agent.process.pid, *descendants(agent.process.pid)]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    agent.stop(timeout=10)
    with pytest.raises(s3.exceptions.ClientError):
        s3.head_object(Bucket=bucket, Key="cut.bin")
    # The restarted agent mounts again on the same cache, and rclone finishes the upload.
    agent.start()
    await mounts.wait(name, phase_is("Mounted"), limit=60, what="Mounted again", agent=agent)

    def uploaded() -> bool:
        try:
            head = s3.head_object(Bucket=bucket, Key="cut.bin")
        except s3.exceptions.ClientError:
            return False
        return bool(head["ContentLength"] == 64 * 1024 * 1024)

    await eventually(uploaded, within=60, interval=0.5, what="the cut upload resumed", agent=agent)
    await release(mounts, name, agent, limit=60)
    assert_nothing_mounted(slot, agent)
    assert agent.stop() == 0, agent.log_tail()


async def test_a_file_open_across_a_config_change_is_completed_first(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
    holder: Hold,
) -> None:
    s3 = minio.client()
    bucket = minio.make_bucket("grace-edit")
    agent = agent_factory(s3_keys)
    name = await assign(mounts, slot, agent, {"bucket": bucket, "endpoint": minio.endpoint})
    (old_daemon,) = agent.daemons()
    path = container.root / "data" / "edit.txt"
    proc = await holder(path, first="before", seconds=6, then="after")
    await mounts.edit(name, readOnly=True)  # the same target, mounted anew
    obj = await mounts.wait(name, files_open, what="Unmounting, FilesOpen", agent=agent)
    assert obj is not None
    assert "configuration changed" in obj["status"]["message"]
    assert agent.daemons() == [old_daemon]  # the old mounter serves the open file meanwhile
    await finished(proc, within=15)  # it closes the file by itself, 6 s after opening it
    await mounts.wait(name, phase_is("Mounted"), limit=30, what="Mounted again", agent=agent)
    body = s3.get_object(Bucket=bucket, Key="edit.txt")["Body"].read()
    assert body == b"before\nafter\n"
    assert_read_only(container, "data/ro.txt")
    assert len(agent.daemons()) == 1
    assert agent.daemons() != [old_daemon]
    await release(mounts, name, agent)
    assert agent.stop() == 0, agent.log_tail()
