"""Which watch events wake a DynamicVolumeMount's key in the DMP agent, and which do not.

The agent filters its informer's events with ``ChangePredicate(intent)``; these tests feed
it the events an informer emits (``Event(type, obj, old)``).
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from dynvol_dmp.agent import intent
from dynvol_kube import ChangePredicate, Event, Store, WorkQueue

KEY = "ns/dvm-1"


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


def wakes() -> ChangePredicate:
    return ChangePredicate(intent)


def test_the_first_sight_of_an_object_wakes_it() -> None:
    assert wakes()(Event("ADDED", dvm(1)))


def test_status_only_changes_do_not_wake_the_key() -> None:
    check = wakes()
    check(Event("ADDED", dvm(1)))
    assert not check(Event("MODIFIED", dvm(2, status__phase="Failed"), dvm(1)))


def test_finalizer_and_bookkeeping_changes_do_not_wake_the_key() -> None:
    check = wakes()
    check(Event("ADDED", dvm(1)))
    assert not check(Event("MODIFIED", dvm(2, metadata__finalizers=["x/unmount"])))
    assert not check(Event("MODIFIED", dvm(3, metadata__managedFields=[{"manager": "m"}])))


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
    check = wakes()
    check(Event("ADDED", dvm(1)))
    assert check(Event("MODIFIED", changed, dvm(1)))


def test_deletion_always_wakes_the_key_and_is_forgotten() -> None:
    check = wakes()
    check(Event("ADDED", dvm(1)))
    assert check(Event("DELETED", dvm(2)))
    # Made again with the same spec: a new object, so it wakes the key again.
    assert check(Event("ADDED", dvm(3)))


def test_a_spec_change_carried_by_a_write_response_still_wakes_the_key() -> None:
    # The agent patches status; the response already carries a spec change someone else
    # made in between, and goes into the store. The watch event for that change arrives
    # afterwards and must wake the key, although the store already holds the new spec.
    check = wakes()
    store = Store()
    first = dvm(1)
    store.put(first)
    check(Event("ADDED", first))
    changed = dvm(3, generation=2, spec__readOnly=True, status__phase="Mounted")
    assert store.put_if_newer(changed)
    assert not store.put_if_newer(dvm(2))  # an older write response is not taken
    cached = store.get(KEY)
    assert cached is not None
    assert cached["status"]["phase"] == "Mounted"
    assert check(Event("MODIFIED", dvm(2, generation=2, spec__readOnly=True), changed))
    assert not check(Event("MODIFIED", copy.deepcopy(changed), dvm(2)))


def test_a_write_response_for_an_unknown_object_is_not_cached() -> None:
    store = Store()
    assert not store.put_if_newer(dvm(1))
    assert store.get(KEY) is None


async def test_a_pending_backoff_survives_status_events() -> None:
    # The whole point: the agent's own status write must not cut its retry backoff short.
    check = wakes()
    queue = WorkQueue("t")
    woken: list[str] = []

    def on_event(event: Event) -> None:
        if check(event):
            woken.append(KEY)
            queue.add(KEY)

    on_event(Event("ADDED", dvm(1)))
    assert await queue.get() == KEY
    queue.done(KEY)
    queue.add_after(KEY, 0.3)  # the retry after a failed mount
    on_event(Event("MODIFIED", dvm(2, status__phase="Failed"), dvm(1)))
    assert len(queue) == 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.wait_for(queue.get(), 5) == KEY
    assert loop.time() - started >= 0.25
    queue.done(KEY)
    assert woken == [KEY]
    queue.shut_down()
