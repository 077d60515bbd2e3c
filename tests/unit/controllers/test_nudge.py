"""The node reconciler's coalescing: a lone change is acted on at once, a burst is batched.

The queue is the reconciler's real one; nothing is started (no pass runs), so what is
queued can be read as it is.
"""

from __future__ import annotations

import pytest

from dynvol_controllers import NodeReconciler, NodeReconcilerSettings
from dynvol_kube import Client
from dynvol_kube.kubeconfig import Endpoint


async def _reconciler(coalesce: float) -> tuple[NodeReconciler, Client]:
    client = await Client.from_endpoint(Endpoint(server="https://127.0.0.1:1"))
    settings = NodeReconcilerSettings(coalesce=coalesce)
    return NodeReconciler(client, "node-a", settings), client


async def test_the_first_change_after_a_quiet_spell_is_queued_at_once() -> None:
    reconciler, client = await _reconciler(coalesce=30)
    try:
        queue = reconciler.controller.queue
        reconciler.nudge()
        assert len(queue) == 1  # ready for a worker now, no timer
        assert await queue.get() == "node-a"
        queue.done("node-a")
        # Another change within the window: part of a burst, so it waits for the window.
        reconciler.nudge()
        reconciler.nudge()
        assert len(queue) == 0
        assert queue.pending == 1  # one timer for the burst, not one per change
    finally:
        reconciler.controller.queue.shut_down()
        await client.close()


@pytest.mark.parametrize("coalesce", [0.0, -1.0])
async def test_without_a_window_every_change_is_queued_at_once(coalesce: float) -> None:
    reconciler, client = await _reconciler(coalesce=coalesce)
    try:
        queue = reconciler.controller.queue
        for _ in range(3):
            reconciler.nudge()
            assert len(queue) == 1
            assert await queue.get() == "node-a"
            queue.done("node-a")
    finally:
        reconciler.controller.queue.shut_down()
        await client.close()
