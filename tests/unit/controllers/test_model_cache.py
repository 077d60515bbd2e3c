"""ModelCache: memoised parsing that logs, counts and lists what the parser refuses."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from dynvol_controllers.objects import ModelCache, injected_class, is_terminated, pod_info
from dynvol_core import constants as c
from dynvol_core.models import PodInfo


def _pod(name: str, rv: str = "1", *, policy: str = c.POLICY_INDEPENDENT) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns", "uid": f"u-{name}", "resourceVersion": rv},
        "spec": {
            "nodeName": "n1",
            "volumes": [
                {
                    "name": c.VOLUME_NAME,
                    "csi": {
                        "driver": c.DRIVER_NAME,
                        "volumeAttributes": {
                            c.VOLUME_ATTR_CLASS: "s3-sample",
                            c.VOLUME_ATTR_POLICY: policy,
                        },
                    },
                }
            ],
        },
        "status": {"phase": "Running"},
    }


def test_invalid_objects_are_logged_counted_and_listed(caplog: pytest.LogCaptureFixture) -> None:
    cache = ModelCache(PodInfo.from_object)
    assert cache.get_or_none(_pod("good")) is not None
    with caplog.at_level(logging.WARNING, logger="dynvol_controllers.objects"):
        assert cache.get_or_none(_pod("bad", policy="everywhere")) is None
        assert cache.get_or_none(_pod("bad", policy="everywhere")) is None  # memoised
    assert (cache.invalid, cache.failures, cache.parse_errors) == (1, 0, 1)
    assert list(cache.errors()) == ["ns/bad"]
    assert "mountPodDispatchPolicy" in cache.errors()["ns/bad"]
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "ns/bad" in caplog.records[0].getMessage()
    # A fixed revision clears the listing, not the count.
    assert cache.get_or_none(_pod("bad", rv="2")) is not None
    assert cache.errors() == {}
    assert cache.parse_errors == 1


def test_a_parser_bug_is_logged_with_its_traceback_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(obj: Any) -> Any:
        raise KeyError("oops")

    cache = ModelCache(broken)
    with caplog.at_level(logging.ERROR, logger="dynvol_controllers.objects"):
        assert cache.get_or_none(_pod("p")) is None
    assert (cache.invalid, cache.failures) == (0, 1)
    (record,) = caplog.records
    assert record.exc_info is not None
    assert "KeyError" in cache.errors()["ns/p"]
    with pytest.raises(KeyError):
        cache.get(_pod("p"))


def test_the_pod_helpers_read_through_the_core() -> None:
    good = _pod("good")
    assert injected_class(good) == "s3-sample"
    assert pod_info(good) == PodInfo.from_object(good)
    bad = _pod("bad", policy="everywhere")
    assert injected_class(bad) is None  # the core refuses it, so no lenient second reading
    finished = {**good, "status": {"phase": "Succeeded"}}
    assert is_terminated(finished)
    assert not is_terminated(good)
