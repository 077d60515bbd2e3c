"""The DMP agent against a real apiserver, real MinIO, real FUSE mounts and mount namespaces.

The agent runs as ``dynvol dmp`` in its own mount namespace; it mounts under a slot whose
root is rshared, and a "container" namespace that bound the slot rslave sees the mount.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path
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
    assert_read_only,
    assign,
    eventually,
    phase_is,
    ready_condition,
    release,
)

pytestmark = pytest.mark.integration


#: How long the reads and writes through a mount may take to show.
WITHIN = 20.0


@pytest.mark.parametrize("mounter", ["s3fs", "rclone"])
async def test_mount_propagates_repairs_restarts_and_unmounts(
    mounter: str,
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
) -> None:
    s3 = minio.client()
    bucket = minio.make_bucket("dmp", {"hello.txt": b"hello from S3\n"})
    agent = agent_factory(s3_keys)
    config = {"bucket": bucket, "endpoint": minio.endpoint}
    name = await assign(mounts, slot, agent, config, class_parameters={"s3-mounter": mounter})
    obj = await mounts.wait(name, phase_is("Mounted"), what="Mounted", agent=agent)
    assert obj is not None
    assert "dynamicvolume.csi.cloudnative101.net/unmount" in obj["metadata"]["finalizers"]
    assert ready_condition(obj)["status"] == "True"

    # An object written through the S3 API is readable in the container.
    assert container.read("data/hello.txt") == "hello from S3\n"
    # A file written in the container lands in the bucket.
    result = container.sh(f"echo 'from the container' > '{container.root}/data/out.txt'")
    assert result.returncode == 0, result.stderr

    def landed() -> bool:
        try:
            body = s3.get_object(Bucket=bucket, Key="out.txt")["Body"].read()
        except s3.exceptions.NoSuchKey:
            return False
        return bool(body == b"from the container\n")

    await eventually(landed, within=WITHIN, what="out.txt in the bucket")

    # kill -9 of the FUSE daemon: reads work again without any action from the test.
    (daemon,) = agent.daemons()
    os.kill(daemon, signal.SIGKILL)

    def repaired() -> bool:
        return container.read("data/hello.txt") == "hello from S3\n" and agent.daemons() != [daemon]

    await eventually(repaired, within=WITHIN, what="reads after the repair")
    obj = await mounts.wait(
        name, lambda o: o is not None and o["status"].get("repairCount", 0) >= 1,
        what="repairCount", agent=agent,
    )  # fmt: skip
    assert obj is not None
    assert obj["status"]["lastRepairAt"]
    assert obj["status"]["phase"] == "Mounted"

    # Stopping the agent leaves no mounts, anywhere.
    assert agent.stop() == 0, agent.log_tail()
    assert mounts_under(slot.path) == []
    assert container.mounts() == [str(container.root)]
    # Restarting it restores every mount still assigned.
    agent.start()
    await mounts.wait(name, phase_is("Mounted"), what="Mounted after restart", agent=agent)
    await eventually(
        lambda: container.read("data/hello.txt") == "hello from S3\n",
        within=WITHIN, what="reads after restart",
    )  # fmt: skip

    # Deleting the DynamicVolumeMount unmounts it in the container and releases it.
    await release(mounts, name, agent, what="the finalizer to be released")
    assert container.mounts() == [str(container.root)]
    assert mounts_under(slot.path) == []
    assert agent.stop() == 0


async def test_read_only_is_enforced_in_the_container(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
) -> None:
    bucket = minio.make_bucket("ro", {"seen.txt": b"read me\n"})
    agent = agent_factory(s3_keys)
    config = {"bucket": bucket, "endpoint": minio.endpoint}
    await assign(mounts, slot, agent, config, read_only=True)
    assert container.read("data/seen.txt") == "read me\n"
    assert_read_only(container, "data/new.txt")
    assert agent.stop() == 0
    assert mounts_under(slot.path) == []


async def _record_phases(mounts: Mounts, name: str, since: str, phases: list[str]) -> None:
    """Append the phase of every version of ``name`` written after ``since``."""
    from kubernetes_asyncio import watch

    stream = watch.Watch().stream(
        mounts.custom.list_namespaced_custom_object, c.GROUP, c.VERSION, mounts.namespace,
        c.PLURAL_MOUNT, field_selector=f"metadata.name={name}", resource_version=since,
    )  # fmt: skip
    async for event in stream:
        phases.append((event["object"].get("status") or {}).get("phase", ""))


@pytest.mark.parametrize(
    ("case", "reason", "hint"),
    [
        ("wrong-credentials", "AccessDenied", "Secret"),
        ("missing-bucket", "StorageNotFound", "create it"),
        ("unreachable", "EndpointUnreachable", "endpoint"),
    ],
)
async def test_bad_config_fails_with_an_actionable_message(
    case: str,
    reason: str,
    hint: str,
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
) -> None:
    keys, bucket, endpoint = dict(s3_keys), minio.make_bucket("bad"), minio.endpoint
    if case == "wrong-credentials":
        keys["secret-access-key"] = "not-the-right-secret"
    elif case == "missing-bucket":
        bucket = "no-such-bucket-dynvol"
    else:
        endpoint = "http://127.0.0.1:9"  # discard port: nothing listens
    await mounts.create_class(name=slot.class_name)
    agent = agent_factory(keys)
    agent.start()
    name = await mounts.create(slot=slot, config={"bucket": bucket, "endpoint": endpoint})
    obj = await mounts.wait(name, phase_is("Failed"), limit=60, what="Failed", agent=agent)
    assert obj is not None
    ready = ready_condition(obj)
    assert ready["status"] == "False"
    assert ready["reason"] == reason, ready["message"]
    assert hint in obj["status"]["message"]
    assert keys["secret-access-key"] not in obj["status"]["message"]
    if case == "wrong-credentials":
        # The agent retries with backoff, and the object stays Failed with its last error
        # meanwhile: it must not flap back to Mounting on a retry. A watch sees every write
        # (a poll could miss a Mounting that lasts only as long as a failing attempt).
        # Only this case: an unreachable endpoint takes s3fs 16 s per attempt, and with a
        # missing bucket s3fs can answer the readiness probe before it exits (every lookup
        # in a missing bucket says "no such file"), so an attempt may show Mounted for a
        # moment before the agent sees the exit (docs/operations.md).
        phases: list[str] = []
        watching = asyncio.create_task(
            _record_phases(mounts, name, obj["metadata"]["resourceVersion"], phases)
        )
        try:
            failed_line = f"mounting {mounts.namespace}/{name} failed"
            deadline = time.monotonic() + 30
            while agent.log.read_text().count(failed_line) < 2:
                assert time.monotonic() < deadline, "the agent did not retry within 30 s"
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # the retry's status writes reach the watch
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
        assert phases, "the retry wrote no status"
        assert set(phases) == {"Failed"}, phases
    # Nothing half-mounted, no daemon left. The agent keeps retrying with backoff, so a
    # retry may be under way right now; between attempts nothing may remain.
    deadline = time.monotonic() + 30
    while mounts_under(slot.path) or agent.daemons():
        assert time.monotonic() < deadline, (mounts_under(slot.path), agent.daemons())
        await asyncio.sleep(0.1)
    assert agent.stop() == 0


def _write_secret(directory: Path, data: dict[str, str]) -> None:
    """Replace the Secret's files the way kubelet does: each one atomically."""
    for key, value in data.items():
        staged = directory / f".{key}.new"
        staged.write_text(value)
        staged.replace(directory / key)


