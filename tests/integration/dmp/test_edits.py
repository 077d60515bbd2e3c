"""Every field of a live DynamicVolumeMount changes in place, and the agent converges: the
new mount is there, the old one is gone from the container, the host and the mount pod's
mount namespace, and its FUSE daemon stopped (docs/design.md §9).

The node plugin rewrites a mount's spec when its claim changes (``Mounts.edit`` does what
it does); here the agent runs as ``dynvol dmp`` against a real apiserver, MinIO and real
s3fs/rclone, as in :mod:`.test_agent`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from dynvol.testing.minio import MinioServer
from dynvol.testing.mounts import mounts_under
from dynvol_core import constants as c

from .conftest import (
    AgentRunner,
    Container,
    Mounts,
    Slot,
    assert_no_mounter_files,
    assert_nothing_mounted,
    assign,
    eventually,
    phase_is,
    release,
)

pytestmark = pytest.mark.integration


def _agent_mounts(agent: AgentRunner, slot: Slot) -> list[str]:
    """The mounts below the slot in the mount pod's own mount namespace."""
    assert agent.process is not None
    return mounts_under(slot.path, pid=str(agent.process.pid))


async def _converged(
    *,
    agent: AgentRunner,
    slot: Slot,
    container: Container,
    mountpoint: str,
    reads: tuple[str, str],
    old_daemons: list[int],
    what: str,
) -> int:
    """Wait until ``mountpoint`` is the only mount and serves ``reads``, from inside the
    container, on the host and in the DMP, with one daemon that is not an old one; its pid."""
    relative, content = reads
    target = f"{mountpoint.strip('/')}/{relative}"
    await eventually(lambda: container.read(target) == content, what=f"{what}: {target}")
    where = slot.path / mountpoint.strip("/")
    inside = container.root / mountpoint.strip("/")

    def settled() -> list[int] | None:
        # One look at the daemons, taken before the mount tables: an old mount at the same
        # target looks like the new one, but the agent starts the new daemon only once the
        # old one has exited, so a single daemon that is not an old one, seen first, means
        # the mount found afterwards is the new one. Two looks could straddle the old
        # daemon's exit and the new one's start.
        daemons = agent.daemons()
        if len(daemons) != 1 or set(daemons) & set(old_daemons):
            return None
        mounted = (
            container.mounts() == [str(inside), str(container.root)]
            and mounts_under(slot.path) == [str(where)]
            and _agent_mounts(agent, slot) == [str(where)]
        )
        return daemons if mounted else None

    try:
        (daemon,) = await eventually(settled, within=15.0, what=f"{what}: no stale mount or daemon")
    except AssertionError:
        raise AssertionError(
            f"{what}: container {container.mounts()}, host {mounts_under(slot.path)}, "
            f"dmp {_agent_mounts(agent, slot)}, daemons {agent.daemons()} (old {old_daemons})"
            f"{agent.log_tail()}"
        ) from None
    return daemon


async def _released_cleanly(mounts: Mounts, name: str, agent: AgentRunner, slot: Slot) -> None:
    """Delete ``name``: nothing is left of it, nor of any mount made on the way to it."""
    await release(mounts, name, agent)
    assert_nothing_mounted(slot, agent)
    assert_no_mounter_files(agent)
    assert agent.stop() == 0, agent.log_tail()


def _move(mountpoint: str) -> dict[str, str]:
    return {"mountpoint": mountpoint, "dmpTargetPath": f"{c.DMP_XVOLS_DIR}{mountpoint}"}


def _mounted_saying(message: str) -> Callable[[dict[str, Any] | None], bool]:
    mounted = phase_is("Mounted")
    return lambda obj: mounted(obj) and obj is not None and obj["status"]["message"] == message


@pytest.mark.parametrize("mounter", ["s3fs", "rclone"])
async def test_a_changed_mountpoint_moves_the_mount(
    mounter: str,
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
) -> None:
    bucket = minio.make_bucket("move", {"hello.txt": b"moved\n"})
    agent = agent_factory(s3_keys)
    name = await assign(
        mounts, slot, agent, {"bucket": bucket, "endpoint": minio.endpoint},
        mountpoint="/m1", class_parameters={"s3-mounter": mounter},
    )  # fmt: skip
    reads = ("hello.txt", "moved\n")
    daemon = await _converged(
        agent=agent, slot=slot, container=container, mountpoint="/m1", reads=reads,
        old_daemons=[], what="first mount",
    )  # fmt: skip
    # Elsewhere (mounted before the old one goes), below the old one, above it, back.
    for mountpoint in ("/m2", "/m2/deeper/d", "/m2", "/m1"):
        await mounts.edit(name, **_move(mountpoint))
        daemon = await _converged(
            agent=agent, slot=slot, container=container, mountpoint=mountpoint, reads=reads,
            old_daemons=[daemon], what=f"moved to {mountpoint}",
        )  # fmt: skip
        # The mount table converged first; the status says where a moment later.
        message = f"mounted at {slot.path}{mountpoint}"
        obj = await mounts.wait(
            name, _mounted_saying(message), what=f"Mounted, {message!r}", agent=agent,
        )  # fmt: skip
        assert obj is not None

    # The directories of the old mountpoints go too, once their mounts have (the old mount
    # is unmounted after the new one serves, so a moment after the status): only the last
    # one stays.
    def only_the_last() -> bool:
        return sorted(p.name for p in slot.path.iterdir()) == ["m1"]

    await eventually(only_the_last, what="only /m1 left in the slot", within=15, agent=agent)
    await _released_cleanly(mounts, name, agent, slot)


