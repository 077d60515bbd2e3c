"""The node reconciler's two writers: DynamicVolumeMounts and Dynamic Mount Pods.

Act stage of the node reconciler (:mod:`.nodes`). Each collaborator owns one kind of
object the reconciler writes: it makes the API calls a plan asks for and remembers its own
writes until the informer cache shows them (:class:`~.expectations.Expectations`), so that
the next plan, made from the cache, neither writes them again nor forgets them. The
reconciler plans; these act. Idle shared DMPs are the :mod:`.reaping` reaper's to time.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping

import attrs

from dynvol_core import constants as c
from dynvol_core.dispatch import DmpSpec, DmpTolerations, dmp_pod_manifest, missing_tolerations
from dynvol_core.models import DynamicVolumeMount, PodInfo, Toleration
from dynvol_kube import APIConflict, APIForbidden, APINotFound, Client, Obj, TemporaryError
from dynvol_kube.resources import MOUNTS, PODS

from .expectations import Expectations
from .settings import DmpTemplate

__all__ = ["DmpSync", "DvmSync", "ReplacementBudget"]

log = logging.getLogger(__name__)

FIELD_MANAGER = "dynvol-node"
_JSON_PATCH = "application/json-patch+json"

OrphanHook = Callable[[DynamicVolumeMount], Awaitable[None]]
#: Told what a write returned (the object), or that it found the object gone (ns, name).
Written = Callable[[Obj], None]
Gone = Callable[[str, str], None]


def _ignore_written(_: Obj) -> None:
    return None


def _ignore_gone(_: str, __: str) -> None:
    return None


@attrs.define(eq=False)
class DvmSync:
    """Create, replace and delete one node's DynamicVolumeMounts; release orphans."""

    client: Client
    #: Called for a mount being deleted whose DMP is gone (the shell unmounts lazily).
    on_orphaned: OrphanHook | None = None
    writes: Expectations[tuple[str, str], DynamicVolumeMount] = attrs.field(factory=Expectations)
    #: Told of every mount a write returned, and of every mount a write found gone: the
    #: node keeps its mounts from its own writes (it does not watch them).
    on_written: Written = attrs.field(default=_ignore_written, kw_only=True)
    on_gone: Gone = attrs.field(default=_ignore_gone, kw_only=True)

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
        self.on_written(created)

    async def update(self, dvm: DynamicVolumeMount) -> None:
        """Replace the mount's spec and labels, as of the version the node last had.

        The node does not watch its mounts, so that version is often behind: the DMP
        writes the finalizer and the status. On a conflict it reads the mount and replaces
        it once more on that version, keeping what others wrote (finalizers, labels it
        does not set); a mount being deleted is left alone.
        """
        body = dvm.to_object()
        body.pop("status", None)
        try:
            try:
                updated = await self.client.replace(MOUNTS, body, field_manager=FIELD_MANAGER)
            except APIConflict as conflict:
                fresh = await self._reread(dvm)
                if fresh is None:
                    raise APINotFound(
                        f"DynamicVolumeMount {dvm.namespace}/{dvm.name} is gone",
                        status=404,
                        reason="NotFound",
                    ) from conflict
                meta = fresh.get("metadata") or {}
                if meta.get("uid") != dvm.uid or meta.get("deletionTimestamp"):
                    return  # replaced or going meanwhile: the next pass decides
                body["metadata"].update(
                    resourceVersion=meta.get("resourceVersion"),
                    finalizers=meta.get("finalizers") or [],
                    labels={**(meta.get("labels") or {}), **dvm.labels},
                )
                updated = await self.client.replace(MOUNTS, body, field_manager=FIELD_MANAGER)
        except APINotFound:
            self.on_gone(dvm.namespace, dvm.name)
            raise
        self.on_written(updated)

    async def delete(self, dvm: DynamicVolumeMount) -> None:
        try:
            answer = await self.client.delete(
                MOUNTS, dvm.name, namespace=dvm.namespace, uid=dvm.uid
            )
        except APIConflict:
            return  # a precondition miss: it was replaced; the next pass decides again
        except APINotFound:
            answer = None
        self.writes.deleted(dvm.uid)
        self._deleted(dvm, answer)

    async def _reread(self, dvm: DynamicVolumeMount) -> Obj | None:
        """Read the mount after a write conflicted with the node's (unwatched) copy, and
        tell ``on_written`` or ``on_gone``; None if it is gone."""
        try:
            fresh: Obj = await self.client.get(MOUNTS, dvm.name, namespace=dvm.namespace)
        except APINotFound:
            self.on_gone(dvm.namespace, dvm.name)
            return None
        self.on_written(fresh)
        return fresh

    def _deleted(self, dvm: DynamicVolumeMount, answer: object) -> None:
        # A mount with finalizers stays, with its deletionTimestamp, until they are gone;
        # one without is gone at once (the answer is then the object as it was, or a
        # Status).
        if isinstance(answer, dict) and _still_deleting(answer.get("metadata")):
            self.on_written(answer)
        else:
            self.on_gone(dvm.namespace, dvm.name)

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
                patched = await self.client.patch(MOUNTS, dvm.name, patch, namespace=dvm.namespace)
            except APINotFound:
                self.on_gone(dvm.namespace, dvm.name)
                return
            except APIConflict:
                # Changed since the node's copy (which is not watched): take the new
                # version, and let the next pass decide on it.
                if await self._reread(dvm) is None:
                    return
                raise
            # Without its last finalizer a mount being deleted is gone at once.
            self._deleted(dvm, patched if not dvm.deleting else None)
        if not dvm.deleting:
            await self.delete(dvm)


