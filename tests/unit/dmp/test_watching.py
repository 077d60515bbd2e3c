"""Which watch events wake a DynamicVolumeMount's key in the DMP agent, and which do not."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from dynvol_dmp.queueing import WorkQueue
from dynvol_dmp.watching import MountCache

KEY = ("ns", "dvm-1")


def dvm(rv: int, *, generation: int = 1, **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {
            "namespace": "ns",
            "name": "dvm-1",
            "resourceVersion": str(rv),
            "generation": generation,
            "labels": {"dynamicvolume.csi.cloudnative101.net/dmp": "dmp-1"},
        },
        "spec": {"mountpoint": "/data", "config": {"bucket": "b"}},
    }
    for path, value in extra.items():
        section, _, field = path.partition("__")
        obj.setdefault(section, {})[field] = value
    return obj


def test_the_first_sight_of_an_object_wakes_it() -> None:
    cache = MountCache()
    assert cache.apply("ADDED", dvm(1)) == KEY
    assert cache.get(KEY) is not None


def test_status_only_changes_do_not_wake_the_key() -> None:
    cache = MountCache()
    cache.apply("ADDED", dvm(1))
    failed = dvm(2, status__phase="Failed")
    assert cache.apply("MODIFIED", failed) is None
    # ...but the cache still holds the newest version.
    cached = cache.get(KEY)
    assert cached is not None
    assert cached["status"]["phase"] == "Failed"


def test_finalizer_and_bookkeeping_changes_do_not_wake_the_key() -> None:
    cache = MountCache()
    cache.apply("ADDED", dvm(1))
    assert cache.apply("MODIFIED", dvm(2, metadata__finalizers=["x/unmount"])) is None
    assert cache.apply("MODIFIED", dvm(3, metadata__managedFields=[{"manager": "m"}])) is None


@pytest.mark.parametrize(
    "changed",
    [
        dvm(2, generation=2, spec__readOnly=True),
        dvm(2, metadata__deletionTimestamp="2026-01-01T00:00:00Z"),
        dvm(2, metadata__labels={"dynamicvolume.csi.cloudnative101.net/dmp": "dmp-2"}),
    ],
    ids=["spec", "deletion", "labels"],
)
def test_changes_the_agent_acts_on_wake_the_key(changed: dict[str, Any]) -> None:
    cache = MountCache()
    cache.apply("ADDED", dvm(1))
    assert cache.apply("MODIFIED", changed) == KEY


def test_deletion_always_wakes_the_key_and_empties_the_cache() -> None:
    cache = MountCache()
    cache.apply("ADDED", dvm(1))
    assert cache.apply("DELETED", dvm(2)) == KEY
    assert cache.get(KEY) is None


def test_a_spec_change_carried_by_a_write_response_still_wakes_the_key() -> None:
    # The agent patches status; the response already carries a spec change someone else
    # made in between. The watch event for that change arrives afterwards and must wake the
    # key, although the cache already holds an object with the new spec.
    cache = MountCache()
    cache.apply("ADDED", dvm(1))
    changed = dvm(3, generation=2, spec__readOnly=True, status__phase="Mounted")
    cache.update(changed)
    assert cache.apply("MODIFIED", dvm(2, generation=2, spec__readOnly=True)) == KEY
    assert cache.apply("MODIFIED", copy.deepcopy(changed)) is None


def test_a_relist_returns_only_new_vanished_and_changed_keys() -> None:
    cache = MountCache()
    other = dvm(1)
    other["metadata"]["name"] = "dvm-2"
    gone = dvm(1)
    gone["metadata"]["name"] = "dvm-3"
    assert cache.replace([dvm(1), other, gone]) == {KEY, ("ns", "dvm-2"), ("ns", "dvm-3")}
    other_changed = copy.deepcopy(other)
    other_changed["spec"]["mountpoint"] = "/elsewhere"
    touched = cache.replace([dvm(5, status__phase="Failed"), other_changed])
    assert touched == {("ns", "dvm-2"), ("ns", "dvm-3")}
    assert cache.synced.is_set()


async def test_a_pending_backoff_survives_status_events() -> None:
    # The whole point: the agent's own status write must not cut its retry backoff short.
    cache: MountCache = MountCache()
    queue: WorkQueue[tuple[str, str]] = WorkQueue()
    woken: list[tuple[str, str]] = []

    def on_change(key: tuple[str, str]) -> None:
        woken.append(key)
        queue.add(key)

    key = cache.apply("ADDED", dvm(1))
    assert key is not None
    on_change(key)
    assert await queue.get() == KEY
    queue.done(KEY)
    queue.add_after(KEY, 0.3)  # the retry after a failed mount
    key = cache.apply("MODIFIED", dvm(2, status__phase="Failed"))
    assert key is None
    assert len(queue) == 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.wait_for(queue.get(), 5) == KEY
    assert loop.time() - started >= 0.25
    queue.done(KEY)
    assert woken == [KEY]
    queue.close()
