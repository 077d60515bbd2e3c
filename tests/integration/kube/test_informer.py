"""The informer against a real apiserver: relist on 410 Gone, resume after a dropped watch.

Each test records what the handlers saw and checks it against exactly the changes made:
nothing lost, nothing repeated, and nothing reported for an object that did not change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from dynvol_kube import APIGone, APINotFound, Client, Event, Informer, Resource

from .conftest import WIDGETS

pytestmark = pytest.mark.integration

CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")

Seen = tuple[str, str, str]  # (event type, name, data value)


def _seen(event: Event) -> Seen:
    obj = event.obj
    return (event.type, obj["metadata"]["name"], (obj.get("data") or {}).get("v", ""))


async def _until(check: Callable[[], bool], what: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class Objects:
    """Create, change and delete objects of one resource in one namespace."""

    def __init__(self, client: Client, namespace: str, resource: Resource = WIDGETS) -> None:
        self.client, self.namespace, self.resource = client, namespace, resource

    async def put(self, name: str, value: str) -> None:
        body = {
            "apiVersion": self.resource.api_version,
            "kind": self.resource.kind,
            "metadata": {"name": name, "namespace": self.namespace},
            "data": {"v": value},
        }
        try:
            await self.client.patch(
                self.resource, name, {"data": {"v": value}}, namespace=self.namespace
            )
        except APINotFound:
            await self.client.create(self.resource, body)

    async def delete(self, name: str) -> None:
        await self.client.delete(self.resource, name, namespace=self.namespace)


@pytest.fixture
async def informer(client: Client, namespace: str, widgets: Resource) -> AsyncIterator[Informer]:
    made = Informer(client, widgets, namespace=namespace)
    try:
        yield made
    finally:
        await made.close()


async def test_an_expired_resource_version_is_a_parsed_410(
    client: Client, namespace: str, widgets: Resource
) -> None:
    # The new resource's watch cache holds nothing as old as resourceVersion 1.
    with pytest.raises(APIGone) as caught:
        async for _ in client.watch(
            widgets, resource_version="1", namespace=namespace, timeout_seconds=5
        ):
            pass
    assert caught.value.status == 410
    assert caught.value.reason == "Expired"
    assert caught.value.details.get("code") == 410


async def test_errors_carry_the_status_payload_and_the_cause(
    client: Client, namespace: str
) -> None:
    with pytest.raises(APINotFound) as caught:
        await client.get(CONFIGMAPS, "missing", namespace=namespace)
    error = caught.value
    assert error.status == 404
    assert error.reason == "NotFound"
    assert error.details["kind"] == "Status"
    assert error.details["details"]["name"] == "missing"
    assert '"missing" not found' in str(error)
    assert error.__cause__ is not None  # the client library's own exception


async def test_a_410_relists_without_losing_or_repeating_events(
    client: Client, namespace: str, informer: Informer
) -> None:
    maps = Objects(client, namespace)
    for name in ("a", "b", "c"):
        await maps.put(name, "1")
    seen: list[Seen] = []
    informer.add_handler(lambda event: seen.append(_seen(event)))
    await informer.start()
    await informer.wait_synced(within=30)
    # The list is served from the watch cache (resourceVersion=0), which may be a moment
    # behind the writes just made: the last of them may come as the watch's first event.
    await _until(lambda: len(seen) >= 3, "the three objects")
    assert sorted(seen) == [("ADDED", "a", "1"), ("ADDED", "b", "1"), ("ADDED", "c", "1")]
    seen.clear()

    # Stopped long enough for its resourceVersion to expire, while things changed.
    await informer.close()
    await maps.put("a", "2")
    await maps.delete("b")
    await maps.put("d", "1")
    informer._rv = "1"
    await informer.start()
    expected = [("ADDED", "d", "1"), ("DELETED", "b", "1"), ("MODIFIED", "a", "2")]
    await _until(lambda: len(seen) >= len(expected), "the relist's events")
    assert informer.relists == 1
    # The relist is reported as exactly the difference; unchanged "c" is not repeated.
    assert sorted(seen) == sorted(expected)
    assert {obj["metadata"]["name"] for obj in informer.store} == {"a", "c", "d"}

    # And the watch after the relist carries on from the list's resourceVersion.
    seen.clear()
    await maps.put("c", "2")
    await _until(lambda: bool(seen), "a change after the relist")
    await asyncio.sleep(0.5)
    assert seen == [("MODIFIED", "c", "2")]
    assert informer.relists == 1


async def test_watches_the_server_ends_are_resumed(client: Client, namespace: str) -> None:
    maps = Objects(client, namespace, CONFIGMAPS)
    informer = Informer(client, CONFIGMAPS, namespace=namespace, watch_timeout=1)
    seen: list[Seen] = []
    informer.add_handler(lambda event: seen.append(_seen(event)))
    try:
        await informer.start()
        await informer.wait_synced(within=30)
        requests = client.requests_sent
        expected = []
        # Changes spread over several of the server's 1-2 s watch timeouts.
        for i in range(8):
            await maps.put("x", str(i))
            expected.append(("ADDED" if i == 0 else "MODIFIED", "x", str(i)))
            await asyncio.sleep(0.6)
        await _until(lambda: len(seen) >= len(expected), "every change")
        await asyncio.sleep(0.5)
        assert seen == expected
        assert informer.relists == 0
        # The writes were 8 requests; the rest are new watches after the server ended some.
        assert client.requests_sent - requests - 8 >= 2
    finally:
        await informer.close()


async def test_a_dropped_watch_resumes_where_it_stopped(
    client: Client, namespace: str, informer: Informer
) -> None:
    maps = Objects(client, namespace)
    await maps.put("a", "1")
    seen: list[Seen] = []
    informer.add_handler(lambda event: seen.append(_seen(event)))
    await informer.start()
    await informer.wait_synced(within=30)
    # The list may come from a watch cache a moment behind the write just made, and then
    # "a" arrives as the watch's first event: wait for it before counting what follows.
    await _until(lambda: bool(seen), "the first object")
    assert seen == [("ADDED", "a", "1")]
    seen.clear()
    # Closing the informer drops its watch connection; changes made meanwhile must arrive
    # as watch events from where it stopped, not as a relist.
    await informer.close()
    await maps.put("a", "2")
    await maps.put("b", "1")
    await maps.delete("a")
    await informer.start()
    expected = [("MODIFIED", "a", "2"), ("ADDED", "b", "1"), ("DELETED", "a", "2")]
    await _until(lambda: len(seen) >= len(expected), "the missed changes")
    await asyncio.sleep(0.5)
    assert seen == expected
    assert informer.relists == 0


async def test_a_list_only_informer_reports_the_changes_between_two_lists(
    client: Client, namespace: str, widgets: Resource
) -> None:
    maps = Objects(client, namespace, widgets)
    for name in ("a", "b"):
        await maps.put(name, "1")
    lister = Informer(client, widgets, namespace=namespace, watch=False, relist=3600)
    seen: list[Seen] = []
    lister.add_handler(lambda event: seen.append(_seen(event)))
    try:
        await lister.start()
        await lister.wait_synced(within=30)
        # The list comes from the watch cache, which may be a moment behind the writes.
        while len(lister.store) < 2:
            lister.refresh()
            await asyncio.sleep(0.1)
        assert sorted(seen) == [("ADDED", "a", "1"), ("ADDED", "b", "1")]
        seen.clear()
        lists = lister.lists

        # Nothing watches: changes stay unseen until the next list, which reports them.
        await maps.put("a", "2")
        await maps.delete("b")
        await maps.put("c", "1")
        await asyncio.sleep(0.5)
        assert seen == []
        expected = [("ADDED", "c", "1"), ("DELETED", "b", "1"), ("MODIFIED", "a", "2")]
        deadline = time.monotonic() + 20
        while sorted(seen) != sorted(expected):
            assert time.monotonic() < deadline, f"the lists reported {seen}"
            lister.refresh()
            await asyncio.sleep(0.2)
        assert lister.lists > lists
        assert lister.relists == 0
        assert not lister.watch_ends
    finally:
        await lister.close()


async def test_a_list_does_not_undo_what_the_owner_s_own_writes_returned(
    client: Client, namespace: str, widgets: Resource
) -> None:
    maps = Objects(client, namespace, widgets)
    await maps.put("a", "1")
    lister = Informer(client, widgets, namespace=namespace, watch=False, relist=3600)
    try:
        await lister.start()
        await lister.wait_synced(within=30)
        while f"{namespace}/a" not in lister.store:
            lister.refresh()
            await asyncio.sleep(0.1)
        listed = lister.store.get(f"{namespace}/a")
        assert listed is not None
        rv = int(listed["metadata"]["resourceVersion"])
        # A write's answer newer than any list yet (a resourceVersion far ahead): one
        # changed object and one created after the list.
        ahead = {**listed, "metadata": {**listed["metadata"], "resourceVersion": str(rv + 10**6)}}
        ahead["data"] = {"v": "mine"}
        created = {
            "apiVersion": widgets.api_version, "kind": widgets.kind, "data": {"v": "new"},
            "metadata": {"name": "z", "namespace": namespace, "uid": "u-z",
                         "resourceVersion": str(rv + 10**6)},
        }  # fmt: skip
        lister.remember(ahead)
        lister.remember(created)
        lists = lister.lists
        lister.refresh()
        await _until(lambda: lister.lists > lists, "another list")
        kept = lister.store.get(f"{namespace}/a")
        assert kept is not None
        assert kept["data"] == {"v": "mine"}
        assert f"{namespace}/z" in lister.store
        # An older answer does not replace a newer cached version either.
        lister.remember(listed)
        kept = lister.store.get(f"{namespace}/a")
        assert kept is not None
        assert kept["data"] == {"v": "mine"}
        lister.forget(f"{namespace}/z")
        assert f"{namespace}/z" not in lister.store
    finally:
        await lister.close()
