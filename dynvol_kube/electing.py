"""Leader election on a coordination.k8s.io/v1 Lease, as client-go's leaderelection does.

Used by :mod:`.managing`: only the holder of the Lease runs the leader-gated controllers.
A candidate takes the Lease when it is free, released, or expired (expiry judged by when
*this* process last saw the record change, so clocks need not agree); the leader renews it
every ``retry_period`` and gives up leadership if it could not renew for ``renew_deadline``.
On shutdown the leader releases the Lease (empty holder), so a successor need not wait for
it to expire.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from .client import Client
from .errors import APIConflict, APIError, APINotFound
from .lifecycle import stop_task
from .resources import LEASES

__all__ = ["LeaderElector"]

log = logging.getLogger(__name__)


def _micro_time() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Campaign for, hold and release one Lease.

    ``leading`` is set while this process holds the Lease; ``lost`` is set (for good) when
    it held it and then failed to renew in time, after which the process should stop.
    """

    def __init__(
        self,
        client: Client,
        *,
        name: str,
        namespace: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
    ) -> None:
        if not lease_duration > renew_deadline > retry_period > 0:
            raise ValueError("need lease_duration > renew_deadline > retry_period > 0")
        self.client = client
        self.name = name
        self.namespace = namespace
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.leading = asyncio.Event()
        self.lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._observed: dict[str, Any] | None = None
        self._observed_at = 0.0
        self._observed_key: tuple[Any, ...] = ()
        self._unready: Callable[[], None] | None = None

    async def start(self) -> None:
        """Start campaigning in the background."""
        if self._task is None:
            self._report(False)
            if self.client.metrics is not None:
                self._unready = self.client.metrics.health.add_readiness(
                    f"leader election {self.name}", self._standing
                )
            self._task = asyncio.create_task(self._run(), name=f"leader election {self.name}")

    async def close(self) -> None:
        """Stop; release the Lease if held."""
        await stop_task(self._task)
        self._task = None
        if self.leading.is_set():
            await self._release()
            self.leading.clear()
        self._report(False)
        if self._unready is not None:
            self._unready()
            self._unready = None

    def _report(self, leading: bool) -> None:
        if self.client.metrics is not None:
            self.client.metrics.leader.labels(self.name).set(1 if leading else 0)

    async def _standing(self) -> str | None:
        """Readiness: the leader, or a standby still campaigning (not one that lost)."""
        if self.lost.is_set():
            return f"lost the Lease {self.namespace}/{self.name}"
        return None

    async def _run(self) -> None:
        while True:
            if await self._try_acquire_or_renew():
                break
            await asyncio.sleep(self.retry_period * random.uniform(1.0, 1.2))
        log.info("leader election %s: %s is the leader", self.name, self.identity)
        self.leading.set()
        self._report(True)
        last_renew = time.monotonic()
        while True:
            await asyncio.sleep(self.retry_period)
            if await self._try_acquire_or_renew():
                last_renew = time.monotonic()
            elif time.monotonic() - last_renew > self.renew_deadline:
                log.error("leader election %s: lost the lease", self.name)
                self.leading.clear()
                self._report(False)
                self.lost.set()
                return

    def _record_key(self, lease: dict[str, Any]) -> tuple[Any, ...]:
        spec = lease.get("spec") or {}
        return (spec.get("holderIdentity"), spec.get("renewTime"), spec.get("leaseTransitions"))

    async def _try_acquire_or_renew(self) -> bool:
        try:
            return await asyncio.wait_for(self._attempt(), timeout=self.renew_deadline)
        except (APIError, TimeoutError) as exc:
            log.info("leader election %s: %s", self.name, exc)
            return False

    async def _attempt(self) -> bool:
        now = _micro_time()
        try:
            lease = await self.client.get(LEASES, self.name, namespace=self.namespace)
        except APINotFound:
            body = {
                "apiVersion": LEASES.api_version,
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(now, acquire_time=now, transitions=0),
            }
            try:
                lease = await self.client.create(LEASES, body, namespace=self.namespace)
            except APIConflict:
                return False
            self._observe(lease)
            return True
        key = self._record_key(lease)
        if key != self._observed_key:
            self._observe(lease)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        expired = time.monotonic() > self._observed_at + duration
        if holder and holder != self.identity and not expired:
            return False
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder == self.identity:
            acquire_time = spec.get("acquireTime") or now
        else:
            acquire_time = now
            transitions += 1
        lease["spec"] = self._spec(now, acquire_time=acquire_time, transitions=transitions)
        try:
            lease = await self.client.replace(LEASES, lease)
        except APIConflict:
            return False
        self._observe(lease)
        return True

    def _spec(self, now: str, *, acquire_time: str, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.lease_duration)),
            "acquireTime": acquire_time,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    def _observe(self, lease: dict[str, Any]) -> None:
        self._observed = lease
        self._observed_key = self._record_key(lease)
        self._observed_at = time.monotonic()

    async def _release(self) -> None:
        lease = self._observed
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            return
        spec = dict(lease["spec"])
        spec.update({"holderIdentity": None, "leaseDurationSeconds": 1, "renewTime": _micro_time()})
        lease = {**lease, "spec": spec}
        try:
            await self.client.replace(LEASES, lease)
            log.info("leader election %s: released the lease", self.name)
        except APIError as exc:
            log.warning("leader election %s: could not release the lease: %s", self.name, exc)
