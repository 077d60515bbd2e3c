"""The runtime's metric helpers and health checks, without a server or an apiserver."""

from __future__ import annotations

import asyncio
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynvol_kube import Controller, Health, Metrics, Progress, parse_address
from dynvol_kube.metrics import request_labels
from dynvol_kube.resources import CLASSES, LEASES, MOUNTS, NAMESPACES, PODS


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", PODS.path(namespace="ns", name="p"), ("get", "pods")),
        ("GET", PODS.path(namespace="ns"), ("list", "pods")),
        ("GET", PODS.path(), ("list", "pods")),
        ("WATCH", PODS.path(namespace="ns"), ("watch", "pods")),
        ("POST", PODS.path(namespace="ns"), ("create", "pods")),
        ("PUT", LEASES.path(namespace="ns", name="l"), ("update", "leases")),
        ("PATCH", MOUNTS.path(namespace="ns", name="m", subresource="status"),
         ("patch", "dynamicvolumemounts/status")),
        ("DELETE", CLASSES.path(name="c"), ("delete", "storageproviderclasses")),
        ("GET", NAMESPACES.path(name="n"), ("get", "namespaces")),
        ("GET", NAMESPACES.path(), ("list", "namespaces")),
        ("GET", "/version", ("list", "other")),
    ],
)  # fmt: skip
def test_request_labels(method: str, path: str, expected: tuple[str, str]) -> None:
    assert request_labels(method, path) == expected


_NAME = st.text(string.ascii_lowercase + string.digits + "-.", min_size=1, max_size=40)


@given(namespace=_NAME, name=_NAME, method=st.sampled_from(["GET", "PATCH", "DELETE", "PUT"]))
def test_labels_never_carry_names_or_namespaces(namespace: str, name: str, method: str) -> None:
    # Bounded labels: whatever object a request is about, its labels are the resource's.
    for resource in (PODS, MOUNTS, CLASSES):
        path = resource.path(namespace=namespace, name=name, subresource="status")
        assert request_labels(method, path)[1] == f"{resource.plural}/status"
        assert request_labels(method, resource.path(namespace=namespace, name=name))[1] == (
            resource.plural
        )


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9810", ("127.0.0.1", 9810)), ("0.0.0.0:0", ("0.0.0.0", 0)),
     ("[::1]:9090", ("::1", 9090)), ("localhost:1", ("localhost", 1))],
)  # fmt: skip
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["9810", ":9810", "host:", "host:port", "h:65536", "h:-1"])
def test_a_bad_address_names_the_flag(text: str) -> None:
    with pytest.raises(ValueError, match="--metrics-address"):
        parse_address(text)


async def test_progress_fails_only_for_work_under_way_too_long() -> None:
    progress = Progress("loop", stall_after=0.05)
    assert await progress.problem() is None  # idle is not stuck
    token = progress.began()
    assert await progress.problem() is None
    await asyncio.sleep(0.1)
    problem = await progress.problem()
    assert problem is not None
    assert "under way" in problem
    progress.ended(token)
    assert await progress.problem() is None


async def test_health_counts_raising_and_slow_checks_as_failing() -> None:
    health = Health(timeout=0.05)

    async def fine() -> str | None:
        return None

    async def raises() -> str | None:
        raise RuntimeError("boom")

    async def slow() -> str | None:
        await asyncio.sleep(1)
        return None

    async def unready() -> str | None:
        return "not yet"

    health.add_liveness("fine", fine)
    remove = health.add_liveness("raises", raises)
    health.add_liveness("slow", slow)
    health.add_readiness("unready", unready)
    live = dict(await health.liveness())
    assert live["fine"] is None
    assert live["raises"] == "the check failed: boom"
    assert live["slow"] == "no answer within 0.05s"
    assert "unready" not in live
    ready = dict(await health.readiness())
    assert ready["unready"] == "not yet"
    assert "raises" in ready  # readiness includes liveness
    remove()
    assert "raises" not in dict(await health.liveness())


async def test_a_controller_reports_its_queue_and_results() -> None:
    metrics = Metrics()
    gate = asyncio.Event()
    failed: list[str] = []

    async def reconcile(key: str) -> None:
        if key == "flaky" and not failed:
            failed.append(key)
            raise RuntimeError("nope")
        await gate.wait()

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"controller": "unit", **labels})

    controller = Controller("unit", reconcile, workers=1, metrics=metrics)
    await controller.start()
    try:
        for key in ("a", "b", "b", "flaky"):
            controller.enqueue(key)
        await asyncio.sleep(0.01)
        assert value("dynvol_workqueue_adds_total") == 3  # "b" only once
        assert value("dynvol_workqueue_depth") == 2  # "a" is being reconciled
        gate.set()
        for _ in range(500):
            if (value("dynvol_reconciles_total", result="Done") or 0) >= 3:
                break
            await asyncio.sleep(0.01)
        assert value("dynvol_reconciles_total", result="Retry") == 1
        assert value("dynvol_workqueue_retries_total") == 1
        assert value("dynvol_workqueue_adds_total") == 4  # the retry's add
        assert value("dynvol_reconcile_duration_seconds_count") == 4
        assert value("dynvol_workqueue_depth") == 0
        assert [name for name, _ in await metrics.health.liveness()] == ["controller unit"]
    finally:
        await controller.close()
    # Closed: its liveness check and its queue depth are gone.
    assert await metrics.health.liveness() == []
    assert value("dynvol_workqueue_depth") is None


def test_two_processes_worth_of_metrics_do_not_mix() -> None:
    first, second = Metrics(), Metrics()
    first.observe_request("GET", PODS.path(namespace="n", name="p"), 200, 0.01)
    labels = {"verb": "get", "resource": "pods", "code": "200"}
    assert first.registry.get_sample_value("dynvol_apiserver_requests_total", labels) == 1
    assert second.registry.get_sample_value("dynvol_apiserver_requests_total", labels) is None
    first.observe_request("GET", PODS.path(namespace="n", name="p"), None, 0.01)
    labels["code"] = "error"
    assert first.registry.get_sample_value("dynvol_apiserver_requests_total", labels) == 1