def _still_deleting(meta: object) -> bool:
    return (
        isinstance(meta, Mapping)
        and bool(meta.get("deletionTimestamp"))
        and bool(meta.get("finalizers"))
    )


@attrs.define(eq=False, kw_only=True)
class DmpSync:
    """Create and delete one node's Dynamic Mount Pods, and add tolerations to them."""

    client: Client
    node_name: str
    template: DmpTemplate
    writes: Expectations[str, PodInfo] = attrs.field(factory=Expectations)
    #: Tolerations added to a DMP (by UID) that the cache may not show yet.
    added: Expectations[str, tuple[Toleration, ...]] = attrs.field(factory=Expectations)
    #: Replacements of crash-looping DMPs, per DMP name.
    budget: ReplacementBudget = attrs.field(init=False)
    clock: Callable[[], float] = time.monotonic

    def __attrs_post_init__(self) -> None:
        self.budget = ReplacementBudget(
            limit=self.template.crash_replacements, window=self.template.crash_window
        )

    def existing(self, cached: Iterable[PodInfo]) -> list[PodInfo]:
        """The DMPs the node has: the cache, plus own creates and added tolerations, less
        own deletes."""
        by_name = {p.name: p for p in cached}
        for name, info in self.writes.pending_creates().items():
            if name in by_name and by_name[name].uid == info.uid:
                self.writes.observed(name)
            elif name not in by_name:
                by_name[name] = info
        for uid, tolerations in self.added.pending_creates().items():
            for name, pod in by_name.items():
                if pod.uid != uid:
                    continue
                if missing_tolerations(pod.tolerations, tolerations):
                    by_name[name] = attrs.evolve(pod, tolerations=pod.tolerations + tolerations)
                else:
                    self.added.observed(uid)
        return [p for p in by_name.values() if not self.writes.deleting(p.uid)]

    def is_own_create(self, obj: Mapping[str, object]) -> bool:
        """Whether a watched ADDED DMP is this process's own create coming back."""
        meta = obj.get("metadata")
        if not isinstance(meta, Mapping):
            return False
        created = self.writes.creating(str(meta.get("name")))
        return created is not None and created.uid == meta.get("uid")

    async def create(self, spec: DmpSpec) -> None:
        dmp = self.template
        manifest = dmp_pod_manifest(
            spec,
            service_account_name=dmp.service_account,
            priority_class_name=dmp.priority_class,
            image_pull_policy=dmp.image_pull_policy,
            image_pull_secrets=dmp.image_pull_secrets,
            host_network=dmp.host_network,
            extra_env=dmp.env,
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
        except APIForbidden as exc:
            if "PriorityClass" not in str(exc):
                raise
            raise TemporaryError(
                f"cannot create DMP {spec.name}: PriorityClass {dmp.priority_class!r} does not "
                "exist (install manifests/base/priorityclass.yaml or choose another with "
                f"--dmp-priority-class): {exc}",
                delay=30,
            ) from exc
        self.writes.created(spec.name, PodInfo.from_object(created))
        log.info(
            "node %s: created DMP %s (%s, class %s)",
            self.node_name, spec.name, spec.policy, spec.class_name,
        )  # fmt: skip

    async def tolerate(self, change: DmpTolerations) -> None:
        """Add tolerations to a running DMP (the only change Kubernetes allows to them)."""
        pod = change.pod
        patch = [
            # The same DMP, not a successor of the same name.
            {"op": "test", "path": "/metadata/uid", "value": pod.uid},
            *(
                {"op": "add", "path": "/spec/tolerations/-", "value": t.to_object()}
                for t in change.add
            ),
        ]
        try:
            await self.client.patch(
                PODS, pod.name, patch, namespace=pod.namespace, content_type=_JSON_PATCH,
                field_manager=FIELD_MANAGER,
            )  # fmt: skip
        except APINotFound:
            return  # gone: the next pass creates it with every toleration
        self.added.created(pod.uid, (self.added.creating(pod.uid) or ()) + change.add)
        log.info(
            "node %s: DMP %s tolerates %s too",
            self.node_name, pod.name, ", ".join(_describe(t.to_object()) for t in change.add),
        )  # fmt: skip

    async def replace(self, pod: PodInfo) -> None:
        """Delete a DMP whose container is in CrashLoopBackOff, so that it is created again
        and starts at once, within the budget (``--dmp-crash-replacements`` per 10 min)."""
        if self.budget.take(pod.name, self.clock()):
            # Its mounts died with its container: nothing to unmount gracefully. Exited and
            # waiting out its back-off, nothing of it runs, so the Pod goes at once (no wait
            # for kubelet to confirm); otherwise kubelet may be starting it again right now,
            # and that gets a second, not the pod's 30 s.
            grace = 0 if pod.crashed_and_stopped else 1
            await self.delete(pod, "CrashLoopBackOff", grace_seconds=grace)
        elif self.budget.first_refusal(pod.name, pod.uid):
            log.warning(
                "node %s: DMP %s keeps crashing (replaced %d times in %.0f s); kubelet's "
                "back-off restarts it from now on",
                self.node_name, pod.name, self.budget.limit, self.budget.window,
            )  # fmt: skip

    async def delete(self, pod: PodInfo, why: str, *, grace_seconds: int | None = None) -> None:
        grace = self.template.delete_grace
        if grace_seconds is not None:
            grace = grace_seconds if grace is None else min(grace, grace_seconds)
        with contextlib.suppress(APINotFound, APIConflict):
            await self.client.delete(
                PODS, pod.name, namespace=pod.namespace, uid=pod.uid, grace_seconds=grace,
            )  # fmt: skip
        self.writes.deleted(pod.uid)
        log.info("node %s: deleted DMP %s (%s)", self.node_name, pod.name, why)


@attrs.define
class ReplacementBudget:
    """At most ``limit`` replacements per name in any ``window`` seconds."""

    limit: int
    window: float
    _times: dict[str, list[float]] = attrs.field(factory=dict, init=False)
    _refused: dict[str, str] = attrs.field(factory=dict, init=False)

    def take(self, name: str, now: float) -> bool:
        """Whether ``name`` may be replaced at ``now`` (and count it if so)."""
        for other in [n for n, times in self._times.items() if now - times[-1] >= self.window]:
            del self._times[other]  # quiet for a whole window: forgotten
            self._refused.pop(other, None)
        recent = [t for t in self._times.get(name, []) if now - t < self.window]
        if len(recent) >= self.limit:
            if recent:
                self._times[name] = recent
            return False
        self._times[name] = [*recent, now]
        return True

    def first_refusal(self, name: str, uid: str) -> bool:
        """Whether this is the first refusal for this pod (to say it once)."""
        if self._refused.get(name) == uid:
            return False
        self._refused[name] = uid
        return True


def _describe(toleration: Mapping[str, object]) -> str:
    key = toleration.get("key") or "*"
    effect = toleration.get("effect") or "any effect"
    return f"{key} ({effect})"