async def test_changed_s3_config_and_read_only_remount(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
) -> None:
    first = minio.make_bucket("cfg-a", {"which.txt": b"a\n"})
    second = minio.make_bucket("cfg-b", {"which.txt": b"b\n", "team/which.txt": b"b/team\n"})
    agent = agent_factory(s3_keys)
    name = await assign(mounts, slot, agent, {"bucket": first, "endpoint": minio.endpoint})
    common = {"agent": agent, "slot": slot, "container": container, "mountpoint": "/data"}
    daemon = await _converged(**common, reads=("which.txt", "a\n"), old_daemons=[], what="a")
    # The same MinIO, spelled another way: a changed endpoint all the same.
    other_endpoint = "http://localhost:" + minio.endpoint.rsplit(":", 1)[1]
    edits: list[tuple[str, dict[str, Any], tuple[str, str]]] = [
        ("bucket", {"config": {"bucket": second}}, ("which.txt", "b\n")),
        ("prefix", {"config": {"prefix": "team"}}, ("which.txt", "b/team\n")),
        ("endpoint", {"config": {"endpoint": other_endpoint}}, ("which.txt", "b/team\n")),
        ("readOnly on", {"readOnly": True}, ("which.txt", "b/team\n")),
        ("readOnly off", {"readOnly": False}, ("which.txt", "b/team\n")),
        ("prefix gone", {"config": {"prefix": None}}, ("which.txt", "b\n")),
    ]  # fmt: skip
    for what, fields, reads in edits:
        await mounts.edit(name, **fields)
        daemon = await _converged(**common, reads=reads, old_daemons=[daemon], what=what)
        writable = container.sh(f"echo {what!r} > '{container.root}/data/w.txt'")
        if what == "readOnly on":
            assert writable.returncode != 0, what
            assert "Read-only file system" in writable.stderr
        else:
            assert writable.returncode == 0, (what, writable.stderr)
        await mounts.wait(name, phase_is("Mounted"), what=f"Mounted after {what}", agent=agent)
    await _released_cleanly(mounts, name, agent, slot)


async def test_changed_rclone_remote_and_path_remount(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
) -> None:
    first = minio.make_bucket("rc-a", {"which.txt": b"a\n", "sub/which.txt": b"a/sub\n"})
    second = minio.make_bucket("rc-b", {"which.txt": b"b\n"})
    agent = agent_factory(s3_keys)
    remote = {"provider": "Minio", "endpoint": minio.endpoint}
    config = {"type": "s3", "remotePath": first, "parameters": remote}
    name = await assign(mounts, slot, agent, config, provider="rclone")
    common = {"agent": agent, "slot": slot, "container": container, "mountpoint": "/data"}
    daemon = await _converged(**common, reads=("which.txt", "a\n"), old_daemons=[], what="a")
    edits: list[tuple[str, dict[str, Any], tuple[str, str]]] = [
        ("remotePath", {"remotePath": f"{first}/sub"}, ("which.txt", "a/sub\n")),
        ("remote", {"parameters": {"provider": "Other", "region": "us-east-1"}},
         ("which.txt", "a/sub\n")),
        ("another bucket", {"remotePath": second}, ("which.txt", "b\n")),
    ]  # fmt: skip
    for what, fields, reads in edits:
        await mounts.edit(name, config=fields)
        daemon = await _converged(**common, reads=reads, old_daemons=[daemon], what=what)
    await _released_cleanly(mounts, name, agent, slot)


async def test_a_move_whose_new_mount_fails_still_unmounts_the_old_one(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
) -> None:
    bucket = minio.make_bucket("movefail", {"hello.txt": b"x\n"})
    agent = agent_factory(s3_keys)
    name = await assign(
        mounts, slot, agent, {"bucket": bucket, "endpoint": minio.endpoint}, mountpoint="/m1"
    )
    await _converged(
        agent=agent, slot=slot, container=container, mountpoint="/m1", reads=("hello.txt", "x\n"),
        old_daemons=[], what="first mount",
    )  # fmt: skip
    # Both at once: the new mount cannot be made (no such bucket), and it moves.
    await mounts.edit(name, config={"bucket": f"{bucket}-missing"}, **_move("/m2"))
    obj = await mounts.wait(name, phase_is("Failed"), what="Failed", agent=agent)
    assert obj is not None

    def nothing_left() -> bool:
        return (
            mounts_under(slot.path) == []
            and container.mounts() == [str(container.root)]
            and agent.daemons() == []
        )

    await eventually(nothing_left, what="the old mount to go although the new one failed")
    assert not (slot.path / "m1").exists()
    assert agent.stop() == 0, agent.log_tail()
