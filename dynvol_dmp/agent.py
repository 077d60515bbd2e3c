"""The Dynamic Mount Pod agent: mounts the DynamicVolumeMounts assigned to it, and keeps them.

Pipeline (on :mod:`dynvol_kube`): an :class:`~dynvol_kube.Informer` lists and watches the
DynamicVolumeMounts assigned to this DMP (by label); a :class:`~dynvol_kube.ChangePredicate`
lets through only the events that change what the agent acts on (:func:`intent`); a
:class:`~dynvol_kube.Controller` runs :meth:`Agent.reconcile` for each woken key, one worker
per key, level-based: observe (the object, the mount table, the daemon), plan with
:func:`dynvol_core.mountplans.plan_mounts`, act through the provider, report the outcome on
the object's status, and return an :data:`~dynvol_kube.Outcome`.

Before acting on an object the agent checks it (:mod:`dynvol_dmp.trust`: its node, the pod
it serves, the claim, the class); one that does not check out gets a Warning Event and is
left alone. A mount is made at a private staging directory and attached to its target,
which :mod:`dynvol_dmp.targets` opened without following links; the mount table must then
show it exactly there, or it is undone (docs/design.md §6.2, §6.3).

The agent owns every mounter process (through :class:`dynvol_providers.hosting.LocalHost`,
which waits for each of them): a daemon that dies marks its mount stale and queues the key,
so the next reconcile repairs it (lazy unmount, mount again) at once, and with a growing
delay if it keeps dying. Mount table changes and a slow health probe catch the rest; these
background tasks (and the credentials watch) run under a :class:`~dynvol_kube.Supervisor`,
so one that fails is logged, counted and started again.

Lifecycle: :meth:`Agent.start` reads the mount pod's own Pod, cleans up mounts a previous
run left below ``--xvols`` and in its staging tree, and starts watching; :meth:`Agent.close`
(first SIGTERM) stops watching, unmounts everything it owns and stops its daemons; the
second SIGTERM makes :func:`run` exit at once (:func:`dynvol_kube.run_until_signalled`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import os
import posixpath
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import attrs

from dynvol_core import constants as c
from dynvol_core.dispatch import label_value
from dynvol_core.errors import InvalidObject
from dynvol_core.models import (
    Condition,
    ConditionStatus,
    DynamicVolumeMount,
    MountPhase,
    StorageProviderClass,
    set_condition,
    thaw_json,
)
from dynvol_core.mountinfo import Landing, MountEntry, entries_under, landing_of, topmost_at
from dynvol_core.mountplans import (
    DesiredMount,
    LazyUnmount,
    Mount,
    Repair,
    Step,
    plan_mounts,
    plan_teardown,
)
from dynvol_core.validation import check_dns1123_label
from dynvol_dmp.metrics import (
    CAUSE_HEALTH_CHECK,
    CAUSE_MOUNT_GONE,
    CAUSE_MOUNTER_EXITED,
    STAGE_ATTACH,
    STAGE_MOUNTER,
    STAGE_PREPARE,
    STAGE_RESOLVE,
    STAGE_VERIFY,
    DmpMetrics,
)
from dynvol_dmp.targets import REASON_UNSAFE, UnsafeTarget, open_below, remove_dir_below
from dynvol_dmp.trust import REASON_UNTRUSTED, Identity, check_mount, target_names
from dynvol_kube import (
    DONE,
    NORMAL,
    WARNING,
    APIConflict,
    APIError,
    APINotFound,
    ChangePredicate,
    Client,
    Controller,
    Event,
    EventRecorder,
    Informer,
    Metrics,
    Obj,
    Outcome,
    RequeueAfter,
    Supervisor,
    object_key,
    run_until_signalled,
)
from dynvol_kube.resources import CLAIMS, CLASSES, MOUNTS, PODS
from dynvol_providers import (
    DaemonHandle,
    MountFailed,
    MountHandle,
    MountRequest,
    Provider,
    ProviderRegistry,
    UnknownProvider,
)
from dynvol_providers.base import parse_provider_config
from dynvol_providers.builtin.rclone import pending_uploads, rclone_cache_dir
from dynvol_providers.hosting import LocalHost, read_mount_table

log = logging.getLogger(__name__)

COMPONENT = "dynvol-dmp"
CONDITION_READY = "Ready"
CONDITION_REPAIRED = "Repaired"
#: The Ready reason while a deleted mount waits for its open files to be closed.
REASON_FILES_OPEN = "FilesOpen"
#: ... and while rclone still uploads files that were closed on it.
REASON_UPLOADS_PENDING = "UploadsPending"
#: Why a mount still in use is to be unmounted, for the Unmounting message.
CAUSE_DELETED = "the DynamicVolumeMount is being deleted"
CAUSE_CHANGED = "the DynamicVolumeMount's configuration changed (it is mounted again)"
#: Seconds between looks at a deleted mount still in use.
DRAIN_INTERVAL = 1.0
#: The Pod condition the apiserver sets on a pod evicted through the Eviction API (a drain),
#: preempted, or evicted by the taint manager or by kubelet under node pressure.
CONDITION_DISRUPTION_TARGET = "DisruptionTarget"
#: Seconds between looks at the served pods while stopping.
STOP_INTERVAL = 0.5
#: Seconds a StorageProviderClass read from the API is reused.
CLASS_TTL = 30.0
#: A mount attempt reports phase Mounting only once its mounter has taken this long: a quick
#: mount goes from Pending to Mounted in one status write (one apiserver write less per
#: mount, and none on the way to the data), a slow one says what it is doing.
MOUNTING_REPORT_AFTER = 1.0
#: Seconds the agent keeps trying to read its own Pod at start before giving up.
IDENTITY_TIMEOUT = 60.0

Key = tuple[str, str]
"""(namespace, name) of a DynamicVolumeMount."""


def key_of(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata", {})
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


def intent(obj: Obj) -> tuple[object, ...]:
    """The part of a DynamicVolumeMount the agent acts on (not status, not bookkeeping).

    Only a change of it wakes the key: the agent's own status writes come back as watch
    events too, and if they woke the key, a failing mount would be retried at once,
    defeating its backoff.
    """
    meta = obj.get("metadata", {})
    # Not the generation: the API server derives it from spec changes and deletion.
    return (obj.get("spec"), meta.get("deletionTimestamp"), meta.get("labels"))


def _check_mounts_namespace(_: object, __: object, value: str | None) -> None:
    if value is not None and (errors := check_dns1123_label(value, "--mounts-namespace")):
        raise ValueError("; ".join(str(e) for e in errors))


@attrs.frozen(kw_only=True)
class Settings:
    """What ``dynvol dmp`` was told on its command line."""

    name: str
    namespace: str
    xvols: Path
    secrets_dir: Path
    work_dir: Path
    workers: int = 8
    health_interval: float = 10.0
    max_backoff: float = 300.0
    #: Seconds a SIGTERM'd agent keeps serving the pods that are terminating too (within
    #: the DMP's terminationGracePeriodSeconds, 30, less time to unmount).
    stop_timeout: float = 25.0
    #: Watch the mounts of this namespace only (an independent DMP serves one pod, whose
    #: mounts all live in its namespace): the apiserver's watch cache indexes a watch by
    #: namespace, so such a watch is not handed every mount change of the cluster to
    #: filter by label. None: every namespace (a shared DMP serves several). A path segment
    #: of every watch the agent makes: a namespace name, nothing else.
    mounts_namespace: str | None = attrs.field(default=None, validator=_check_mounts_namespace)


@attrs.define
class _Owned:
    """A mount this agent made and supervises."""

    key: Key
    desired_key: str
    target: PurePosixPath
    provider: Provider
    request: MountRequest
    handle: MountHandle
    stale_reason: str = ""
    repairs: list[float] = attrs.field(factory=list)
    #: The directory of the pod's slot this mount is in; the agent removes the empty
    #: directories it made on the way to the target, up to here, once unmounted.
    slot: PurePosixPath | None = None
    #: Set once it was unmounted (it may outlive its place in the agent's table while a
    #: moved mountpoint is mounted anew before the old one goes).
    released: bool = False
    #: When its unmount grace period began (monotonic), while it waits for open files.
    drain_started: float | None = None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


@attrs.define
class Agent:
    """One DMP's reconciler and supervisor. Use :meth:`start` and :meth:`close`."""

    settings: Settings
    client: Client
    registry: ProviderRegistry
    host: LocalHost = attrs.field(init=False)
    informer: Informer = attrs.field(init=False)
    controller: Controller = attrs.field(init=False)
    recorder: EventRecorder = attrs.field(init=False)
    metrics: DmpMetrics = attrs.field(init=False)
    supervisor: Supervisor = attrs.field(factory=Supervisor, init=False)
    _owned: dict[Key, _Owned] = attrs.field(factory=dict, init=False)
    _failures: dict[Key, int] = attrs.field(factory=dict, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _classes: dict[str, tuple[float, dict[str, Any]]] = attrs.field(factory=dict, init=False)
    #: Who this mount pod is (its own Pod); read at start, before anything is acted on.
    identity: Identity | None = attrs.field(default=None, init=False)
    #: The (uid, generation) of each object that passed the trust checks.
    _trusted: dict[Key, tuple[str, int]] = attrs.field(factory=dict, init=False)
    #: The last refusal reported for each object, so that it is reported once.
    _refused: dict[Key, tuple[str, int, str]] = attrs.field(factory=dict, init=False)
    #: The old mounts of moved mountpoints, no longer at their object's target, that wait
    #: for the files still open on them (§9.1, §9.5); the new mount serves meanwhile.
    _retiring: dict[Key, list[_Owned]] = attrs.field(factory=dict, init=False)
    #: Target and staging directory of each mount attempt under way (another attempt's
    #: new mounts are not strays of this one).
    _attempts: dict[Key, tuple[PurePosixPath, PurePosixPath]] = attrs.field(
        factory=dict, init=False
    )
    #: The stages of the mount under way of each object and how long each took
    #: (``dynvol_dmp_mount_stage_seconds``), reported once it is mounted.
    _stages: dict[Key, list[tuple[str, float]]] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self.host = LocalHost(on_daemon_exit=self._on_daemon_exit)
        self.informer = Informer(
            self.client,
            MOUNTS,
            namespace=self.settings.mounts_namespace,
            label_selector=self.label_selector,
            gates_readiness=True,
        )
        wakes = ChangePredicate(intent)

        def on_event(event: Event) -> None:
            if wakes(event):
                self.controller.enqueue(object_key(event.obj))

        self.informer.add_handler(on_event)
        self.controller = Controller(
            f"dmp {self.settings.name}", self._reconcile_key, workers=self.settings.workers,
            metrics=self.client.metrics,
        )  # fmt: skip
        self.recorder = EventRecorder(self.client, COMPONENT, host=self.settings.name)
        self.metrics = DmpMetrics.of(self.client.metrics, lambda: list(self.informer.store))

    def _wake(self, key: Key) -> None:
        self.controller.enqueue("/".join(key))

    def _cached(self, key: Key) -> Obj | None:
        return self.informer.store.get("/".join(key))

    def _remember(self, updated: Obj) -> None:
        """Take the object a write returned, so that this reconcile reads its own write."""
        self.informer.store.put_if_newer(updated)

    @property
    def label_selector(self) -> str:
        return f"{c.LABEL_DMP}={label_value(self.settings.name)}"

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Clean up after a previous run, then watch and reconcile in the background."""
        # Targets are walked from --xvols without following links, and unmounts walk from
        # /: both roots are spelled as the kernel lists them in mountinfo.
        realpath = os.path.realpath
        xvols = PurePosixPath(await asyncio.to_thread(realpath, self.settings.xvols))
        work_dir = PurePosixPath(await asyncio.to_thread(realpath, self.settings.work_dir))
        if _within(work_dir, xvols) or _within(xvols, work_dir):
            raise ValueError("--work-dir and --xvols must not contain each other (the staging "
                             "mounts would reach the pods)")  # fmt: skip
        self.settings = attrs.evolve(self.settings, xvols=Path(xvols), work_dir=Path(work_dir))
        await asyncio.to_thread(os.makedirs, work_dir, 0o700, True)
        self.identity = await self._read_identity()
        table = read_mount_table()
        for scope in (xvols, self._staging_root):
            for step in plan_teardown(table, scope, include_scope=False):
                log.info("removing mount left by a previous run: %s", step.target)
                await self.host.unmount(step.target, lazy=True)
        await self.recorder.start()
        await self.informer.start()
        await self.controller.start()
        self.supervisor.start("mount table watch", self._watch_mount_table)
        self.supervisor.start("health probe", self._probe_health)
        self.supervisor.start("credentials watch", self._watch_credentials)

    async def _read_identity(self) -> Identity:
        """This mount pod's own Pod, as the node plugin made it; retried while the API is
        unreachable. :raises RuntimeError: if it does not exist or is not a mount pod."""
        name, namespace = self.settings.name, self.settings.namespace
        deadline = time.monotonic() + IDENTITY_TIMEOUT
        delay = 0.5
        while True:
            try:
                identity = Identity.from_pod(await self.client.get(PODS, name, namespace=namespace))
            except APINotFound:
                raise RuntimeError(
                    f"this mount pod's own Pod {namespace}/{name} does not exist; --name and "
                    "--namespace must name the Pod this agent runs in"
                ) from None
            except ValueError as exc:
                raise RuntimeError(str(exc)) from None
            except APIError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cannot read this mount pod's own Pod: {exc}") from exc
                log.warning("cannot read this mount pod's own Pod yet: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            log.info(
                "mount pod %s/%s: node %s, policy %s, class %s%s",
                namespace, name, identity.node_name, identity.policy, identity.class_label,
                f", pod {identity.pod_namespace}/{identity.pod_uid}" if identity.pod_uid else "",
            )  # fmt: skip
            return identity

    async def stop_serving(self) -> None:
        """After SIGTERM, before :meth:`close`: keep serving the pods that are leaving too.

        A drain evicts a DMP together with the pods it serves, and those pods' last writes,
        ``preStop`` hooks and shutdown still need their mounts. So the agent keeps running
        while they terminate: the node plugin deletes each one's mount as its pod goes, and
        the agent unmounts it as usual (once its files are closed, §9.7). Whether this mount
        pod was evicted (its Pod has the ``DisruptionTarget`` condition, which the apiserver
        sets on an eviction) decides about the pods that are not terminating (yet): an
        evicted DMP keeps serving them too (a drain evicts them next, or a disruption budget
        holds them); a DMP that was deleted (by the node plugin replacing it, or by hand)
        unmounts them at once, so that the next DMP of the name can start. What is still
        mounted after ``settings.stop_timeout`` is left to :meth:`close`.
        """
        loop = asyncio.get_running_loop()
        began = loop.time()
        evicted = await self._evicted()
        said = False
        while self._owned:
            now = loop.time()
            if now - began >= self.settings.stop_timeout:
                log.warning(
                    "stopping: %d mount(s) still in use after %.0f s; unmounting them",
                    len(self._owned), now - began,
                )  # fmt: skip
                return
            seen: dict[tuple[str, str], str] = {}  # one read per served pod and pass
            for owned in list(self._owned.values()):
                state = await self._served_pod(owned.key, seen)
                if state == "gone" or (state == "staying" and not evicted):
                    log.info(
                        "stopping: unmounting %s/%s (its pod is %s)", *owned.key,
                        "gone" if state == "gone" else "staying: another mount pod takes over",
                    )  # fmt: skip
                    await self._unmount_owned(owned)
                    await self._report_stopped(owned.key)
                elif not said:
                    said = True
                    log.info(
                        "stopping: %s; serving the pods that are still there until they go",
                        "evicted" if evicted else "deleted",
                    )  # fmt: skip
            if self._owned:
                await asyncio.sleep(STOP_INTERVAL)

    async def _evicted(self) -> bool:
        """Whether this mount pod is being evicted (rather than deleted)."""
        try:
            own = await self.client.get(PODS, self.settings.name, namespace=self.settings.namespace)
        except APIError:
            return False  # cannot tell: hand over the pods that stay
        conditions = (own.get("status") or {}).get("conditions") or []
        return any(
            isinstance(c_, Mapping)
            and c_.get("type") == CONDITION_DISRUPTION_TARGET
            and c_.get("status") == "True"
            for c_ in conditions
        )

    async def _served_pod(self, key: Key, seen: dict[tuple[str, str], str]) -> str:
        """``gone``, ``leaving`` (terminating) or ``staying``: the pod a mount serves (read
        once per pass: a shared DMP's mounts serve few pods between them)."""
        obj = self._cached(key)
        if obj is None:
            return "leaving"  # the mount is being released through reconcile
        spec = obj.get("spec") or {}
        pod_key = (key[0], str(spec.get("podUID")))
        if pod_key not in seen:
            seen[pod_key] = await self._pod_state(key[0], spec)
        return seen[pod_key]

    async def _pod_state(self, namespace: str, spec: Mapping[str, Any]) -> str:
        try:
            pod = await self.client.get(PODS, str(spec.get("podName")), namespace=namespace)
        except APINotFound:
            return "gone"
        except APIError:
            return "leaving"  # cannot tell: keep serving, within the timeout
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        if meta.get("uid") != spec.get("podUID") or status.get("phase") in ("Succeeded", "Failed"):
            return "gone"
        return "leaving" if meta.get("deletionTimestamp") else "staying"

    async def close(self) -> None:
        """Stop watching, unmount everything this agent owns, stop its daemons."""
        self._closing = True
        await self.supervisor.close()
        await self.controller.close()
        await self.informer.close()
        owned = [*self._owned.values(), *(o for old in self._retiring.values() for o in old)]
        self._retiring.clear()
        await asyncio.gather(*(self._unmount_owned(o) for o in owned), return_exceptions=True)
        keys = {o.key for o in owned}
        await asyncio.gather(*(self._report_stopped(k) for k in keys), return_exceptions=True)
        await self.recorder.close()
        await self.host.close()

    # -- event sources ----------------------------------------------------------------------

    def _on_daemon_exit(self, handle: DaemonHandle, status: int) -> None:
        retiring = (o for old in self._retiring.values() for o in old)
        for owned in (*self._owned.values(), *retiring):
            if owned.handle.daemon == handle:
                owned.stale_reason = f"its mounter (pid {handle.pid}) exited with status {status}"
                self.metrics.went_stale(CAUSE_MOUNTER_EXITED)
                if not self._closing:
                    self._wake(owned.key)
                return

    async def _watch_mount_table(self) -> None:
        while True:
            await self.host.mount_table_changed().wait()
            table = read_mount_table()
            for owned in list(self._owned.values()):
                if owned.stale_reason:
                    # Already known, and its repair is queued or backing off: the mount
                    # table changes that repair attempts make themselves must not wake it.
                    continue
                entry = topmost_at(table, owned.target)
                if entry is None or entry.fs_type != owned.handle.fs_type:
                    owned.stale_reason = "its mount disappeared"
                    self.metrics.went_stale(CAUSE_MOUNT_GONE)
                    self._wake(owned.key)

    async def _watch_credentials(self) -> None:
        """Wake every mount when the mounted credentials Secret changes.

        The controller keeps the class's credentials copy in step with the class's source
        Secret, and kubelet swaps the files of a Secret volume atomically. Each mount's desired key
        includes the credentials, so a woken mount whose credentials changed is mounted
        again with the new ones (and a mount that failed on bad credentials is retried at
        once instead of after its backoff). This reads local files at the health interval;
        it is not a poll of the API server.
        """
        seen = _digest(sorted((await asyncio.to_thread(self._secrets)).items()))
        while True:
            await asyncio.sleep(self.settings.health_interval)
            current = _digest(sorted((await asyncio.to_thread(self._secrets)).items()))
            if current == seen:
                continue
            seen = current
            keys = self.informer.store.key_list()
            log.info("the credentials Secret changed; looking again at %d mount(s)", len(keys))
            for name in keys:
                self.controller.enqueue(name)

    async def _probe_health(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval)
            for owned in list(self._owned.values()):
                if owned.stale_reason:
                    continue  # already being repaired
                health = await owned.provider.check_health(owned.handle, self.host)
                if not health.ok:
                    owned.stale_reason = health.message or str(health.state)
                    self.metrics.went_stale(CAUSE_HEALTH_CHECK)
                    self._wake(owned.key)

    async def _reconcile_key(self, name: str) -> Outcome:
        """The controller's reconcile: the agent keeps its own backoff per key."""
        namespace, _, obj_name = name.partition("/")
        key = (namespace, obj_name)
        try:
            return await self.reconcile(key)
        except APIConflict:
            return RequeueAfter(0.0)  # the object changed meanwhile: look again
        except Exception:
            log.exception("reconciling %s/%s failed", *key)
            return RequeueAfter(self._backoff(key))

    def _backoff(self, key: Key, *, floor: float = 1.0) -> float:
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        return float(min(floor * 2**failures, self.settings.max_backoff))

    # -- reconcile ------------------------------------------------------------------------

    async def reconcile(self, key: Key) -> Outcome:
        """Bring ``key``'s mount to what its object asks; look again after a delay if asked."""
        obj = self._cached(key)
        owned = self._owned.get(key)
        if obj is None:
            if owned is not None:
                await self._unmount_owned(owned)
            await self._unmount_retiring(key)
            self._failures.pop(key, None)
            self._stages.pop(key, None)
            return DONE
        try:
            dvm = DynamicVolumeMount.from_object(obj)
        except InvalidObject as exc:
            if owned is not None:
                await self._unmount_owned(owned)
            await self._unmount_retiring(key)
            await self._report(obj, MountPhase.FAILED, "InvalidSpec",
                               f"the DynamicVolumeMount is invalid: {exc}")  # fmt: skip
            return DONE
        target = self._target(dvm)
        if dvm.spec.dmp_name != self.settings.name or dvm.deleting:
            return await self._release(obj, dvm, owned, target)
        if target is None:
            message = (
                f"spec.dmpTargetPath {dvm.spec.dmp_target_path!r} is not below "
                f"{c.DMP_XVOLS_DIR}; the node plugin must recreate this mount"
            )
            await self._report(obj, MountPhase.FAILED, "InvalidPath", message)
            return DONE
        began = time.monotonic()
        try:
            problem = await self._untrusted(key, dvm)
        except APIError as exc:
            log.warning("cannot check %s/%s yet: %s", *key, exc)
            return RequeueAfter(self._backoff(key))
        if problem is not None:
            await self._refuse(obj, dvm, problem)
            return DONE
        verified = time.monotonic()
        try:
            provider, request = await self._mount_request(dvm, target)
        except MountFailed as failure:
            if owned is not None:
                await self._unmount_owned(owned)
            await self._unmount_retiring(key)
            await self._report(obj, MountPhase.FAILED, failure.reason, failure.message)
            return RequeueAfter(self._backoff(key, floor=30.0 if not failure.retryable else 1.0))
        self._stages[key] = [
            (STAGE_VERIFY, verified - began),
            (STAGE_RESOLVE, time.monotonic() - verified),
        ]
        desired_key = _digest(dvm.uid, provider.name, request.config, request.read_only,
                              sorted(request.credentials.values.items()))  # fmt: skip
        desired = DesiredMount(target=target, source=provider.name, fs_type="", key=desired_key)
        # An old mount of this object still draining where the new target nests with it (a
        # move back, or below or above it) must be gone first, as in the plan's own order.
        wait = await self._drain_retiring(
            obj, dvm, lambda old: _moved(old.target, target, mounted=False),
            only=lambda old: _within(old.target, target) or _within(target, old.target),
        )  # fmt: skip
        if wait is not None:
            return RequeueAfter(wait)
        steps = self._plan(target, desired, owned)
        for index, step in enumerate(steps):
            if isinstance(step, LazyUnmount):
                ours = owned is not None and not owned.released and owned.target == step.target
                if ours and step.reason == "Retired" and self._owned.get(key) is not owned:
                    # Make before break: the new mount serves already; the old one waits
                    # for its open files below, and on the passes to come (§9.1).
                    assert owned is not None
                    self._retire(owned)
                    continue
                if ours and step.reason in ("ConfigChanged", "Retired"):
                    # The new mount goes where the old one is, or inside or above it: files
                    # open on the old one get the grace period first (§9.2, §9.5).
                    assert owned is not None
                    cause = (
                        CAUSE_CHANGED
                        if step.reason == "ConfigChanged"
                        else _moved(owned.target, target, mounted=False)
                    )
                    wait = await self._drain(obj, dvm, owned, cause=cause)
                    if wait is not None:
                        return RequeueAfter(wait)
                await self._unmount_step(step, owned, request.work_dir)
            elif isinstance(step, Repair):
                delay = self._repair_delay(key)
                if delay > 0:
                    return RequeueAfter(delay)
                started = time.monotonic()
                repaired = await self._repair(obj, dvm, provider, request, desired_key)
                self.metrics.repaired(provider.name, repaired, time.monotonic() - started)
                if not repaired:
                    return RequeueAfter(self._backoff(key))
            elif isinstance(step, Mount) and not await self._mount(
                obj, dvm, provider, request, desired_key
            ):
                # The old mount of a moved mountpoint goes even if the new one failed: the
                # object no longer asks for it there (docs/design.md §9); once its files
                # are closed, looked at again when the mount is retried.
                for later in steps[index + 1 :]:
                    if not isinstance(later, LazyUnmount):
                        continue
                    if (
                        later.reason == "Retired"
                        and owned is not None
                        and owned.target == later.target
                        and not owned.released
                    ):
                        self._retire(owned)
                    else:
                        await self._unmount_step(later, owned, request.work_dir)
                await self._drain_retiring(
                    self._cached(key) or obj, dvm, lambda old: _moved(old.target, target)
                )
                return RequeueAfter(self._backoff(key))
        owned = self._owned.get(key)
        obj = self._cached(key) or obj
        wait = await self._drain_retiring(
            obj, dvm, lambda old: _moved(old.target, target, mounted=True)
        )
        if wait is not None:
            return RequeueAfter(wait)
        obj = self._cached(key) or obj
        if owned is not None:
            owned.drain_started = None  # in use again as it is: a later drain starts afresh
            obj = await self._ensure_finalizer(obj, DynamicVolumeMount.from_object(obj))
        status = obj.get("status") or {}
        message = f"mounted at {target}"
        # The message too: after a move whose own report lost to a conflict, the phase is
        # still Mounted from the old mountpoint, and only the message says where.
        if owned is not None and (
            status.get("phase") != MountPhase.MOUNTED or status.get("message") != message
        ):
            await self._report(obj, MountPhase.MOUNTED, "Mounted", message)
        self._failures.pop(key, None)
        return DONE

    def _plan(
        self, target: PurePosixPath, desired: DesiredMount, owned: _Owned | None
    ) -> tuple[Step, ...]:
        """Observe the mount table at ``target`` (and where this key's mount is now, if it
        is elsewhere) and plan with :func:`plan_mounts`.

        A changed spec gives another desired key at the same target (config, readOnly,
        credentials: unmounted, then mounted again) or the same mount at another target (a
        changed mountpoint: the old target is retired, after the new mount when neither
        path lies inside the other). docs/design.md §9.
        """
        table = read_mount_table()
        observed = entries_under(table, target, include_self=True)
        scope = target.parent
        known: dict[PurePosixPath, str] = {}
        stale: set[PurePosixPath] = set()
        retire: set[PurePosixPath] = set()
        if owned is not None:
            known[owned.target] = owned.desired_key
            if owned.stale_reason:
                stale.add(owned.target)
            if owned.target != target:
                retire.add(owned.target)
                seen = set(observed)
                observed += tuple(
                    e
                    for e in entries_under(table, owned.target, include_self=True)
                    if e not in seen
                )
                common = os.path.commonpath([str(target.parent), str(owned.target.parent)])
                scope = PurePosixPath(common)
        return plan_mounts(
            desired=[desired], observed=observed, scope=scope, stale=stale, known=known,
            retire=retire,
        )  # fmt: skip

    async def _unmount_step(
        self, step: LazyUnmount, previous: _Owned | None, keep: PurePosixPath
    ) -> None:
        """Run a planned unmount: this key's previous mount is unmounted through its
        provider (its daemon stopped) and its work directory removed unless the new mount
        uses it (``keep``); anything else at the target is detached."""
        if previous is not None and previous.target == step.target and not previous.released:
            log.info("unmounting %s/%s at %s (%s)", *previous.key, step.target, step.reason)
            await self._unmount_owned(previous)
            if previous.request.work_dir != keep:
                await asyncio.to_thread(
                    shutil.rmtree, previous.request.work_dir, ignore_errors=True
                )
        else:
            await self.host.unmount(step.target, lazy=True)

    async def _untrusted(self, key: Key, dvm: DynamicVolumeMount) -> str | None:
        """Why this mount pod must not act on ``dvm`` (see :mod:`dynvol_dmp.trust`), or None.

        Reads the user pod, the claim and the class; a verdict is kept for the object's
        generation. :raises APIError: if the API cannot tell (the caller retries).
        """
        assert self.identity is not None
        version = (dvm.uid, dvm.generation)
        if self._trusted.get(key) == version:
            return None
        spec, namespace = dvm.spec, dvm.namespace

        async def absent_as_none(read: Awaitable[Any]) -> Any:
            with contextlib.suppress(APINotFound):
                return await read
            return None

        # Three reads at once: they are on the path from a new mount to its data.
        pod, claim, raw_class = await asyncio.gather(
            absent_as_none(self.client.get(PODS, spec.pod_name, namespace=namespace)),
            absent_as_none(self.client.get(CLAIMS, spec.claim_name, namespace=namespace)),
            absent_as_none(self._get_class(spec.storage_provider_class)),
        )
        spc = None
        if raw_class is not None:
            try:
                spc = StorageProviderClass.from_object(raw_class)
            except InvalidObject as exc:
                return f"StorageProviderClass {spec.storage_provider_class!r} is invalid: {exc}"
        problem = check_mount(self.identity, dvm, pod=pod, claim=claim, spc=spc)
        if problem is None:
            self._trusted[key] = version
            self._refused.pop(key, None)
        else:
            self._trusted.pop(key, None)
        return problem

    async def _refuse(self, obj: dict[str, Any], dvm: DynamicVolumeMount, problem: str) -> None:
        """Report a refused object once per generation, and touch nothing else of it."""
        key = (dvm.namespace, dvm.name)
        seen = (dvm.uid, dvm.generation, problem)
        if self._refused.get(key) == seen:
            return
        self._refused[key] = seen
        message = f"mount pod {self.settings.name} does not act on this mount: {problem}"
        log.warning("refusing %s/%s: %s", *key, problem)
        await self._event(obj, REASON_UNTRUSTED, message, "Warning")

    def _target(self, dvm: DynamicVolumeMount) -> PurePosixPath | None:
        """Where to mount, inside this agent's view of /xvols; None if unsafe."""
        raw = PurePosixPath(posixpath.normpath(dvm.spec.dmp_target_path))
        if ".." in PurePosixPath(dvm.spec.dmp_target_path).parts or not raw.is_absolute():
            return None
        root = PurePosixPath(c.DMP_XVOLS_DIR)
        try:
            relative = raw.relative_to(root)
        except ValueError:
            return None
        if not relative.parts:
            return None
        return PurePosixPath(self.settings.xvols) / relative

    async def _mount_request(
        self, dvm: DynamicVolumeMount, target: PurePosixPath
    ) -> tuple[Provider, MountRequest]:
        """Resolve provider, class parameters, config and credentials (MountFailed if not)."""
        try:
            provider = self.registry.get(dvm.spec.provider)
        except UnknownProvider as exc:
            raise MountFailed("UnknownProvider", str(exc), retryable=False) from None
        try:
            raw_class = await self._get_class(dvm.spec.storage_provider_class)
        except APINotFound:
            raise MountFailed(
                "StorageProviderClassNotFound",
                f"StorageProviderClass {dvm.spec.storage_provider_class!r} does not exist; "
                "create it or fix the pod's storage-provider-class annotation",
                retryable=False,
            ) from None
        try:
            spc = StorageProviderClass.from_object(raw_class)
            config = parse_provider_config(
                provider,
                thaw_json(dvm.spec.config),
                parameters=spc.provider_parameters,
                connection=spc.connection,
            )
        except InvalidObject as exc:
            raise MountFailed(
                "InvalidConfig",
                f"the {dvm.spec.provider} configuration is invalid: {exc}; fix the claim "
                f"{dvm.spec.claim_name!r} or the StorageProviderClass",
                retryable=False,
            ) from None
        try:
            credentials = provider.parse_credentials(await asyncio.to_thread(self._secrets))
        except InvalidObject as exc:
            raise MountFailed(
                "InvalidCredentials",
                f"the credentials Secret of StorageProviderClass "
                f"{dvm.spec.storage_provider_class!r} is invalid: {exc}",
                retryable=False,
            ) from None
        request = MountRequest(
            name=f"{dvm.namespace}/{dvm.name}",
            target=target,
            read_only=dvm.spec.read_only,
            config=config,
            credentials=credentials,
            work_dir=PurePosixPath(self.settings.work_dir) / _mount_dir_name(dvm, target),
        )
        return provider, request

    async def _get_class(self, name: str) -> dict[str, Any]:
        """The StorageProviderClass, cached briefly: classes rarely change, mounts come in
        bursts (a Deployment scaling up), and a changed class is seen within the TTL."""
        now = time.monotonic()
        cached = self._classes.get(name)
        if cached is not None and now - cached[0] < CLASS_TTL:
            return cached[1]
        obj: dict[str, Any] = await self.client.get(CLASSES, name)
        self._classes[name] = (now, obj)
        return obj

    def _secrets(self) -> dict[str, bytes]:
        """The class's Secret as mounted into the DMP: one file per key."""
        data: dict[str, bytes] = {}
        directory = self.settings.secrets_dir
        if not directory.is_dir():
            return data
        for entry in directory.iterdir():
            # Secret volumes hold ..data and timestamped dirs next to the key symlinks.
            if entry.name.startswith(".") or not entry.is_file():
                continue
            data[entry.name] = entry.read_bytes()
        return data

    async def _mount(
        self,
        obj: dict[str, Any],
        dvm: DynamicVolumeMount,
        provider: Provider,
        request: MountRequest,
        desired_key: str,
    ) -> bool:
        key = (dvm.namespace, dvm.name)
        assert self.identity is not None
        began = time.monotonic()
        try:
            names, slot_part = target_names(self.identity, dvm)
            opened = await asyncio.to_thread(
                open_below, PurePosixPath(self.settings.xvols), request.target,
                create_from=slot_part,
            )  # fmt: skip
        except (UnsafeTarget, InvalidObject) as exc:
            message = f"refusing to mount at {request.target}: {exc}"
            log.warning("%s/%s: %s", *key, message)
            await self._report(obj, MountPhase.FAILED, REASON_UNSAFE, message)
            return False
        # The provider mounts at a staging directory of the agent's own, which no pod can
        # reach; the agent then binds that mount onto the opened target (attach), so the
        # path to the target is never resolved again after the no-follow walk.
        # One staging directory per mount: while a moved mountpoint is mounted anew, the
        # old mount (attached from its own staging directory) is still to be unmounted.
        staging = self._staging_root / request.work_dir.name
        try:
            await asyncio.to_thread(os.makedirs, staging, 0o700, True)
            before = read_mount_table()
            self._attempts[key] = (request.target, staging)
            staged = attrs.evolve(request, target=staging)
            slot = PurePosixPath(self.settings.xvols).joinpath(*names[:slot_part])
            started = time.monotonic()
            self._stage(key, STAGE_PREPARE, started - began)
            ok = await self._mount_opened(
                obj, dvm, provider, request, staged, opened.fd, desired_key, before, slot
            )
            self.metrics.mounted(provider.name, ok, time.monotonic() - started)
            return ok
        finally:
            self._attempts.pop(key, None)
            opened.close()

    def _stage(self, key: Key, stage: str, seconds: float) -> None:
        self._stages.setdefault(key, []).append((stage, seconds))

    async def _mount_opened(
        self,
        obj: dict[str, Any],
        dvm: DynamicVolumeMount,
        provider: Provider,
        request: MountRequest,
        staged: MountRequest,
        target_fd: int,
        desired_key: str,
        before: tuple[MountEntry, ...],
        slot: PurePosixPath,
    ) -> bool:
        key = (dvm.namespace, dvm.name)
        target, staging = request.target, staged.target
        # The API writes (the finalizer; Mounting, when the mounter is slow) run while the
        # mounter starts: they are not on the path to the mount being usable.
        began = time.monotonic()
        mounting = asyncio.create_task(provider.mount(staged, self.host))
        conflict: APIConflict | None = None
        try:
            try:
                obj = await self._ensure_finalizer(obj, dvm)
            except APIConflict as exc:
                conflict = exc
            if _announces_mounting(obj):
                done, _ = await asyncio.wait({mounting}, timeout=MOUNTING_REPORT_AFTER)
                if not done:
                    message = f"mounting {dvm.spec.provider} at {target}"
                    obj = await self._report(obj, MountPhase.MOUNTING, "Mounting", message)
        except BaseException:
            mounting.cancel()
            with contextlib.suppress(BaseException):
                await mounting
            raise
        try:
            handle = await mounting
            self._stage(key, STAGE_MOUNTER, time.monotonic() - began)
        except MountFailed as failure:
            await self.host.unmount(staging, lazy=True)
            message = failure.message.replace(str(staging), str(target))
            message += await self._undo_strays(key, target, slot, before)
            log.warning(
                "mounting %s/%s failed: %s", *key, message, extra=_context(key, failure.reason)
            )
            await self._report(obj, MountPhase.FAILED, failure.reason, message)
            return False
        except OSError as exc:
            await self.host.unmount(staging, lazy=True)
            message = f"cannot mount at {target}: {exc}".replace(str(staging), str(target))
            message += await self._undo_strays(key, target, slot, before)
            await self._report(obj, MountPhase.FAILED, "MountFailed", message)
            return False
        attaching = time.monotonic()
        try:
            await self.host.attach(staging, target_fd, target)
        except OSError as exc:
            attach_error: str | None = str(exc)
        else:
            attach_error = None
        landing = self._landing(key, before, target, handle.fs_type, slot)
        self._stage(key, STAGE_ATTACH, time.monotonic() - attaching)
        if attach_error is not None or not landing.ok:
            for entry in landing.stray:
                await self.host.unmount(entry.path, lazy=True)
            with contextlib.suppress(OSError):
                await provider.unmount(handle, self.host)
            if handle.daemon is not None:
                await self.host.stop_daemon(handle.daemon, kill_after=2.0)
            message = (
                f"the mount of {target} did not land where planned: "
                f"{attach_error or landing.describe()}; it was undone"
            )
            log.warning("%s/%s: %s", *key, message)
            await self._report(obj, MountPhase.FAILED, REASON_UNSAFE, message)
            return False
        previous = self._owned.get(key)
        self._owned[key] = _Owned(
            key=key, desired_key=desired_key, target=target, provider=provider,
            request=request, handle=handle, slot=slot,
            repairs=previous.repairs if previous is not None else [],
        )  # fmt: skip
        stages = self._stages.pop(key, [])
        log.info("mounted %s/%s at %s (%s)", *key, target,
                 ", ".join(f"{name} {1000 * took:.1f} ms" for name, took in stages),
                 extra=_context(key, "Mounted"))  # fmt: skip
        for name, took in stages:
            self.metrics.stage(name, took)
        self._pod_event(obj, NORMAL, "Mounted", f"mounted {dvm.spec.provider} at "
                        f"{dvm.spec.mountpoint} (claim {dvm.spec.claim_name})")  # fmt: skip
        if conflict is not None:
            raise conflict  # the object changed: the next pass adds the finalizer
        await self._report(obj, MountPhase.MOUNTED, "Mounted", f"mounted at {target}",
                           mounted=True)  # fmt: skip
        return True

    @property
    def _staging_root(self) -> PurePosixPath:
        """Where providers mount before the agent attaches their mounts to the targets."""
        return PurePosixPath(self.settings.work_dir) / ".staging"

    def _other_targets(self, key: Key) -> set[PurePosixPath]:
        """Where other mounts of this agent are, or are being made (and staged)."""
        targets = {o.target for k, o in self._owned.items() if k != key}
        targets.update(o.target for k, old in self._retiring.items() if k != key for o in old)
        for other, paths in self._attempts.items():
            if other != key:
                targets.update(paths)
        return targets

    def _landing(
        self,
        key: Key,
        before: tuple[MountEntry, ...],
        target: PurePosixPath,
        fs_type: str,
        slot: PurePosixPath,
    ) -> Landing:
        """Where an attempt's mounts went, from the mount table now (see ``landing_of``)."""
        return landing_of(
            before, read_mount_table(), target=target, fs_type=fs_type,
            others=self._other_targets(key), shared_root=PurePosixPath(self.settings.xvols),
            own=slot,
        )  # fmt: skip

    async def _undo_strays(
        self, key: Key, target: PurePosixPath, slot: PurePosixPath, before: tuple[MountEntry, ...]
    ) -> str:
        """Lazily unmount what a failed attempt mounted anywhere but at its target (in its
        own slot, or outside --xvols); a note for the status message (empty if nothing).
        The mounter's type is not known after a failure: any new mount there counts."""
        landing = self._landing(key, before, target, "", slot)
        if not landing.stray:
            return ""
        for entry in landing.stray:
            log.warning("%s/%s: undoing a stray mount at %s", *key, entry.mount_point)
            await self.host.unmount(entry.path, lazy=True)
        places = ", ".join(sorted({e.mount_point for e in landing.stray}))
        return f" (a mount that appeared at {places} instead was undone)"

    def _repair_delay(self, key: Key) -> float:
        """0 for the first repairs; a growing delay when the mounter keeps dying."""
        owned = self._owned.get(key)
        if owned is None:
            return 0.0
        now = time.monotonic()
        recent = [t for t in owned.repairs if now - t < 60.0]
        owned.repairs = recent
        if len(recent) < 3:
            return 0.0
        wait = min(2.0 ** (len(recent) - 2), 60.0) - (now - recent[-1])
        return max(wait, 0.0)

    async def _repair(
        self,
        obj: dict[str, Any],
        dvm: DynamicVolumeMount,
        provider: Provider,
        request: MountRequest,
        desired_key: str,
    ) -> bool:
        key = (dvm.namespace, dvm.name)
        owned = self._owned.get(key)
        reason = owned.stale_reason if owned is not None else "the mount went stale"
        log.warning("repairing %s/%s: %s", *key, reason, extra=_context(key, "Repaired"))
        await self.host.unmount(request.target, lazy=True)
        if owned is not None:
            owned.repairs.append(time.monotonic())
            if owned.handle.daemon is not None:
                await self.host.stop_daemon(owned.handle.daemon, kill_after=2.0)
        # The entry stays stale until a remount succeeds (which replaces it): a failed one
        # is retried after the delay reconcile returns, not at the next mount table change.
        if not await self._mount(obj, dvm, provider, request, desired_key):
            return False
        current = self._cached(key) or obj
        status = dict(current.get("status") or {})
        count = int(status.get("repairCount", 0) or 0) + 1
        message = f"remounted at {request.target} because {reason}"
        condition = Condition(
            type=CONDITION_REPAIRED, status=ConditionStatus.TRUE, reason="Remounted",
            message=message, last_transition_time=_now(), observed_generation=dvm.generation,
        )  # fmt: skip
        conditions = _conditions(status)
        conditions = [x for x in conditions if x.type != CONDITION_REPAIRED] + [condition]
        await self._patch_status(current, {
            "repairCount": count,
            "lastRepairAt": _now().isoformat().replace("+00:00", "Z"),
            "conditions": [x.to_object() for x in conditions],
        })  # fmt: skip
        await self._event(current, "Repaired", message, "Warning")
        return True

    async def _unmount_owned(self, owned: _Owned) -> None:
        if self._owned.get(owned.key) is owned:
            del self._owned[owned.key]
        owned.released = True
        try:
            await owned.provider.unmount(owned.handle, self.host)
        except OSError as exc:
            log.warning("unmounting %s failed (%s); detaching it", owned.target, exc)
            await self.host.unmount(owned.target, lazy=True)
            if owned.handle.daemon is not None:
                await self.host.stop_daemon(owned.handle.daemon, kill_after=2.0)
        await asyncio.to_thread(self._remove_dirs, owned)
        if self._staging_root in owned.handle.target.parents:
            with contextlib.suppress(OSError):  # not empty: something is still mounted there
                await asyncio.to_thread(os.rmdir, owned.handle.target)
        log.info("unmounted %s/%s from %s", *owned.key, owned.target)
        self.metrics.unmounted(owned.provider.name)
        self._pod_event(self._cached(owned.key), NORMAL, "Unmounted",
                        f"unmounted {owned.provider.name} from {owned.target.name}")  # fmt: skip

    def _remove_dirs(self, owned: _Owned) -> None:
        """Remove the target directory, and the empty ones above it up to the slot (a
        moved mountpoint leaves nothing of the old one behind in the pod)."""
        root = PurePosixPath(self.settings.xvols)
        path = owned.target
        while remove_dir_below(root, path):
            path = path.parent
            if owned.slot is None or owned.slot not in path.parents:
                break

    async def _release(
        self,
        obj: dict[str, Any],
        dvm: DynamicVolumeMount,
        owned: _Owned | None,
        target: PurePosixPath | None,
    ) -> Outcome:
        """Unmount (deleted, or reassigned to another DMP) and drop our finalizer.

        A deleted mount still in use (a file open on it in a pod) is given the class's
        unmount grace period first, shown as phase Unmounting with reason ``FilesOpen``
        (docs/design.md §9.5); it is looked at again every second meanwhile.
        """
        key = (dvm.namespace, dvm.name)
        idle = owned is None and not self._retiring.get(key)
        if c.FINALIZER_MOUNT not in dvm.finalizers and idle:
            return DONE
        if dvm.deleting and (obj.get("status") or {}).get("phase") != MountPhase.UNMOUNTING:
            message = "unmounting: the DynamicVolumeMount is being deleted"
            obj = await self._report(obj, MountPhase.UNMOUNTING, "Unmounting", message)
        # The old mount of a moved mountpoint still draining keeps its own grace period.
        retiring: float | None = None
        if dvm.deleting:
            retiring = await self._drain_retiring(obj, dvm, lambda _: CAUSE_DELETED)
        else:
            await self._unmount_retiring(key)
        if owned is not None:
            if dvm.deleting:
                wait = await self._drain(obj, dvm, owned, cause=CAUSE_DELETED)
                if wait is not None:
                    return RequeueAfter(wait if retiring is None else min(wait, retiring))
            await self._unmount_owned(owned)
            if dvm.deleting:
                # Nothing will mount with these files again (the mounter's credentials
                # file among them); a stopped agent keeps them for the mount made anew.
                await asyncio.to_thread(shutil.rmtree, owned.request.work_dir, ignore_errors=True)
        elif (
            target is not None
            and not self._retiring.get(key)
            and target not in self._other_targets(key)
            and topmost_at(read_mount_table(), target) is not None
        ):
            # Never another object's mount: a second object naming the same target must
            # not be able to unmount it by going away.
            await self.host.unmount(target, lazy=True)
        if retiring is not None:
            return RequeueAfter(retiring)
        if c.FINALIZER_MOUNT in dvm.finalizers:
            remaining = [f for f in dvm.finalizers if f != c.FINALIZER_MOUNT]
            with contextlib.suppress(APINotFound):
                updated = await self._set_finalizers(dvm, remaining)
                self._remember(updated)
        self._failures.pop(key, None)
        return DONE

    async def _drain(
        self, obj: dict[str, Any], dvm: DynamicVolumeMount, owned: _Owned, *, cause: str
    ) -> float | None:
        """Unmount ``owned`` if nothing uses it; None once it may be unmounted now (it is
        idle, or the grace period is over), else the seconds until it is looked at again."""
        key = owned.key
        now = time.monotonic()
        if owned.drain_started is None:
            owned.drain_started = now
        started = owned.drain_started
        if owned.stale_reason and owned in self._retiring.get(key, ()):
            # Its mounter is gone: nothing it holds open can be completed any more.
            log.info("%s/%s: %s at %s; unmounting it", *key, owned.stale_reason, owned.target)
            return None
        # rclone uploads closed files in the background, and would drop an upload under
        # way if stopped: wait for its write cache first (the unmount makes it exit).
        pending = 0
        if owned.handle.fs_type == "fuse.rclone":
            cache = rclone_cache_dir(owned.request)
            pending = await asyncio.to_thread(pending_uploads, cache)
        if pending:
            reason, why = REASON_UPLOADS_PENDING, f"{pending} file(s) are still being uploaded"
        else:
            try:
                if await self.host.unmount_if_idle(owned.target):
                    return None
            except OSError as exc:  # e.g. stale: nothing to wait for, detach it
                log.info("%s/%s: %s; unmounting it at once", *key, exc)
                return None
            reason, why = REASON_FILES_OPEN, "files are still open on it"
        grace = await self._unmount_grace(dvm)
        left = started + grace - now
        if left <= 0:
            message = (
                f"{why} after the unmount grace period ({grace:g}s) of {owned.target}; it "
                "was unmounted and its mounter stopped"
            )
            log.warning("%s/%s: %s", *key, message)
            await self._event(obj, "UnmountGraceExpired", message, "Warning")
            return None
        if _ready_reason(obj.get("status") or {}) != reason:
            message = (
                f"unmounting: {cause}, and {why} "
                f"({owned.target}); the mounter is stopped once that is done, or after the "
                f"unmount grace period of {grace:g}s"
            )
            log.info("%s/%s: %s", *key, message)
            await self._report(obj, MountPhase.UNMOUNTING, reason, message)
        return min(DRAIN_INTERVAL, left)

    def _retire(self, owned: _Owned) -> None:
        """Keep ``owned`` (the old mount of a moved mountpoint) until its files are closed."""
        if self._owned.get(owned.key) is owned:
            del self._owned[owned.key]
        self._retiring.setdefault(owned.key, []).append(owned)

    async def _drain_retiring(
        self,
        obj: dict[str, Any],
        dvm: DynamicVolumeMount,
        cause: Callable[[_Owned], str],
        *,
        only: Callable[[_Owned], bool] | None = None,
    ) -> float | None:
        """Unmount each old mount of ``dvm``'s moved mountpoints (those ``only`` picks) whose
        files are closed or whose grace period is over; the seconds until the others are
        looked at again, or None once none is left."""
        key = (dvm.namespace, dvm.name)
        waits: list[float] = []
        for old in list(self._retiring.get(key, ())):
            if only is not None and not only(old):
                continue
            wait = await self._drain(self._cached(key) or obj, dvm, old, cause=cause(old))
            if wait is None:
                await self._unmount_retired(old)
            else:
                waits.append(wait)
        return min(waits) if waits else None

    async def _unmount_retired(self, old: _Owned) -> None:
        """Unmount an old mount of a moved mountpoint and remove its work directory."""
        retiring = self._retiring.get(old.key, [])
        if old in retiring:
            retiring.remove(old)
        if not retiring:
            self._retiring.pop(old.key, None)
        log.info("unmounting %s/%s at %s (Retired)", *old.key, old.target)
        await self._unmount_owned(old)
        current = self._owned.get(old.key)
        if current is None or current.request.work_dir != old.request.work_dir:
            await asyncio.to_thread(shutil.rmtree, old.request.work_dir, ignore_errors=True)

    async def _unmount_retiring(self, key: Key) -> None:
        """Unmount every old mount of ``key``'s moved mountpoints at once."""
        for old in list(self._retiring.get(key, ())):
            await self._unmount_retired(old)

    async def _unmount_grace(self, dvm: DynamicVolumeMount) -> float:
        """The class's unmount grace period (its default when the class cannot be read)."""
        try:
            raw = await self._get_class(dvm.spec.storage_provider_class)
            return StorageProviderClass.from_object(raw).unmount_grace
        except (APIError, InvalidObject):
            return float(c.DEFAULT_UNMOUNT_GRACE)

    async def _ensure_finalizer(
        self, obj: dict[str, Any], dvm: DynamicVolumeMount
    ) -> dict[str, Any]:
        if c.FINALIZER_MOUNT in dvm.finalizers:
            return obj
        updated = await self._set_finalizers(dvm, [*dvm.finalizers, c.FINALIZER_MOUNT])
        self._remember(updated)
        return updated

    async def _set_finalizers(self, dvm: DynamicVolumeMount, finalizers: list[str]) -> Obj:
        """Replace the finalizers, if the object is still at the version read.

        :raises APIConflict: it changed meanwhile (read it again and retry).
        """
        patch = {"metadata": {"finalizers": finalizers, "resourceVersion": dvm.resource_version}}
        updated: Obj = await self.client.patch(MOUNTS, dvm.name, patch, namespace=dvm.namespace)
        return updated

    # -- reporting --------------------------------------------------------------------------

    async def _report(
        self,
        obj: dict[str, Any],
        phase: MountPhase,
        reason: str,
        message: str,
        *,
        mounted: bool = False,
    ) -> dict[str, Any]:
        """Write phase, message and the Ready condition; returns the updated object."""
        status = dict(obj.get("status") or {})
        generation = int(obj.get("metadata", {}).get("generation", 0) or 0)
        ready = ConditionStatus.TRUE if phase == MountPhase.MOUNTED else ConditionStatus.FALSE
        if phase in (MountPhase.MOUNTING, MountPhase.UNMOUNTING):
            ready = ConditionStatus.UNKNOWN if phase == MountPhase.MOUNTING else ready
        condition = Condition(
            type=CONDITION_READY, status=ready, reason=_reason(reason), message=message[:4000],
            last_transition_time=_now(), observed_generation=generation,
        )  # fmt: skip
        conditions = set_condition(_conditions(status), condition)
        patch: dict[str, Any] = {
            "phase": str(phase),
            "message": message[:4000],
            "observedGeneration": generation,
            "conditions": [x.to_object() for x in conditions],
        }
        if mounted:
            patch["mountedAt"] = _now().isoformat().replace("+00:00", "Z")
        if phase == MountPhase.FAILED:
            self.metrics.failed(_reason(reason))
        if phase == MountPhase.FAILED and status.get("message") != patch["message"]:
            await self._event(obj, _reason(reason), message, "Warning")
            self._pod_event(obj, WARNING, _reason(reason), message)
        return await self._patch_status(obj, patch)

    async def _patch_status(self, obj: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj.get("metadata", {})
        try:
            updated = await self.client.patch(
                MOUNTS, meta["name"], {"status": dict(patch)},
                namespace=meta["namespace"], subresource="status",
            )  # fmt: skip
        except APINotFound:
            return obj
        except APIError as exc:
            log.warning("cannot report status of %s/%s: %s", meta.get("namespace"),
                        meta.get("name"), exc)  # fmt: skip
            return obj
        self._remember(updated)
        result: dict[str, Any] = updated
        return result

    async def _event(self, obj: dict[str, Any], reason: str, message: str, type_: str) -> None:
        # Written in the background, aggregated with its repeats; never fails a reconcile.
        try:
            self.recorder.record(obj, type_, reason, message)
        except ValueError as exc:
            log.debug("cannot record Event %s: %s", reason, exc)

    def _pod_event(self, obj: Mapping[str, Any] | None, type_: str, reason: str, msg: str) -> None:
        """An Event on the user pod a DynamicVolumeMount serves (mount, unmount, failure)."""
        spec = (obj or {}).get("spec") or {}
        namespace = (obj or {}).get("metadata", {}).get("namespace")
        if not (spec.get("podName") and spec.get("podUID") and namespace):
            return
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": spec["podName"], "namespace": namespace, "uid": spec["podUID"]}}  # fmt: skip
        with contextlib.suppress(ValueError):
            self.recorder.record(pod, type_, reason, msg)

    async def _report_stopped(self, key: Key) -> None:
        obj = self._cached(key)
        if obj is not None:
            with contextlib.suppress(APIError, asyncio.TimeoutError):
                await asyncio.wait_for(self._report(
                    obj, MountPhase.PENDING, "MountPodStopped",
                    "the Dynamic Mount Pod stopped and unmounted this volume; it is mounted "
                    "again when the mount pod runs again",
                ), 5.0)  # fmt: skip


def _mount_dir_name(dvm: DynamicVolumeMount, target: PurePosixPath) -> str:
    """The name of a mount's work and staging directories: one per object, target and
    configuration, so that two mounts of one object (a moved mountpoint, mounted before
    the old one goes) never share a mounter's files or cache, and a mount made again with
    the same spec (after a restart) finds its files where they were."""
    spec = dvm.spec
    return (
        f"{dvm.uid or dvm.name}-"
        + _digest(str(target), spec.provider, thaw_json(spec.config), spec.read_only)[:12]
    )


def _announces_mounting(obj: dict[str, Any]) -> bool:
    """Whether a mount attempt should first report phase Mounting.

    Not when it is already Mounting, and not when this attempt retries a spec that already
    failed: the object keeps phase Failed with the last error (as a crash-looping container
    keeps its last error) instead of flapping between Failed and Mounting on every retry.
    """
    status = obj.get("status") or {}
    phase = status.get("phase")
    if phase == MountPhase.MOUNTING:
        return False
    generation = obj.get("metadata", {}).get("generation")
    return not (phase == MountPhase.FAILED and status.get("observedGeneration") == generation)


def _ready_reason(status: Mapping[str, Any]) -> str:
    for condition in _conditions(status):
        if condition.type == CONDITION_READY:
            return condition.reason
    return ""


def _reason(text: str) -> str:
    word = "".join(ch for ch in text if ch.isalnum())
    return word if word and word[0].isalpha() else "MountFailed"


def _conditions(status: Mapping[str, Any]) -> list[Condition]:
    result = []
    for raw in status.get("conditions") or []:
        with contextlib.suppress(InvalidObject):
            result.append(Condition.from_object(raw))
    return result


def _context(key: Key, reason: str) -> dict[str, str]:
    """Structured-log fields (``--log-format json``) of a log line about ``key``."""
    return {"namespace": key[0], "object_name": key[1], "reason": reason}


def _within(path: PurePosixPath, base: PurePosixPath) -> bool:
    return path == base or base in path.parents


def _moved(old: PurePosixPath, new: PurePosixPath, *, mounted: bool | None = None) -> str:
    """Why the old mount of a moved mountpoint is to be unmounted, for the Unmounting
    message; ``mounted`` says whether the new one serves already (None: it failed)."""
    if mounted is None:
        return f"the mountpoint moved from {old} to {new} (which could not be mounted)"
    if mounted:
        return f"the mountpoint moved from {old} to {new} (mounted there already)"
    return f"the mountpoint moved from {old} to {new} (mounted there once the old one is gone)"


async def run(
    settings: Settings,
    *,
    kubeconfig: str | None,
    registry: ProviderRegistry,
    metrics: Metrics | None = None,
    on_started: Callable[[], None] | None = None,
) -> int:
    """Run the agent until SIGTERM/SIGINT; the second signal exits at once.

    ``metrics`` is the process's (served by the shell); ``on_started`` is called once the
    agent watches (readiness).
    """
    client = await Client.from_kubeconfig(kubeconfig, user_agent=COMPONENT, metrics=metrics)
    agent = Agent(settings=settings, client=client, registry=registry)

    async def start() -> None:
        await agent.start()
        if on_started is not None:
            on_started()
        log.info("DMP %s watching %s", settings.name, agent.label_selector)

    async def close() -> None:
        try:
            await agent.stop_serving()
            log.info("stopping: unmounting everything this mount pod owns")
            await agent.close()
        finally:
            await client.close()

    try:
        await run_until_signalled(start, close)
    except (RuntimeError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0
