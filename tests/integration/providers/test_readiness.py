"""The readiness probe of a FUSE daemon's mount counts only answers from that mount.

s3fs mounts, checks the bucket in its FUSE init and, when the credentials are refused,
unmounts and then exits. Between the unmount and the exit, the target is a bare
directory again: a lookup there answers "no such file" exactly as a working mount would.
Real parts: a tmpfs mounted and unmounted under an rshared temporary directory.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path, PurePosixPath

import pytest

from dynvol_core.mountinfo import MountEntry, topmost_at
from dynvol_providers.hosting import LocalHost, read_mount_table

pytestmark = pytest.mark.integration


@pytest.fixture
async def never_done() -> AsyncIterator[asyncio.Task[int]]:
    """A stand-in for a daemon's supervision task whose process has not exited yet."""

    async def forever() -> int:
        await asyncio.Event().wait()
        return 0

    task = asyncio.create_task(forever())
    yield task
    task.cancel()


@pytest.fixture
def tmpfs(rshared_dir: Path) -> Iterator[tuple[PurePosixPath, MountEntry]]:
    """A tmpfs mounted at a fresh directory, and its mount-table entry; unmounted after."""
    target = rshared_dir / "target"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "probe", str(target)], check=True)
    try:
        entry = topmost_at(read_mount_table(), PurePosixPath(target))
        assert entry is not None
        assert entry.fs_type == "tmpfs"
        yield PurePosixPath(target), entry
    finally:
        if os.path.ismount(target):
            subprocess.run(["umount", str(target)], check=True)


async def test_a_mount_that_went_away_before_the_probe_does_not_answer(
    tmpfs: tuple[PurePosixPath, MountEntry], never_done: asyncio.Task[int]
) -> None:
    target, entry = tmpfs
    await asyncio.to_thread(subprocess.run, ["umount", str(target)], check=True)
    deadline = time.monotonic() + 5.0
    assert not await LocalHost._answers(target, entry, deadline, never_done)


async def test_a_mount_that_is_there_answers(
    tmpfs: tuple[PurePosixPath, MountEntry], never_done: asyncio.Task[int]
) -> None:
    target, entry = tmpfs
    deadline = time.monotonic() + 5.0
    assert await LocalHost._answers(target, entry, deadline, never_done)
