"""The manager: owns the client, the informers and the components, and their order.

Start order (controller-runtime's): informer caches (and wait until synced), then the
components every replica runs (the webhook server, the Event recorder), then -- once the
leader elector says so -- the leader-gated controllers. Close order is the reverse. Losing
the Lease stops the manager (:meth:`Manager.wait_closed` returns and ``lost_leadership`` is
set); the process should then exit so that it restarts as a clean candidate.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from .client import Client
from .electing import LeaderElector
from .lifecycle import stop_task
from .watching import Informer

__all__ = ["Component", "Manager"]

log = logging.getLogger(__name__)


class Component(Protocol):
    """Anything with an explicit asynchronous lifecycle."""

    async def start(self) -> None: ...  # pragma: no cover - protocol

    async def close(self) -> None: ...  # pragma: no cover - protocol


class Manager:
    """Start and stop informers and components in order."""

    def __init__(
        self,
        client: Client,
        *,
        elector: LeaderElector | None = None,
        sync_timeout: float = 120.0,
    ) -> None:
        self.client = client
        self.elector = elector
        self.sync_timeout = sync_timeout
        self.lost_leadership = False
        self._informers: list[Informer] = []
        self._components: list[Component] = []
        self._gated: list[Component] = []
        self._started: list[Component] = []
        self._closed = asyncio.Event()
        self._gate_task: asyncio.Task[None] | None = None
        self._closing = False

    def add_informer(self, informer: Informer) -> Informer:
        """Register an informer (started first, stopped last); the process is not ready
        until it synced."""
        informer.gates_readiness = True
        self._informers.append(informer)
        return informer

    def add(self, component: Component, *, leader_gated: bool = False) -> None:
        """Register a component; leader-gated ones run only while this process leads."""
        (self._gated if leader_gated else self._components).append(component)

    async def start(self) -> None:
        """Start everything; returns once the ungated components run.

        Leader-gated components start later, in the background, when the Lease is won
        (immediately when there is no elector).
        """
        try:
            for informer in self._informers:
                await informer.start()
            for informer in self._informers:
                await informer.wait_synced(within=self.sync_timeout)
            for component in self._components:
                await component.start()
                self._started.append(component)
            if self.elector is None:
                await self._start_gated()
            else:
                await self.elector.start()
                self._gate_task = asyncio.create_task(self._gate(), name="leader gate")
        except BaseException:
            await self.close()
            raise

    async def _gate(self) -> None:
        assert self.elector is not None
        await self.elector.leading.wait()
        await self._start_gated()
        await self.elector.lost.wait()
        self.lost_leadership = True
        log.error("leadership lost; stopping")
        # close() cancels this task; run it in its own task so it is not cancelled midway.
        asyncio.get_running_loop().create_task(self.close())

    async def _start_gated(self) -> None:
        for component in self._gated:
            await component.start()
            self._started.append(component)

    async def close(self) -> None:
        """Stop in reverse order: gated controllers, components, elector, informers."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            if self._gate_task is not None and self._gate_task is not asyncio.current_task():
                await stop_task(self._gate_task)
            for component in reversed(self._started):
                try:
                    await component.close()
                except Exception:
                    log.exception("closing %r failed", component)
            self._started.clear()
            if self.elector is not None:
                await self.elector.close()
            for informer in reversed(self._informers):
                await informer.close()
        finally:
            self._closed.set()

    async def wait_closed(self) -> None:
        """Wait until the manager has been closed (by :meth:`close` or lost leadership)."""
        await self._closed.wait()

    async def __aenter__(self) -> Manager:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
