"""The mount pod's status endpoint against a real agent, apiserver, MinIO and s3fs.

The agent runs as ``dynvol --log-format json dmp --metrics-address 127.0.0.1:PORT``; the
test scrapes it while it mounts a bucket, repairs the mount after its FUSE daemon is
killed, and unmounts it, and checks that the figures move with each step. It also sees the
Events on the user pod, and that the agent's log lines are JSON with the stable keys.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from dynvol.testing.minio import MinioServer
from dynvol.testing.processes import free_port
from dynvol.testing.scraping import Scrape, get, scrape
from dynvol_dmp.metrics import STAGES

from .conftest import AgentRunner, Container, Mounts, Slot, eventually, phase_is, release

pytestmark = pytest.mark.integration


async def _until(check: Callable[[], Any], *, what: str, agent: AgentRunner) -> Any:
    """:func:`eventually` at the pace of a scrape."""
    return await eventually(check, what=what, interval=0.1, agent=agent)


async def test_figures_move_with_a_mount_a_repair_and_an_unmount(
    minio: MinioServer,
    s3_keys: dict[str, str],
    slot: Slot,
    container: Container,
    mounts: Mounts,
    agent_factory: Callable[[dict[str, str]], AgentRunner],
) -> None:
    bucket = minio.make_bucket("metrics", {"hello.txt": b"hello\n"})
    await mounts.create_class({"s3-mounter": "s3fs"}, name=slot.class_name)
    agent = agent_factory(s3_keys)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # With its status server and JSON logs.
    agent.start(log_format="json", metrics_address=f"127.0.0.1:{port}")

    def ready() -> bool:
        try:
            return get(url + "/readyz", timeout=2)[0] == 200
        except OSError:
            return False

    await _until(ready, what="/readyz", agent=agent)
    status, body = get(url + "/healthz")
    assert status == 200, body
    assert f"[+]controller dmp {slot.dmp_name} ok" in body
    before = scrape(url)
    assert before.get("dynvol_dmp_mounts", phase="Mounted") == 0
    assert before.get("dynvol_dmp_mount_duration_seconds_count") == 0

    # A mount.
    name = await mounts.create(slot=slot, config={"bucket": bucket, "endpoint": minio.endpoint})
    await mounts.wait(name, phase_is("Mounted"), what="Mounted", agent=agent)
    assert container.read("data/hello.txt") == "hello\n"

    def mounted() -> Scrape | None:
        now = scrape(url)
        return now if now.get("dynvol_dmp_mounts", phase="Mounted") == 1 else None

    after_mount = await _until(mounted, what="one mount Mounted in /metrics", agent=agent)
    assert after_mount.get("dynvol_dmp_mount_duration_seconds_count", provider="s3",
                           result="Mounted") == 1  # fmt: skip
    assert after_mount.get("dynvol_dmp_mount_duration_seconds_sum", provider="s3") > 0
    # Each stage of that mount, once; the mounter's start is the one that takes time.
    for stage in STAGES:
        assert after_mount.get("dynvol_dmp_mount_stage_seconds_count", stage=stage) == 1, stage
    assert after_mount.get("dynvol_dmp_mount_stage_seconds_sum", stage="Mounter") > 0
    controller = f"dmp {slot.dmp_name}"
    assert after_mount.get("dynvol_reconciles_total", controller=controller, result="Done") >= 1
    assert after_mount.get("dynvol_apiserver_requests_total", verb="patch",
                           resource="dynamicvolumemounts/status", code="200") >= 1  # fmt: skip
    assert after_mount.get("dynvol_informer_synced", resource="dynamicvolumemounts") == 1

    # A repair: the FUSE daemon dies, the agent mounts again.
    (daemon,) = agent.daemons()
    os.kill(daemon, signal.SIGKILL)

    def repaired() -> Scrape | None:
        now = scrape(url)
        return now if now.get("dynvol_dmp_repairs_total", result="Remounted") == 1 else None

    after_repair = await _until(repaired, what="a repair in /metrics", agent=agent)
    assert after_repair.get("dynvol_dmp_stale_mounts_total", cause="MounterExited") == 1
    assert after_repair.get("dynvol_dmp_repair_duration_seconds_count", provider="s3",
                            result="Remounted") == 1  # fmt: skip
    assert after_repair.get("dynvol_dmp_mount_duration_seconds_count", result="Mounted") == 2
    assert after_repair.get("dynvol_dmp_mounts", phase="Mounted") == 1
    # The recorder writes Events in the background: the Repaired one comes a moment later.
    await _until(
        lambda: scrape(url).get("dynvol_events_total", type="Warning", reason="Repaired") >= 1,
        what="the Repaired Event counted", agent=agent,
    )  # fmt: skip

    # An unmount.
    await release(mounts, name, agent, what="the DynamicVolumeMount gone")

    def unmounted() -> Scrape | None:
        now = scrape(url)
        return now if now.get("dynvol_dmp_unmounts_total", provider="s3") == 1 else None

    after_unmount = await _until(unmounted, what="an unmount in /metrics", agent=agent)
    assert after_unmount.get("dynvol_dmp_mounts", phase="Mounted") == 0
    assert after_unmount.get("dynvol_dmp_mount_failures_total") == 0

    # Events on the user pod: mounted (first mount and repair), unmounted.
    deadline = time.monotonic() + 20
    while True:
        events = await mounts.events(slot.pod_name)
        reasons = {e["reason"] for e in events if e["involvedObject"]["kind"] == "Pod"}
        if {"Mounted", "Unmounted"} <= reasons or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert {"Mounted", "Unmounted"} <= reasons, events
    by_reason = {e["reason"]: e for e in events}
    assert by_reason["Mounted"]["involvedObject"]["uid"] == slot.pod_uid
    assert by_reason["Mounted"]["count"] >= 2  # the first mount and the repair, aggregated
    assert by_reason["Mounted"]["source"]["component"] == "dynvol-dmp"

    assert agent.stop() == 0, agent.log_tail()
    # The agent's own log lines are JSON objects with the stable keys.
    lines = [line for line in agent.log.read_text().splitlines() if line.startswith('{"ts"')]
    entries = [json.loads(line) for line in lines]
    assert entries, agent.log_tail()
    assert all({"ts", "level", "logger", "msg"} <= e.keys() for e in entries)
    (first_mount, *_) = [e for e in entries if e["msg"].startswith(f"mounted {mounts.namespace}/")]
    assert first_mount["namespace"] == mounts.namespace
    assert first_mount["name"] == name
    assert first_mount["reason"] == "Mounted"
    assert any(e.get("reason") == "Repaired" for e in entries)
