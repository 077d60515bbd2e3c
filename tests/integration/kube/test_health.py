"""The status server against a real apiserver: probes that fail when progress stops.

A controller whose reconcile blocks makes ``/healthz`` fail, and pass again once it
returns; an informer that cannot list keeps ``/readyz`` failing while ``/healthz`` passes;
``/metrics`` counts the real requests, reconciles and queue adds as they happen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from dynvol_kube import (
    DONE,
    Client,
    Controller,
    Informer,
    LeaderElector,
    Metrics,
    Outcome,
    Resource,
    StatusServer,
)
from dynvol_kube.resources import LEASES

pytestmark = pytest.mark.integration

CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")
#: A resource the apiserver does not serve: its informer never syncs.
MISSING = Resource("kube-tests.dynvol.example", "v1", "nothings", "Nothing")


@pytest.fixture
async def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def client(kube_client: Any, metrics: Metrics) -> Client:
    return Client.wrap(kube_client, metrics=metrics)


@pytest.fixture
async def server(metrics: Metrics) -> AsyncIterator[StatusServer]:
    async with StatusServer(metrics.registry, metrics.health, port=0) as status:
        yield status


async def _get(server: StatusServer, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.url + path, timeout=aiohttp.ClientTimeout(total=10)) as response,
    ):
        return response.status, await response.text()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text exposition, or None if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


async def _until(check: Callable[[], Any], what: str, within: float = 20.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_a_blocked_reconcile_fails_liveness_until_it_returns(
    client: Client, metrics: Metrics, server: StatusServer, namespace: str
) -> None:
    release = asyncio.Event()
    reconciled: list[str] = []

    async def reconcile(key: str) -> Outcome:
        if key.endswith("/stuck"):
            await release.wait()
        reconciled.append(key)
        return DONE

    controller = Controller("health-test", reconcile, workers=2, metrics=metrics,
                            stall_after=0.5)  # fmt: skip
    informer = Informer(client, CONFIGMAPS, namespace=namespace, gates_readiness=True)
    informer.add_handler(lambda event: controller.enqueue(_key(event.obj)))
    await informer.start()
    await controller.start()
    try:
        await informer.wait_synced(within=20)
        status, body = await _get(server, "/healthz")
        assert status == 200, body
        assert "[+]controller health-test ok" in body
        status, body = await _get(server, "/readyz")
        assert status == 200, body
        assert f"[+]informer configmaps ns={namespace} ok" in body

        await client.create(CONFIGMAPS, {"metadata": {"name": "fine", "namespace": namespace}})
        await _until(lambda: _async(f"{namespace}/fine" in reconciled), "the first reconcile")
        await client.create(CONFIGMAPS, {"metadata": {"name": "stuck", "namespace": namespace}})

        async def unhealthy() -> str | None:
            status, body = await _get(server, "/healthz")
            return body if status == 503 else None

        body = await _until(unhealthy, "/healthz to fail while the reconcile is blocked")
        assert "[-]controller health-test: a unit of work has been under way" in body
        # Readiness includes liveness: a stuck process gets no work either.
        assert (await _get(server, "/readyz"))[0] == 503

        release.set()

        async def healthy() -> bool:
            return (await _get(server, "/healthz"))[0] == 200

        await _until(healthy, "/healthz to pass once the reconcile returned")
        assert f"{namespace}/stuck" in reconciled

        _, text = await _get(server, "/metrics")
        assert sample(text, "dynvol_reconciles_total", controller="health-test",
                      result="Done") == 2  # fmt: skip
        assert sample(text, "dynvol_reconcile_duration_seconds_count",
                      controller="health-test") == 2  # fmt: skip
        # The blocked reconcile took at least the stall time.
        assert (sample(text, "dynvol_reconcile_duration_seconds_sum",
                       controller="health-test") or 0) > 0.5  # fmt: skip
        assert sample(text, "dynvol_workqueue_adds_total", controller="health-test") == 2
        assert sample(text, "dynvol_workqueue_depth", controller="health-test") == 0
        assert sample(text, "dynvol_apiserver_requests_total", verb="create",
                      resource="configmaps", code="201") == 2  # fmt: skip
        assert sample(text, "dynvol_apiserver_requests_total", verb="list",
                      resource="configmaps", code="200") == 1  # fmt: skip
        assert sample(text, "dynvol_informer_synced", resource="configmaps") == 1
    finally:
        release.set()
        await controller.close()
        await informer.close()
    # Closed parts take their checks with them.
    status, body = await _get(server, "/healthz")
    assert status == 200, body
    assert "health-test" not in body


async def test_an_informer_that_cannot_list_fails_readiness_not_liveness(
    client: Client, metrics: Metrics, server: StatusServer
) -> None:
    informer = Informer(client, MISSING, gates_readiness=True)
    await informer.start()
    try:

        async def refused() -> bool:
            _, text = await _get(server, "/metrics")
            return bool(sample(text, "dynvol_apiserver_requests_total", verb="list",
                               resource="nothings", code="404"))  # fmt: skip

        await _until(refused, "the apiserver to refuse the list")
        status, body = await _get(server, "/readyz")
        assert status == 503, body
        assert "[-]informer nothings: informer nothings has not listed yet" in body
        status, body = await _get(server, "/healthz")
        assert status == 200, body
    finally:
        await informer.close()


async def test_the_leader_gauge_follows_the_lease(
    client: Client, metrics: Metrics, server: StatusServer, namespace: str
) -> None:
    elector = LeaderElector(client, name="health-test", namespace=namespace, identity="me",
                            lease_duration=3, renew_deadline=2, retry_period=0.5)  # fmt: skip
    await elector.start()
    try:
        await asyncio.wait_for(elector.leading.wait(), 20)
        _, text = await _get(server, "/metrics")
        assert sample(text, "dynvol_leader", lease="health-test") == 1
        status, body = await _get(server, "/readyz")
        assert status == 200, body
        assert "[+]leader election health-test ok" in body
    finally:
        await elector.close()
    _, text = await _get(server, "/metrics")
    assert sample(text, "dynvol_leader", lease="health-test") == 0
    lease = await client.get(LEASES, "health-test", namespace=namespace)
    assert not lease["spec"].get("holderIdentity")


def _key(obj: dict[str, Any]) -> str:
    return f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"


async def _async(value: bool) -> bool:
    return value
