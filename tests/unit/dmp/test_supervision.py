"""The DMP agent's background tasks are supervised: a provider whose check_health raises
does not end health probing (a failure is logged, counted, and the probe restarted)."""

from __future__ import annotations

import asyncio
from pathlib import Path, PurePosixPath
from typing import Any

from dynvol_dmp.agent import Agent, Settings, _Owned
from dynvol_kube import Client
from dynvol_providers import ProviderRegistry
from dynvol_providers.base import Health, HealthState, MountHandle


class RaisingHealth:
    """A provider whose health check raises twice, then reports the mount stale."""

    name = "raising"

    def __init__(self) -> None:
        self.calls = 0

    async def check_health(self, handle: MountHandle, host: Any) -> Health:
        self.calls += 1
        if self.calls <= 2:
            raise RuntimeError(f"probe bug {self.calls}")
        return Health(state=HealthState.STALE, message="the mount went stale")


async def test_a_raising_health_check_does_not_end_probing(tmp_path: Path) -> None:
    settings = Settings(
        name="dmp-1",
        namespace="dynvol-system",
        xvols=tmp_path / "xvols",
        secrets_dir=tmp_path / "secrets",
        work_dir=tmp_path / "work",
        health_interval=0.01,
    )
    # Nothing here talks to an apiserver: only the probe runs.
    agent = Agent(settings=settings, client=Client.wrap(object()), registry=ProviderRegistry())
    agent.supervisor.base = agent.supervisor.cap = 0.01
    provider = RaisingHealth()
    key = ("ns", "dvm-1")
    target = PurePosixPath(tmp_path / "xvols" / "t")
    handle = MountHandle(provider="raising", target=target, fs_type="fuse.test")
    owned = _Owned(
        key=key, desired_key="k", target=target, provider=provider,  # type: ignore[arg-type]
        request=None, handle=handle,  # type: ignore[arg-type]
    )  # fmt: skip
    agent._owned[key] = owned
    agent.supervisor.start("health probe", agent._probe_health)
    try:
        for _ in range(500):
            if owned.stale_reason:
                break
            await asyncio.sleep(0.01)
        # ... and the key was queued for repair.
        assert await asyncio.wait_for(agent.controller.queue.get(), 1) == "ns/dvm-1"
    finally:
        await agent.supervisor.close()
        agent.controller.queue.shut_down()
    assert provider.calls == 3
    assert agent.supervisor.failures["health probe"] == 2
    assert owned.stale_reason == "the mount went stale"
