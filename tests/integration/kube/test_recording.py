"""The Event recorder against a real apiserver: repeats are aggregated into one Event."""

from __future__ import annotations

import pytest

from dynvol_kube import NORMAL, WARNING, Client, EventRecorder, Resource
from dynvol_kube.resources import EVENTS

pytestmark = pytest.mark.integration

CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")


async def test_repeats_bump_the_count_of_one_event(client: Client, namespace: str) -> None:
    obj = await client.create(
        CONFIGMAPS, {"metadata": {"name": "subject", "namespace": namespace}, "data": {}}
    )
    recorder = EventRecorder(client, "dynvol-test", host="h1")
    await recorder.start()
    try:
        for _ in range(3):
            recorder.record(obj, WARNING, "MountFailed", "the bucket does not exist")
        recorder.record(obj, NORMAL, "Mounted", "mounted at /data")
        await recorder.flush()
    finally:
        await recorder.close()
    events = (await client.list(EVENTS, namespace=namespace))["items"]
    by_reason = {e["reason"]: e for e in events}
    assert sorted(e["reason"] for e in events) == ["MountFailed", "Mounted"]
    failed = by_reason["MountFailed"]
    assert failed["count"] == 3
    assert failed["type"] == WARNING
    assert failed["involvedObject"]["uid"] == obj["metadata"]["uid"]
    assert failed["source"] == {"component": "dynvol-test", "host": "h1"}
    assert by_reason["Mounted"]["count"] == 1
    assert recorder.dropped == 0


async def test_a_bad_reason_is_refused_before_anything_is_written(client: Client) -> None:
    recorder = EventRecorder(client, "dynvol-test")
    obj = {"metadata": {"name": "x", "namespace": "default", "uid": "u"}}
    with pytest.raises(ValueError, match="CamelCase"):
        recorder.record(obj, WARNING, "not camel", "m")
    with pytest.raises(ValueError, match="Normal or Warning"):
        recorder.record(obj, "Error", "Reason", "m")