async def test_a_changed_credentials_secret_is_used_without_any_api_change(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
) -> None:
    bucket = minio.make_bucket("rotate", {"hello.txt": b"rotated\n"})
    agent = agent_factory(s3_keys)
    name = await assign(mounts, slot, agent, {"bucket": bucket, "endpoint": minio.endpoint})
    assert container.read("data/hello.txt") == "rotated\n"
    (daemon,) = agent.daemons()

    # A working mount has no retry pending: only the change of the mounted Secret can make
    # the agent mount again, and with a revoked key that mount must fail.
    _write_secret(agent.secrets_dir, {**s3_keys, "secret-access-key": "revoked-secret"})
    obj = await mounts.wait(name, phase_is("Failed"), limit=60, what="Failed", agent=agent)
    assert obj is not None
    assert ready_condition(obj)["reason"] == "AccessDenied", obj["status"]
    assert daemon not in agent.daemons()
    assert container.read("data/hello.txt") is None

    # The right key again: mounted again, and the container reads through it.
    _write_secret(agent.secrets_dir, s3_keys)
    await mounts.wait(name, phase_is("Mounted"), limit=60, what="Mounted again", agent=agent)
    await eventually(
        lambda: container.read("data/hello.txt") == "rotated\n",
        within=WITHIN, what="reads after rotation",
    )  # fmt: skip
    assert agent.stop() == 0
    assert mounts_under(slot.path) == []


async def test_an_agent_told_its_pods_namespace_takes_no_mount_of_another(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
    kube_client: Any,
) -> None:
    """An independent DMP watches its pod's namespace only (``--mounts-namespace``, which
    the node plugin passes it): a mount naming it from another namespace never reaches it,
    while its own is mounted as usual."""
    from kubernetes_asyncio import client

    core = client.CoreV1Api(kube_client)
    elsewhere = f"elsewhere-{secrets.token_hex(4)}"
    await core.create_namespace({"metadata": {"name": elsewhere}})
    others = Mounts(kube_client, elsewhere)
    try:
        bucket = minio.make_bucket("own-ns", {"seen.txt": b"mine\n"})
        config = {"bucket": bucket, "endpoint": minio.endpoint}
        agent = agent_factory(s3_keys)
        await mounts.create_class(None, name=slot.class_name)
        agent.start(extra=["--mounts-namespace", mounts.namespace])
        # The foreign one first: had the agent seen it, it would have taken it before.
        foreign = await others.create(slot=slot, config=config, mountpoint="/foreign")
        name = await mounts.create(slot=slot, config=config)
        await mounts.wait(name, phase_is("Mounted"), what="Mounted", agent=agent)
        assert container.read("data/seen.txt") == "mine\n"
        untouched = await others.get(foreign)
        assert untouched is not None
        assert not untouched.get("status")
        assert not untouched["metadata"].get("finalizers")
        # Watching every namespace, the agent would have had it, and refused it in its log
        # (it names no pod this DMP serves); the log names its own mount only.
        log = agent.log.read_text()
        assert f"{mounts.namespace}/{name}" in log
        assert foreign not in log
        await release(mounts, name, agent)
        assert agent.stop() == 0
        assert mounts_under(slot.path) == []
    finally:
        await others.cleanup()
        await core.delete_namespace(elsewhere)
