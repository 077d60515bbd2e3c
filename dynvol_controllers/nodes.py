"""The node reconciler: one per node, inside ``dynvol node``, for the pods on that node.

A composition of small collaborators, one concern each, started and stopped by one
:class:`~dynvol_kube.Manager`:

- observe: :class:`~.observing.NodeView` (informers for the node's pods, its claim slice,
  the classes, the node's DynamicVolumeMounts (listed, not watched, and kept from the
  node's own writes) and Dynamic Mount Pods; which changes matter);
  :class:`~.observing.DeletionFollower` reads the mounts being deleted until they are gone;
- queue: every relevant change queues the single key of the node, so a burst of events
  collapses into one pass (the :class:`~dynvol_kube.Controller`);
- process: one pass reads the caches, drops claims whose provider cannot mount them
  (:class:`~.checking.ProviderCheck`), asks :func:`dynvol_core.dispatch.plan_node` what
  the node should have, and acts on the difference;
- act: :class:`~.syncing.DvmSync` (mounts, owned by their user pod) and
  :class:`~.syncing.DmpSync` (DMPs per dispatch policy), each with its own
  :class:`~.expectations.Expectations`; :class:`~.reaping.IdleReaper` times idle shared
  DMPs (deleted after ``shared_idle_grace`` seconds);
- report: :class:`~.reporting.RejectionReporter` (Events for claims that do not mount).

The settings are one value, :class:`~.settings.NodeReconcilerSettings`.

The node plugin reads and writes no Secret (docs/design.md §6.5): a DMP mounts its class's
credentials copy, which the leader-elected controller keeps in the system namespace
(:mod:`.credentials`). Credential rotation needs nothing from this side either: kubelet
refreshes the DMP's Secret volume and the DMP agent notices the changed files.

The reconciler deletes what it no longer needs itself instead of relying only on
ownerReference garbage collection, so it converges even where no garbage collector runs.
It needs each pod's slot on the host: ``slot_lookup(pod_uid)`` (in ``dynvol node`` backed by
the CSI node plugin's records) returns it, or None until the volume is published.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs

from dynvol_core.dispatch import NodePlan, plan_node
from dynvol_core.models import PodInfo
from dynvol_core.paths import PodSlot
from dynvol_kube import (
    APIConflict,
    APIError,
    Client,
    Controller,
    EventRecorder,
    Manager,
    Outcome,
    RequeueAfter,
    TemporaryError,
)
from dynvol_kube.resources import Resource

from .checking import ProviderCheck
from .observing import DeletionFollower, NodeView
from .reaping import IdleReaper
from .reporting import RejectionReporter
from .settings import NodeReconcilerSettings
from .syncing import DmpSync, DvmSync, OrphanHook

__all__ = ["NodeReconciler", "SlotLookup"]

log = logging.getLogger(__name__)

SlotLookup = Callable[[str], PodSlot | None]
_NODES = Resource("", "v1", "nodes", "Node", False)


@attrs.define(eq=False)
class NodeOwner:
    """The Node's UID, which DMPs name as their owner; a manager component (looked up at
    start, after the caches synced)."""

    client: Client
    node_name: str
    uid: str = ""

    async def start(self) -> None:
        try:
            node = await self.client.get(_NODES, self.node_name)
        except APIError:
            # Made-up nodes (tests) or no RBAC to read nodes: DMPs then have no owner.
            return
        self.uid = node.get("metadata", {}).get("uid", "")

    async def close(self) -> None:
        return None


@attrs.define(eq=False)
class NodeReconciler:
    """Keep one node's DynamicVolumeMounts and DMPs as planned.

    Lifecycle: :attr:`manager` (``await start()`` / ``await close()``, or ``async with``).
    :meth:`nudge` requests a pass (e.g. after a volume was published).

    :param registry: a dynvol_providers ProviderRegistry: claims whose provider is unknown
        or rejects the config are never mounted.
    :param on_orphaned: called for a mount being deleted whose DMP is gone (the shell
        unmounts lazily).
    :param recorder: the Event recorder to share; without one the reconciler runs its own.
    """

    client: Client
    node_name: str
    settings: NodeReconcilerSettings = attrs.field(factory=NodeReconcilerSettings)
    slot_lookup: SlotLookup | None = attrs.field(default=None, kw_only=True)
    registry: Any = attrs.field(default=None, kw_only=True)
    on_orphaned: OrphanHook | None = attrs.field(default=None, kw_only=True)
    recorder: EventRecorder | None = attrs.field(default=None, kw_only=True)

    view: NodeView = attrs.field(init=False)
    controller: Controller = attrs.field(init=False)
    manager: Manager = attrs.field(init=False)
    passes: int = attrs.field(default=0, init=False)
    last_plan: NodePlan | None = attrs.field(default=None, init=False)
    #: Passes in a row that failed because the apiserver was overloaded.
    _overloaded: int = attrs.field(default=0, init=False)
    #: The last pass found no claim slice for the node's opted-in pods (and did nothing).
    _waiting_for_slice: bool = attrs.field(default=False, init=False)
    _owner: NodeOwner = attrs.field(init=False)
    _check: ProviderCheck = attrs.field(init=False)
    _dvms: DvmSync = attrs.field(init=False)
    _dmps: DmpSync = attrs.field(init=False)
    _follower: DeletionFollower = attrs.field(init=False)
    _reaper: IdleReaper = attrs.field(init=False)
    _reporter: RejectionReporter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        settings = self.settings
        self.view = NodeView(
            self.client,
            self.node_name,
            settings.system_namespace,
            resync=settings.resync,
            mounts_relist=settings.mounts_relist,
        )
        self._owner = NodeOwner(self.client, self.node_name)
        self._check = ProviderCheck(self.registry, self.node_name)
        self._dvms = DvmSync(
            self.client,
            on_orphaned=self.on_orphaned,
            on_written=self.view.remember_dvm,
            on_gone=self.view.forget_dvm,
        )
        self._follower = DeletionFollower(self.client, self.view.mounts, self.nudge)
        self._dmps = DmpSync(client=self.client, node_name=self.node_name, template=settings.dmp)
        self._reaper = IdleReaper(settings.shared_idle_grace)
        self.controller = Controller(
            f"node {self.node_name}", self._reconcile, workers=1, metrics=self.client.metrics
        )
        self.view.watch(
            self.nudge, own_dvm=self._dvms.is_own_create, own_dmp=self._dmps.is_own_create
        )
        self.manager = Manager(self.client, sync_timeout=settings.sync_timeout)
        for informer in self.view.informers:
            self.manager.add_informer(informer)
        if self.recorder is None:
            self.recorder = EventRecorder(self.client, "dynvol-node", host=self.node_name)
            self.manager.add(self.recorder)
        self._reporter = RejectionReporter(self.recorder)
        self.manager.add(self._owner)
        self.manager.add(self._follower)
        self.manager.add(self.controller)

    # -- lifecycle (the manager's) --------------------------------------------------------

    async def start(self) -> None:
        """Start the manager (informers synced, then the rest), then reconcile once."""
        await self.manager.start()
        self.nudge()

    async def close(self) -> None:
        """Stop reconciling and watching (the manager, in reverse order)."""
        await self.manager.close()

    async def __aenter__(self) -> NodeReconciler:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def nudge(self) -> None:
        """Ask for a reconciliation pass (deduplicated with pending ones).

        The first change after ``coalesce`` seconds without any is acted on at once (a
        lone claim is mounted without waiting); a change that follows another within that
        window waits ``coalesce`` seconds, so a burst of events costs one more pass, not
        one each.
        """
        self.controller.queue.add_coalesced(self.node_name, self.settings.coalesce)

    def pod_class(self, pod_uid: str) -> str | None:
        """The class of a pod on this node, by UID (for slot lookups that need it)."""
        return self.view.pod_class(pod_uid)

    # -- process -------------------------------------------------------------------------

    def plan(self) -> NodePlan:
        """What this node should have, from the caches (pure apart from slot lookups)."""
        view = self.view
        pods = view.user_pods()
        claims = [
            claim
            for claim in view.claims_in({p.namespace for p in pods if p.opted_in})
            if self._check.usable(claim)
        ]
        slots: dict[str, PodSlot] = {}
        if self.slot_lookup is not None:
            for pod in pods:
                if pod.eligible and (slot := self.slot_lookup(pod.uid)) is not None:
                    slots[pod.uid] = slot
        return plan_node(
            node_name=self.node_name,
            pods=pods,
            claims=claims,
            classes=view.storage_classes(),
            slots=slots,
            system_namespace=self.settings.system_namespace,
            dmp_image=self.settings.dmp.image,
            existing_dvms=self._dvms.existing(view.cached_dvms()),
            existing_dmps=self._dmps.existing(view.cached_dmps()),
            node_uid=self._owner.uid,
        )

    async def _reconcile(self, key: str) -> Outcome | None:
        self.passes += 1
        began = time.monotonic()
        if self.view.waits_for_slice():
            # Its ADDED event nudges the next pass; until then, change nothing.
            if not self._waiting_for_slice:
                log.info(
                    "node %s: no claim slice from the controller yet; leaving every mount "
                    "and DMP as it is until there is one",
                    self.node_name,
                )
            self._waiting_for_slice = True
            return None
        self._waiting_for_slice = False
        plan = self.plan()
        self.last_plan = plan
        planned = time.monotonic()
        errors: list[BaseException] = []
        semaphore = asyncio.Semaphore(self.settings.concurrency)

        async def run(step: Awaitable[None]) -> None:
            async with semaphore:
                try:
                    await step
                except APIConflict as exc:
                    if not exc.already_exists:
                        errors.append(exc)
                except APIError as exc:
                    errors.append(exc)

        async def run_all(steps: Sequence[Awaitable[None]]) -> None:
            await asyncio.gather(*(run(step) for step in steps))

        # Mounts first: they are the unit of status (what users and the claim status see),
        # and a DMP picks up the mounts that name it whenever it starts.
        dvms, dmps = self._dvms, self._dmps
        await run_all(
            [dvms.create(d) for d in plan.create_dvms]
            + [dvms.update(d) for d in plan.update_dvms]
            + [dvms.delete(d) for d in plan.delete_dvms]
            + [dvms.release_orphan(d) for d in plan.orphaned_dvms]
        )
        # Mounts being deleted hold their DMP until gone; nothing watches for that.
        for dvm in self.view.cached_dvms():
            if dvm.deleting:
                self._follower.follow(dvm.namespace, dvm.name, dvm.uid)
        await run_all(
            [dmps.create(spec) for spec in plan.create_dmps]
            + [dmps.tolerate(change) for change in plan.tolerate_dmps]
            + [dmps.delete(p, "Failed" if p.terminal else "Unused") for p in plan.delete_dmps]
            + [dmps.replace(p) for p in plan.replace_dmps]
        )
        expired, wait = self._reaper.due(plan.idle_dmps)
        await run_all([self._reap(pod) for pod in expired])
        self._reporter.report(plan)
        log.debug(
            "node %s: pass %d planned in %.3fs, acted in %.3fs: +%d/~%d/-%d mounts, "
            "+%d/~%d/-%d DMPs, %d errors",
            self.node_name, self.passes, planned - began, time.monotonic() - planned,
            len(plan.create_dvms), len(plan.update_dvms), len(plan.delete_dvms),
            len(plan.create_dmps), len(plan.tolerate_dmps), len(plan.delete_dmps), len(errors),
        )  # fmt: skip
        if errors:
            first = errors[0]
            raise TemporaryError(
                f"{len(errors)} action(s) failed on node {self.node_name}, first: {first}",
                delay=self._overload_delay(errors),
            ) from first
        self._overloaded = 0
        if plan.delete_dvms or plan.orphaned_dvms:
            # The writes' answers changed the node's mounts (no watch event will say so):
            # plan again, e.g. to delete a DMP no mount names any more.
            self.nudge()
        if plan.unpublished:
            recheck = self.settings.unpublished_recheck
            wait = min(wait or recheck, recheck)
        return RequeueAfter(wait) if wait else None

    def _overload_delay(self, errors: Sequence[BaseException]) -> float | None:
        """The wait before the next pass when the apiserver is overloaded, else None (the
        queue's own backoff, which starts at 50 ms, for ordinary failures).

        Every node of a cluster retries on its own; after timeouts, 429s and 5xx answers
        they must not come back together and sooner than the server can cope: an
        exponential backoff from ``overload_backoff`` seconds (capped at 60) with full
        jitter, and never sooner than a ``Retry-After`` the apiserver sent.
        """
        overload = [e for e in errors if isinstance(e, APIError) and _overload(e)]
        if not overload:
            self._overloaded = 0
            return None
        self._overloaded += 1
        base = self.settings.overload_backoff
        ceiling = min(60.0, base * 2 ** min(self._overloaded - 1, 10))
        delay = random.uniform(base / 2, ceiling)
        after = max((e.retry_after or 0.0 for e in overload), default=0.0)
        return max(delay, after)

    async def _reap(self, pod: PodInfo) -> None:
        await self._dmps.delete(pod, "IdleGraceExpired")
        self._reaper.forget(pod.name)


def _overload(error: APIError) -> bool:
    """Whether an error says the apiserver is overloaded (or unreachable), not that the
    request was wrong: a timeout (no status, 504), 429, or another 5xx."""
    return error.status is None or error.status == 429 or error.status >= 500
