"""What one node reconciler watches, and which changes are worth a pass.

Observe stage of the node reconciler (:mod:`.nodes`): informers for the pods bound to the
node (``fieldSelector spec.nodeName``, which the apiserver's watch cache indexes), the
node's claim slice (the claims that select its pods, which the controller keeps:
:mod:`.slicing`), all classes, the node's DynamicVolumeMounts and its Dynamic Mount Pods
(DMPs, by label and ``spec.nodeName``), each slimmed to the fields dynvol reads, and the
models the planner takes, read from them through memoising caches. The event handlers
call ``nudge`` only for changes that can alter the plan; the writers (:mod:`.syncing`) say
which watched objects are their own creates coming back.

The node's DynamicVolumeMounts are not watched. The watch cache of a custom resource has
no index but namespace and name, so a watch by label is handed every change of every
mount in the cluster to filter: a thousand nodes would cost the apiserver a thousand times
each mount's events, and under that load it drops the watchers that fall behind, which
then replay what they missed (docs/benchmarks.md measures it). The node writes its mounts
itself and keeps what its writes return (:meth:`NodeView.remember_dvm`); it lists them
at start and every ``mounts_relist`` seconds for the changes others make (a mount
deleted by hand), and follows the mounts being deleted by name until they are gone
(:class:`DeletionFollower`: their DMP drops the finalizer once it has unmounted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from dynvol_core import constants as c
from dynvol_core.dispatch import label_value
from dynvol_core.models import (
    DynamicVolumeClaim,
    DynamicVolumeMount,
    PodInfo,
    StorageProviderClass,
)
from dynvol_core.models.pods import container_crash_looping
from dynvol_core.slices import claim_object
from dynvol_kube import APIError, APINotFound, Client, Event, Informer, Obj, stop_task
from dynvol_kube.resources import CLAIM_SLICES, CLASSES, MOUNTS, PODS

from . import objects

__all__ = ["DeletionFollower", "NodeView"]

log = logging.getLogger(__name__)

OwnCreate = Callable[[Mapping[str, object]], bool]


def _claim_uid_index(obj: Mapping[str, Any]) -> tuple[str, ...]:
    value = (obj.get("metadata", {}).get("labels") or {}).get(c.LABEL_CLAIM_UID)
    return (value,) if value else ()


def _uid_index(obj: Mapping[str, Any]) -> tuple[str, ...]:
    uid = obj.get("metadata", {}).get("uid")
    return (uid,) if uid else ()


def slim_dmp(pod: Obj) -> Obj:
    """:func:`.objects.slim_pod` for a DMP, keeping ``spec.tolerations`` (a DMP inherits
    its pods') and the status of the containers that crash-loop (such a DMP is replaced)."""
    out = objects.slim_pod(pod)
    tolerations = (pod.get("spec") or {}).get("tolerations")
    if tolerations:
        out["spec"]["tolerations"] = tolerations
    statuses = (pod.get("status") or {}).get("containerStatuses")
    looping = [
        {k: item[k] for k in ("name", "restartCount", "state") if k in item}
        for item in (statuses if isinstance(statuses, list) else ())
        if isinstance(item, Mapping) and container_crash_looping(item)
    ]
    if looping:
        out["status"]["containerStatuses"] = looping
    return out


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
class NodeView:
    """The informers of one node reconciler and the models read from them."""

    client: Client
    node_name: str
    system_namespace: str
    resync: float | None = None
    #: Seconds between lists of the node's DynamicVolumeMounts (they are not watched).
    mounts_relist: float = 300.0
    pods: Informer = attrs.field(init=False)
    claims: Informer = attrs.field(init=False)
    classes: Informer = attrs.field(init=False)
    mounts: Informer = attrs.field(init=False)
    dmps: Informer = attrs.field(init=False)
    _claim_models: objects.ModelCache = attrs.field(init=False)
    _pod_models: objects.ModelCache = attrs.field(init=False)
    _class_models: objects.ModelCache = attrs.field(init=False)
    _dvm_models: objects.ModelCache = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        node_label = label_value(self.node_name)
        self._claim_models = objects.ModelCache(DynamicVolumeClaim.from_object)
        self._pod_models = objects.ModelCache(PodInfo.from_object)
        self._class_models = objects.ModelCache(StorageProviderClass.from_object)
        self._dvm_models = objects.ModelCache(DynamicVolumeMount.from_object)
        self.pods = Informer(
            self.client,
            PODS,
            field_selector=f"spec.nodeName={self.node_name}",
            transform=slim_dmp,
            indexers={"uid": _uid_index},
            resync=self.resync,
        )
        # Not every claim of the cluster: the one slice the controller keeps for this node.
        self.claims = Informer(
            self.client,
            CLAIM_SLICES,
            field_selector=f"metadata.name={self.node_name}",
            transform=objects.slim_object,
        )
        self.classes = Informer(self.client, CLASSES)
        # Listed, not watched: see the module's docstring.
        self.mounts = Informer(
            self.client,
            MOUNTS,
            label_selector=f"{c.LABEL_NODE}={node_label}",
            transform=objects.slim_dvm,
            indexers={"claim-uid": _claim_uid_index},
            watch=False,
            relist=self.mounts_relist,
        )
        # spec.nodeName as well as the labels: the apiserver's watch cache indexes pods by
        # it, so that a pod changing anywhere in the cluster is not handed to every node's
        # DMP watch to be filtered out (a label selector alone is matched per watcher).
        self.dmps = Informer(
            self.client,
            PODS,
            namespace=self.system_namespace,
            label_selector=f"{c.LABEL_COMPONENT}={c.COMPONENT_DMP},{c.LABEL_NODE}={node_label}",
            field_selector=f"spec.nodeName={self.node_name}",
            transform=slim_dmp,
        )

    @property
    def informers(self) -> list[Informer]:
        """Every informer, in the order to start them."""
        return [self.classes, self.claims, self.pods, self.mounts, self.dmps]

    # -- models --------------------------------------------------------------------------

    def user_pods(self) -> list[PodInfo]:
        """The pods bound to the node (malformed ones left out)."""
        return [p for p in (self._pod_models.get_or_none(raw) for raw in self.pods.store) if p]

    def claims_in(self, namespaces: set[str]) -> list[DynamicVolumeClaim]:
        """The claims of the node's slice in ``namespaces`` (malformed ones left out)."""
        out = []
        for raw_slice in self.claims.store:
            revision = raw_slice["metadata"].get("resourceVersion", "")
            for entry in (raw_slice.get("spec") or {}).get("claims") or ():
                if not isinstance(entry, Mapping) or entry.get("namespace") not in namespaces:
                    continue
                claim = self._claim_models.get_or_none(claim_object(entry, revision=revision))
                if claim is not None:
                    out.append(claim)
        return out

    def waits_for_slice(self) -> bool:
        """Whether the node must not act: it has opted-in pods but no claim slice yet.

        The controller writes a slice, empty if need be, for every node with opted-in pods
        (:mod:`.slicing`). Without one, the node cannot tell "no claim selects my pods"
        from "the controller has not written my slice" (not installed yet, being upgraded,
        or the slice was deleted), and acting on the first would unmount everything.
        """
        if len(self.claims.store):
            return False
        return any(p.opted_in for p in self.user_pods())

    def storage_classes(self) -> dict[str, StorageProviderClass]:
        """Every valid class, by name."""
        return {
            spc.name: spc
            for raw in self.classes.store
            if (spc := self._class_models.get_or_none(raw)) is not None
        }

    def cached_dvms(self) -> list[DynamicVolumeMount]:
        """The node's DynamicVolumeMounts as the cache has them."""
        return [m for m in (self._dvm_models.get_or_none(r) for r in self.mounts.store) if m]

    def remember_dvm(self, obj: Obj) -> None:
        """Keep a DynamicVolumeMount a write of this node returned."""
        self.mounts.remember(obj)

    def forget_dvm(self, namespace: str, name: str) -> None:
        """Drop a DynamicVolumeMount a write of this node found gone."""
        self.mounts.forget(f"{namespace}/{name}")

    def cached_dmps(self) -> list[PodInfo]:
        """The node's DMPs as the cache has them."""
        return [p for p in (self._pod_models.get_or_none(r) for r in self.dmps.store) if p]

    def pod_class(self, pod_uid: str) -> str | None:
        """The class of a pod on this node, by UID (for slot lookups that need it)."""
        for pod in self.pods.store.by_index("uid", pod_uid):
            return objects.injected_class(pod)
        return None

    # -- observe -> queue ----------------------------------------------------------------

    def watch(self, nudge: Callable[[], None], *, own_dvm: OwnCreate, own_dmp: OwnCreate) -> None:
        """Call ``nudge`` for every change that may alter the node's plan."""

        def on_any(event: Event) -> None:
            if _changed(event, ignore_status=True):
                nudge()

        def on_pod(event: Event) -> None:
            if _changed(event, ignore_status=False):
                nudge()

        def on_slice(event: Event) -> None:
            # The slice lists only claims that select pods here (or did, when it shrinks).
            if _changed(event, ignore_status=True):
                nudge()

        def on_mount(event: Event) -> None:
            if event.type == "ADDED" and own_dvm(event.obj):
                return  # our own create coming back
            if _changed(event, ignore_status=True):
                nudge()

        def on_dmp(event: Event) -> None:
            if event.type == "ADDED" and own_dmp(event.obj):
                return  # our own create coming back
            # Phase matters for DMPs: a Failed one is replaced.
            if _changed(event, ignore_status=False):
                nudge()

        self.pods.add_handler(on_pod)
        self.claims.add_handler(on_slice)
        self.classes.add_handler(on_any)
        self.mounts.add_handler(on_mount)
        self.dmps.add_handler(on_dmp)


@attrs.define(eq=False)
class DeletionFollower:
    """Follow the node's DynamicVolumeMounts that are being deleted until they are gone.

    A mount being deleted waits for its DMP to unmount it and drop the finalizer; until
    then it holds its DMP. The node does not watch its mounts (see the module), so it
    reads each one it follows by name (an indexed read): first ``first`` seconds after it
    began to follow, then twice as long each time up to ``longest``. A mount found gone,
    recreated or changed is put into the informer's store as such and reported to
    ``changed``, which asks for a pass. A manager component.
    """

    client: Client
    mounts: Informer
    changed: Callable[[], None]
    first: float = 0.05
    longest: float = 2.0
    clock: Callable[[], float] = time.monotonic
    #: key -> (uid, when to read it next, the wait after that)
    _followed: dict[str, tuple[str, float, float]] = attrs.field(factory=dict, init=False)
    _wake: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _task: asyncio.Task[None] | None = attrs.field(default=None, init=False)

    @property
    def followed(self) -> int:
        return len(self._followed)

    def follow(self, namespace: str, name: str, uid: str) -> None:
        """Read the mount until it is gone (a mount already followed keeps its pace)."""
        key = f"{namespace}/{name}"
        if key in self._followed and self._followed[key][0] == uid:
            return
        self._followed[key] = (uid, self.clock() + self.first, self.first * 2)
        self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="follow deleting mounts")

    async def close(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            if not self._followed:
                await self._wake.wait()
                continue
            now = self.clock()
            due = [k for k, (_, at, _) in self._followed.items() if at <= now]
            if not due:
                soonest = min(at for _, at, _ in self._followed.values())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(0.0, soonest - now))
                continue
            results = await asyncio.gather(*(self._read(k) for k in due))
            if any(results):
                self.changed()

    async def _read(self, key: str) -> bool:
        """Read one followed mount; whether the node's plan may have changed."""
        uid, _, wait = self._followed[key]
        namespace, _, name = key.partition("/")
        try:
            obj = await self.client.get(MOUNTS, name, namespace=namespace)
        except APINotFound:
            obj = None
        except APIError as exc:
            log.debug("following mount %s: %s", key, exc)
            self._followed[key] = (uid, self.clock() + wait, min(self.longest, wait * 2))
            return False
        if obj is None or obj.get("metadata", {}).get("uid") != uid:
            self._followed.pop(key, None)
            cached = self.mounts.store.get(key)
            if cached is not None and cached.get("metadata", {}).get("uid") == uid:
                self.mounts.forget(key)
            if obj is not None:
                self.mounts.remember(obj)
            return True
        self._followed[key] = (uid, self.clock() + wait, min(self.longest, wait * 2))
        self.mounts.remember(obj)
        return False
