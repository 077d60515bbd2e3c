"""A SIGTERM'd mount pod keeps serving the pods that are terminating with it (a drain),
and hands over at once the pods that stay (the DMP alone is deleted or replaced).

Real parts as in :mod:`.test_agent`: ``dynvol dmp`` against the real apiserver, MinIO and
s3fs, with the slot bound into a container's mount namespace. The user pod is bound to a
node with no kubelet, so deleting it with a grace period leaves it terminating, as a
drained pod is while its containers shut down.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from dynvol.testing.controlplane import ControlPlane
from dynvol.testing.minio import MinioServer
from dynvol.testing.mounts import mounts_under
from dynvol_core import constants as c
from dynvol_kube import APINotFound, Client
from dynvol_kube.resources import PODS

from .conftest import AgentRunner, Container, Mounts, Slot, assign, eventually

pytestmark = pytest.mark.integration


async def _terminate(client: Client, slot: Slot, *, grace: int) -> None:
    await client.delete(PODS, slot.pod_name, namespace=slot.namespace, grace_seconds=grace)


async def _evict_the_mount_pod(client: Client, slot: Slot) -> None:
    """What ``kubectl drain`` does to the DMP: the apiserver marks it ``DisruptionTarget``
    and deletes it (it stays terminating: its node has no kubelet)."""
    ns = c.DEFAULT_SYSTEM_NAMESPACE
    body = {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": slot.dmp_name, "namespace": ns},
    }
    path = PODS.path(namespace=ns, name=slot.dmp_name, subresource="eviction")
    await client.request("POST", path, body=body)
    pod = await client.get(PODS, slot.dmp_name, namespace=ns)
    conditions = {x["type"]: x for x in pod["status"].get("conditions", [])}
    assert conditions["DisruptionTarget"]["status"] == "True", pod["status"]


async def _exited(agent: AgentRunner, within: float) -> int:
    assert agent.process is not None
    deadline = time.monotonic() + within
    while (status := agent.process.poll()) is None:
        assert time.monotonic() < deadline, f"the agent did not exit{agent.log_tail()}"
        await asyncio.sleep(0.1)
    return status


async def _mounted(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
    bucket: str,
    content: bytes,
    *,
    agent_args: Sequence[str] = (),
) -> AgentRunner:
    """An agent serving a new bucket ``bucket`` (holding ``hello.txt``) at /data."""
    name = minio.make_bucket(bucket, {"hello.txt": content})
    agent = agent_factory(s3_keys)
    await assign(
        mounts, slot, agent, {"bucket": name, "endpoint": minio.endpoint}, agent_args=agent_args
    )
    return agent


def _sigterm(agent: AgentRunner) -> None:
    assert agent.process is not None
    agent.process.send_signal(signal.SIGTERM)


async def _serves_as_evicted(agent: AgentRunner) -> None:
    said = "evicted; serving the pods that are still there"
    await eventually(
        lambda: said in agent.log.read_text(), what="the agent to say it keeps serving",
        agent=agent,
    )  # fmt: skip


@pytest.fixture
async def client(control_plane: ControlPlane) -> AsyncIterator[Client]:
    made = await Client.from_kubeconfig(control_plane.kubeconfig)
    try:
        yield made
    finally:
        await made.close()


async def test_a_drained_mount_pod_serves_its_terminating_pod_until_it_is_gone(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
    client: Client,
) -> None:
    agent = await _mounted(minio, s3_keys, slot, mounts, agent_factory, "drain", b"still here\n")
    assert container.read("data/hello.txt") == "still here\n"
    # The drain: the DMP is evicted and its user pod is terminating; the DMP gets SIGTERM.
    await _evict_the_mount_pod(client, slot)
    await _terminate(client, slot, grace=120)
    _sigterm(agent)
    await _serves_as_evicted(agent)
    # Well past the settle time, the terminating pod still reads its data.
    await asyncio.sleep(2.0)
    assert agent.process is not None
    assert agent.process.poll() is None
    assert container.read("data/hello.txt") == "still here\n"
    assert len(agent.daemons()) == 1
    # Its containers have stopped; the pod goes: the mount goes, and the agent exits.
    await client.delete(PODS, slot.pod_name, namespace=slot.namespace, grace_seconds=0)
    assert await _exited(agent, within=15) == 0
    agent.stop()
    assert mounts_under(slot.path) == []
    assert "its pod is gone" in agent.log.read_text()


async def test_a_mount_pod_deleted_alone_hands_over_at_once(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
) -> None:
    agent = await _mounted(minio, s3_keys, slot, mounts, agent_factory, "handover", b"x\n")
    began = time.monotonic()
    _sigterm(agent)
    assert await _exited(agent, within=15) == 0
    stopped_after = time.monotonic() - began
    agent.stop()
    assert mounts_under(slot.path) == []
    assert "staying: another mount pod takes over" in agent.log.read_text()
    # Not a timing test: it did not wait for the stop timeout (25 s) to run out.
    assert stopped_after < 20, stopped_after
    assert "evicted; serving" not in agent.log.read_text()


async def test_a_pod_that_takes_too_long_is_unmounted_at_the_stop_timeout(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
    client: Client,
) -> None:
    agent = await _mounted(
        minio, s3_keys, slot, mounts, agent_factory, "slowpod", b"x\n",
        agent_args=["--stop-timeout", "3"],
    )  # fmt: skip
    await _terminate(client, slot, grace=300)
    _sigterm(agent)
    assert await _exited(agent, within=20) == 0
    agent.stop()
    assert mounts_under(slot.path) == []
    assert "deleted; serving the pods that are still there" in agent.log.read_text()
    assert "still in use after 3 s" in agent.log.read_text()
    try:
        pod = await client.get(PODS, slot.pod_name, namespace=slot.namespace)
        assert pod["metadata"].get("deletionTimestamp")  # still terminating: not waited for
    except APINotFound:
        pytest.fail("the pod was deleted, so the timeout was not what ended the wait")


async def test_an_evicted_mount_pod_serves_a_pod_that_is_not_leaving_yet(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
    client: Client,
) -> None:
    """A drain evicts pods one by one and a disruption budget may hold one back: an evicted
    DMP keeps serving a pod that is not terminating, until its stop timeout."""
    agent = await _mounted(
        minio, s3_keys, slot, mounts, agent_factory, "held", b"held\n",
        agent_args=["--stop-timeout", "4"],
    )  # fmt: skip
    await _evict_the_mount_pod(client, slot)
    _sigterm(agent)
    await _serves_as_evicted(agent)
    assert container.read("data/hello.txt") == "held\n"
    assert await _exited(agent, within=20) == 0
    agent.stop()
    assert mounts_under(slot.path) == []
    assert "still in use after 4 s" in agent.log.read_text()
