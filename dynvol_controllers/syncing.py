"""The node reconciler's two writers: DynamicVolumeMounts and Dynamic Mount Pods.

Each collaborator owns one kind of object the node reconciler (:mod:`.nodes`) writes: it
makes the API calls a plan asks for and remembers its own writes until the informer cache
shows them (:class:`~.expectations.Expectations`), so that the next plan, made from the
cache, neither writes them again nor forgets them. The reconciler plans; these act.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping

import attrs

from dynvol_core import constants as c
from dynvol_core.dispatch import DmpSpec, dmp_pod_manifest
from dynvol_core.models import DynamicVolumeMount, PodInfo
from dynvol_kube import APIConflict, APINotFound, Client, TemporaryError
from dynvol_kube.resources import MOUNTS, PODS

from .expectations import Expectations
from .reaping import IdleReaper

__all__ = ["DmpSync", "DvmSync"]

log = logging.getLogger(__name__)

FIELD_MANAGER = "dynvol-node"

OrphanHook = Callable[[DynamicVolumeMount], Awaitable[None]]


@attrs.define(eq=False)
class DvmSync:
    """Create, replace and delete one node's DynamicVolumeMounts; release orphans."""

    client: Client
    #: Called for a mount being deleted whose DMP is gone (the shell unmounts lazily).
    on_orphaned: OrphanHook | None = None
    writes: Expectations[tuple[str, str], DynamicVolumeMount] = attrs.field(factory=Expectations)

    def existing(self, cached: Iterable[DynamicVolumeMount]) -> list[DynamicVolumeMount]:
        """The mounts the node has: the cache, plus own creates it does not show yet.

        A mount this process deleted stays in the plan as deleting until the cache drops
        it: its DMP is still unmounting it (the finalizer), so the DMP must not be reaped
        as unused meanwhile, and if that DMP is gone the mount is an orphan.
        """
        by_key = {(m.namespace, m.name): m for m in cached}
        for key, model in self.writes.pending_creates().items():
            if key in by_key:
                self.writes.observed(key)
            else:
                by_key[key] = model
        return [
            attrs.evolve(m, deleting=True) if self.writes.deleting(m.uid) else m
            for m in by_key.values()
        ]

    def is_own_create(self, obj: Mapping[str, object]) -> bool:
        """Whether a watched ADDED object is this process's own create coming back."""
        meta = obj.get("metadata")
        if not isinstance(meta, Mapping):
            return False
        written = self.writes.creating((str(meta.get("namespace", "")), str(meta.get("name"))))
        return written is not None and written.uid == meta.get("uid")

    async def create(self, dvm: DynamicVolumeMount) -> None:
        try:
            created = await self.client.create(
                MOUNTS, dvm.to_object(), namespace=dvm.namespace, field_manager=FIELD_MANAGER
            )
        except APIConflict as exc:
            if exc.already_exists:
                # Made by an earlier pass (or process) and not in the cache yet: assume it
                # is as wanted until the cache shows it; a difference then means an update.
                self.writes.created((dvm.namespace, dvm.name), dvm)
            raise
        model = DynamicVolumeMount.from_object(created)
        self.writes.created((model.namespace, model.name), model)

    async def update(self, dvm: DynamicVolumeMount) -> None:
        body = dvm.to_object()
        body.pop("status", None)
        await self.client.replace(MOUNTS, body, field_manager=FIELD_MANAGER)

    async def delete(self, dvm: DynamicVolumeMount) -> None:
        try:
            await self.client.delete(MOUNTS, dvm.name, namespace=dvm.namespace, uid=dvm.uid)
        except APIConflict:
            return  # a precondition miss: it was replaced; the next pass decides again
        except APINotFound:
            pass
        self.writes.deleted(dvm.uid)

    async def release_orphan(self, dvm: DynamicVolumeMount) -> None:
        """A mount whose DMP is gone: unmount it on the host, drop the finalizer, delete."""
        if self.on_orphaned is not None:
            await self.on_orphaned(dvm)
        if c.FINALIZER_MOUNT in dvm.finalizers:
            finalizers = [f for f in dvm.finalizers if f != c.FINALIZER_MOUNT]
            patch = {
                "metadata": {"finalizers": finalizers, "resourceVersion": dvm.resource_version}
            }
            try:
                await self.client.patch(MOUNTS, dvm.name, patch, namespace=dvm.namespace)
            except APINotFound:
                return
        if not dvm.deleting:
            await self.delete(dvm)


@attrs.define(eq=False, kw_only=True)
class DmpSync:
    """Create and delete one node's Dynamic Mount Pods, and reap idle shared ones."""

    client: Client
    node_name: str
    service_account: str
    priority_class: str
    image_pull_policy: str
    host_network: bool
    env: Mapping[str, str]
    #: gracePeriodSeconds when deleting DMPs (None: the pod's own, so it can unmount).
    delete_grace: int | None
    reaper: IdleReaper
    writes: Expectations[str, PodInfo] = attrs.field(factory=Expectations)

    def existing(self, cached: Iterable[PodInfo]) -> list[PodInfo]:
        """The DMPs the node has: the cache, plus own creates, less own deletes."""
        by_name = {p.name: p for p in cached}
        for name, info in self.writes.pending_creates().items():
            if name in by_name and by_name[name].uid == info.uid:
                self.writes.observed(name)
            elif name not in by_name:
                by_name[name] = info
        return [p for p in by_name.values() if not self.writes.deleting(p.uid)]

    def is_own_create(self, obj: Mapping[str, object]) -> bool:
        """Whether a watched ADDED DMP is this process's own create coming back."""
        meta = obj.get("metadata")
        if not isinstance(meta, Mapping):
            return False
        created = self.writes.creating(str(meta.get("name")))
        return created is not None and created.uid == meta.get("uid")

    async def create(self, spec: DmpSpec) -> None:
        manifest = dmp_pod_manifest(
            spec,
            service_account_name=self.service_account,
            priority_class_name=self.priority_class,
            image_pull_policy=self.image_pull_policy,
            host_network=self.host_network,
            extra_env=self.env,
        )
        try:
            created = await self.client.create(
                PODS, manifest, namespace=spec.namespace, field_manager=FIELD_MANAGER
            )
        except APINotFound as exc:
            raise TemporaryError(
                f"cannot create DMP {spec.name}: namespace {spec.namespace!r} is missing "
                "(install dynvol's manifests)",
                delay=10,
            ) from exc
        self.writes.created(spec.name, PodInfo.from_object(created))
        log.info(
            "node %s: created DMP %s (%s, class %s)",
            self.node_name, spec.name, spec.policy, spec.class_name,
        )  # fmt: skip

    async def delete(self, pod: PodInfo, why: str) -> None:
        with contextlib.suppress(APINotFound, APIConflict):
            await self.client.delete(
                PODS, pod.name, namespace=pod.namespace, uid=pod.uid,
                grace_seconds=self.delete_grace,
            )  # fmt: skip
        self.writes.deleted(pod.uid)
        self.reaper.forget(pod.name)
        log.info("node %s: deleted DMP %s (%s)", self.node_name, pod.name, why)
