"""The node reconciler: one per node, inside ``dynvol node``, for the pods on that node.

Observe: informers for the pods bound to this node (``fieldSelector spec.nodeName``), all
claims and classes, and this node's DynamicVolumeMounts and Dynamic Mount Pods (DMPs).
Queue: every relevant change queues the single key of the node, so a burst of events
collapses into one pass. Process: one pass reads the caches, asks
:func:`dynvol_core.dispatch.plan_node` what the node should have, and acts on the
difference. Act: create/replace/delete DynamicVolumeMounts (owned by their user pod),
create/delete DMPs per dispatch policy, and delete shared DMPs that have been idle for
``shared_idle_grace`` seconds.

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
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs

from dynvol_core import constants as c
from dynvol_core.dispatch import (
    NodePlan,
    label_value,
    plan_node,
)
from dynvol_core.errors import DynvolError
from dynvol_core.models import (
    DynamicVolumeClaim,
    DynamicVolumeMount,
    PodInfo,
    StorageProviderClass,
    thaw_json,
)
from dynvol_core.paths import PodSlot
from dynvol_kube import (
    WARNING,
    APIConflict,
    APIError,
    APINotFound,
    Client,
    Controller,
    Event,
    EventRecorder,
    Informer,
    Manager,
    Outcome,
    RequeueAfter,
    TemporaryError,
)
from dynvol_kube.resources import CLAIMS, CLASSES, MOUNTS, PODS, Resource

from . import objects
from .reaping import IdleReaper
from .syncing import DmpSync, DvmSync, OrphanHook

__all__ = ["NodeReconciler", "SlotLookup"]

log = logging.getLogger(__name__)

SlotLookup = Callable[[str], PodSlot | None]


def _claim_uid_index(obj: Mapping[str, Any]) -> tuple[str, ...]:
    value = (obj.get("metadata", {}).get("labels") or {}).get(c.LABEL_CLAIM_UID)
    return (value,) if value else ()


def _uid_index(obj: Mapping[str, Any]) -> tuple[str, ...]:
    uid = obj.get("metadata", {}).get("uid")
    return (uid,) if uid else ()


def _changed(event: Event, *, ignore_status: bool) -> bool:
    """Whether an update changed more than its resourceVersion (and status, if ignored)."""
    if event.type != "MODIFIED" or event.old is None:
        return True

    def strip(obj: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in obj.items() if not (ignore_status and k == "status")}
        meta = dict(out.get("metadata") or {})
        meta.pop("resourceVersion", None)
        out["metadata"] = meta
        return out

    return strip(event.obj) != strip(event.old)


@attrs.define(eq=False)
class NodeReconciler:
    """Keep one node's DynamicVolumeMounts and DMPs as planned.

    Lifecycle: ``await start()`` (informers synced, worker running), ``await close()``;
    or ``async with``. :meth:`nudge` requests a pass (e.g. after a volume was published).
    """

    client: Client
    node_name: str
    slot_lookup: SlotLookup | None = attrs.field(kw_only=True)
    system_namespace: str = attrs.field(default=c.DEFAULT_SYSTEM_NAMESPACE, kw_only=True)
    dmp_image: str = attrs.field(default="dynvol:latest", kw_only=True)
    dmp_service_account: str = attrs.field(default=c.DEFAULT_DMP_SERVICE_ACCOUNT, kw_only=True)
    dmp_priority_class: str = attrs.field(default=c.DEFAULT_DMP_PRIORITY_CLASS, kw_only=True)
    dmp_image_pull_policy: str = attrs.field(default="IfNotPresent", kw_only=True)
    #: For clusters whose pods reach the apiserver only on the host network.
    dmp_host_network: bool = attrs.field(default=False, kw_only=True)
    dmp_env: Mapping[str, str] = attrs.field(factory=dict, kw_only=True)
    #: Seconds a shared DMP may serve nothing before it is deleted.
    shared_idle_grace: float = attrs.field(default=60.0, kw_only=True)
    #: gracePeriodSeconds when deleting DMPs (None: the pod's own, so it can unmount).
    dmp_delete_grace: int | None = attrs.field(default=None, kw_only=True)
    #: Called for a mount being deleted whose DMP is gone (the shell unmounts lazily).
    on_orphaned: OrphanHook | None = attrs.field(default=None, kw_only=True)
    recorder: EventRecorder | None = attrs.field(default=None, kw_only=True)
    #: A dynvol_providers ProviderRegistry: claims whose provider is unknown or rejects the
    #: config are never mounted (the validating webhook normally refuses them earlier).
    registry: Any = attrs.field(default=None, kw_only=True)
    #: Requests in flight at once per pass; small, because every node runs one and
    #: together they share the apiserver (whose default mutating in-flight limit is 200).
    concurrency: int = attrs.field(default=4, kw_only=True)
    resync: float | None = attrs.field(default=600.0, kw_only=True)
    #: Seconds before looking again at pods whose volume is not published yet.
    unpublished_recheck: float = attrs.field(default=5.0, kw_only=True)
    #: Seconds to gather events before a pass, so a burst costs one pass, not hundreds.
    coalesce: float = attrs.field(default=0.05, kw_only=True)

    informers: list[Informer] = attrs.field(factory=list, init=False)
    pods: Informer = attrs.field(init=False)
    claims: Informer = attrs.field(init=False)
    classes: Informer = attrs.field(init=False)
    mounts: Informer = attrs.field(init=False)
    dmps: Informer = attrs.field(init=False)
    controller: Controller = attrs.field(init=False)
    passes: int = attrs.field(default=0, init=False)
    last_plan: NodePlan | None = attrs.field(default=None, init=False)
    _node_uid: str = attrs.field(default="", init=False)
    _manager: Manager | None = attrs.field(default=None, init=False)
    _reported: set[tuple[str, str, str]] = attrs.field(factory=set, init=False)
    _dvm_sync: DvmSync = attrs.field(init=False)
    _dmp_sync: DmpSync = attrs.field(init=False)
    _claims: objects.ModelCache = attrs.field(init=False)
    _pods: objects.ModelCache = attrs.field(init=False)
    _classes: objects.ModelCache = attrs.field(init=False)
    _dvms: objects.ModelCache = attrs.field(init=False)
    _started: bool = attrs.field(default=False, init=False)
    _usable: dict[tuple[str, int], bool] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        node_label = label_value(self.node_name)
        self._dvm_sync = DvmSync(self.client, on_orphaned=self.on_orphaned)
        self._dmp_sync = DmpSync(
            client=self.client,
            node_name=self.node_name,
            service_account=self.dmp_service_account,
            priority_class=self.dmp_priority_class,
            image_pull_policy=self.dmp_image_pull_policy,
            host_network=self.dmp_host_network,
            env=self.dmp_env,
            delete_grace=self.dmp_delete_grace,
            reaper=IdleReaper(self.shared_idle_grace),
        )
        self._claims = objects.ModelCache(DynamicVolumeClaim.from_object)
        self._pods = objects.ModelCache(PodInfo.from_object)
        self._classes = objects.ModelCache(StorageProviderClass.from_object)
        self._dvms = objects.ModelCache(DynamicVolumeMount.from_object)
        self.pods = Informer(
            self.client,
            PODS,
            field_selector=f"spec.nodeName={self.node_name}",
            transform=objects.slim_pod,
            indexers={"uid": _uid_index},
            resync=self.resync,
        )
        self.claims = Informer(self.client, CLAIMS)
        self.classes = Informer(self.client, CLASSES)
        self.mounts = Informer(
            self.client,
            MOUNTS,
            label_selector=f"{c.LABEL_NODE}={node_label}",
            transform=objects.slim_dvm,
            indexers={"claim-uid": _claim_uid_index},
        )
        self.dmps = Informer(
            self.client,
            PODS,
            namespace=self.system_namespace,
            label_selector=(f"{c.LABEL_COMPONENT}={c.COMPONENT_DMP},{c.LABEL_NODE}={node_label}"),
            transform=objects.slim_pod,
        )
        self.informers = [self.classes, self.claims, self.pods, self.mounts, self.dmps]
        self.controller = Controller(
            f"node {self.node_name}", self._reconcile, workers=1, metrics=self.client.metrics
        )
        self.pods.add_handler(self._on_pod)
        self.claims.add_handler(self._on_claim)
        self.classes.add_handler(self._on_any)
        self.mounts.add_handler(self._on_mount)
        self.dmps.add_handler(self._on_dmp)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, *, sync_timeout: float = 120.0) -> None:
        """Start the informers, wait for their first list, then reconcile.

        The :class:`~dynvol_kube.Manager` starts them in order (informers, synced; the
        Event recorder if this reconciler made its own; the controller) and closes them in
        reverse, also when starting fails.
        """
        manager = Manager(self.client, sync_timeout=sync_timeout)
        for informer in self.informers:
            manager.add_informer(informer)
        if self.recorder is None:
            self.recorder = EventRecorder(self.client, "dynvol-node", host=self.node_name)
            manager.add(self.recorder)
        manager.add(self.controller)
        self._manager = manager
        self._node_uid = await self._lookup_node_uid()
        await manager.start()
        self._started = True
        self.nudge()

    async def close(self) -> None:
        """Stop reconciling and watching."""
        if self._manager is not None:
            await self._manager.close()
        else:
            await self.controller.close()
        self._started = False

    async def __aenter__(self) -> NodeReconciler:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def nudge(self) -> None:
        """Ask for a reconciliation pass (deduplicated with pending ones)."""
        if self.coalesce > 0:
            self.controller.queue.add_after(self.node_name, self.coalesce)
        else:
            self.controller.enqueue(self.node_name)

    def pod_class(self, pod_uid: str) -> str | None:
        """The class of a pod on this node, by UID (for slot lookups that need it)."""
        for pod in self.pods.store.by_index("uid", pod_uid):
            return objects.injected_class(pod)
        return None

    async def _lookup_node_uid(self) -> str:
        try:
            node = await self.client.get(Resource("", "v1", "nodes", "Node", False), self.node_name)
        except APIError:
            # Made-up nodes (tests) or no RBAC to read nodes: DMPs then have no owner.
            return ""
        uid: str = node.get("metadata", {}).get("uid", "")
        return uid

    # -- observe -> queue ----------------------------------------------------------------

    def _on_any(self, event: Event) -> None:
        if _changed(event, ignore_status=True):
            self.nudge()

    def _on_pod(self, event: Event) -> None:
        if _changed(event, ignore_status=False):
            self.nudge()

    def _on_claim(self, event: Event) -> None:
        # Every node sees every claim; most claims concern none of its pods. A pass costs
        # far more than this check, and a cluster of nodes would all pay it.
        if _changed(event, ignore_status=True) and self._claim_concerns_us(event):
            self.nudge()

    def _claim_concerns_us(self, event: Event) -> bool:
        meta = event.obj.get("metadata") or {}
        uid = meta.get("uid", "")
        if uid and self.mounts.store.by_index("claim-uid", label_value(uid)):
            return True  # we have mounts for it: any change may matter
        local = self.pods.store.by_index("namespace", meta.get("namespace", ""))
        if not local:
            return False
        for version in (event.obj, event.old):
            if version is None:
                continue
            claim = self._claims.get_or_none(version)
            if claim is None:
                continue
            for raw in local:
                if claim.selector.selects(raw["metadata"].get("labels") or {}):
                    return True
        return False

    def _on_mount(self, event: Event) -> None:
        if event.type == "ADDED" and self._dvm_sync.is_own_create(event.obj):
            return  # our own create coming back
        if _changed(event, ignore_status=True):
            self.nudge()

    def _on_dmp(self, event: Event) -> None:
        if event.type == "ADDED" and self._dmp_sync.is_own_create(event.obj):
            return  # our own create coming back
        # Phase matters for DMPs: a Failed one is replaced.
        if _changed(event, ignore_status=False):
            self.nudge()

    # -- process -------------------------------------------------------------------------

    def _existing_dvms(self) -> list[DynamicVolumeMount]:
        cached = (self._dvms.get_or_none(raw) for raw in self.mounts.store)
        return self._dvm_sync.existing(m for m in cached if m is not None)

    def _existing_dmps(self) -> list[PodInfo]:
        cached = (self._pods.get_or_none(raw) for raw in self.dmps.store)
        return self._dmp_sync.existing(p for p in cached if p is not None)

    def plan(self) -> NodePlan:
        """What this node should have, from the caches (pure apart from slot lookups)."""
        pods = [p for p in (self._pods.get_or_none(raw) for raw in self.pods.store) if p]
        namespaces = {p.namespace for p in pods if p.opted_in}
        claims = [
            claim
            for ns in namespaces
            for raw in self.claims.store.by_index("namespace", ns)
            if (claim := self._claims.get_or_none(raw)) is not None and self._claim_usable(claim)
        ]
        classes = {
            spc.name: spc
            for raw in self.classes.store
            if (spc := self._classes.get_or_none(raw)) is not None
        }
        slots: dict[str, PodSlot] = {}
        if self.slot_lookup is not None:
            for pod in pods:
                if pod.eligible:
                    slot = self.slot_lookup(pod.uid)
                    if slot is not None:
                        slots[pod.uid] = slot
        return plan_node(
            node_name=self.node_name,
            pods=pods,
            claims=claims,
            classes=classes,
            slots=slots,
            system_namespace=self.system_namespace,
            dmp_image=self.dmp_image,
            existing_dvms=self._existing_dvms(),
            existing_dmps=self._existing_dmps(),
            node_uid=self._node_uid,
        )

    def _claim_usable(self, claim: DynamicVolumeClaim) -> bool:
        """Whether the claim's provider is installed and accepts its config (memoised)."""
        if self.registry is None:
            return True
        key = (claim.uid, claim.generation)
        usable = self._usable.get(key)
        if usable is None:
            try:
                provider = self.registry.get(claim.storage_provider)
                provider.parse_config(thaw_json(claim.provider_config.values), parameters={})
                usable = True
            except DynvolError as exc:
                log.info(
                    "node %s: claim %s/%s is not mounted: %s",
                    self.node_name,
                    claim.namespace,
                    claim.name,
                    exc,
                )
                usable = False
            if len(self._usable) > 10_000:
                self._usable.clear()
            self._usable[key] = usable
        return usable

    async def _reconcile(self, key: str) -> Outcome | None:
        self.passes += 1
        began = time.monotonic()
        plan = self.plan()
        self.last_plan = plan
        planned = time.monotonic()
        errors: list[BaseException] = []
        semaphore = asyncio.Semaphore(self.concurrency)

        async def run(step: Awaitable[None]) -> None:
            async with semaphore:
                try:
                    await step
                except APIConflict as exc:
                    if not exc.already_exists:
                        errors.append(exc)
                except APINotFound as exc:
                    errors.append(exc)
                except APIError as exc:
                    errors.append(exc)

        # Mounts first: they are the unit of status (what users and the claim status see),
        # and a DMP picks up the mounts that name it whenever it starts.
        dvms, dmps = self._dvm_sync, self._dmp_sync
        mount_steps: list[Awaitable[None]] = [dvms.create(d) for d in plan.create_dvms]
        mount_steps += [dvms.update(dvm) for dvm in plan.update_dvms]
        mount_steps += [dvms.delete(dvm) for dvm in plan.delete_dvms]
        mount_steps += [dvms.release_orphan(dvm) for dvm in plan.orphaned_dvms]
        await asyncio.gather(*(run(step) for step in mount_steps))
        steps: list[Awaitable[None]] = [dmps.create(spec) for spec in plan.create_dmps]
        steps += [
            dmps.delete(pod, "Failed" if pod.terminal else "Unused") for pod in plan.delete_dmps
        ]
        await asyncio.gather(*(run(step) for step in steps))

        expired, wait = dmps.reaper.due(plan.idle_dmps)
        idle = [dmps.delete(pod, "IdleGraceExpired") for pod in expired]
        await asyncio.gather(*(run(step) for step in idle))
        self._report_rejections(plan)
        log.debug(
            "node %s: pass %d planned in %.3fs, acted in %.3fs: +%d/~%d/-%d mounts, "
            "+%d/-%d DMPs, %d errors",
            self.node_name,
            self.passes,
            planned - began,
            time.monotonic() - planned,
            len(plan.create_dvms),
            len(plan.update_dvms),
            len(plan.delete_dvms),
            len(plan.create_dmps),
            len(plan.delete_dmps),
            len(errors),
        )
        if errors:
            first = errors[0]
            raise TemporaryError(
                f"{len(errors)} action(s) failed on node {self.node_name}, first: {first}"
            ) from first
        if plan.unpublished:
            wait = min(wait or self.unpublished_recheck, self.unpublished_recheck)
        return RequeueAfter(wait) if wait else None

    # -- report ---------------------------------------------------------------------------

    def _report_rejections(self, plan: NodePlan) -> None:
        if self.recorder is None:
            return
        for m in plan.matches:
            if m.ok or m.reason is None:
                continue
            key = (m.pod.uid, m.claim.uid, str(m.reason))
            if key in self._reported:
                continue
            self._reported.add(key)
            pod_ref = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": m.pod.name, "namespace": m.pod.namespace, "uid": m.pod.uid},
            }
            self.recorder.record(
                pod_ref, WARNING, str(m.reason), f"claim {m.claim.name}: {m.message}"
            )
        if len(self._reported) > 100_000:
            self._reported.clear()
