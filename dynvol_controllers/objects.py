"""Small helpers over raw API objects: slimming transforms, indexes, owner references.

Informers (:mod:`.watching`) apply the ``slim_*`` transforms so a cache of thousands of pods
stays small: only the fields dynvol reads are kept. Reconcilers use the accessors.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from dynvol_core import constants as c
from dynvol_core.errors import InvalidObject
from dynvol_core.models import InjectedVolume, PodInfo
from dynvol_kube import Event, Informer, Obj

log = logging.getLogger(__name__)

__all__ = [
    "controller_ref",
    "injected_class",
    "injected_policy",
    "is_terminated",
    "owner_ref",
    "slim_dvm",
    "slim_metadata",
    "slim_object",
    "slim_pod",
]

_KEEP_META = (
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "labels",
    "deletionTimestamp",
    "creationTimestamp",
    "ownerReferences",
    "finalizers",
)


def slim_metadata(meta: Mapping[str, Any], *, annotations: Iterable[str] = ()) -> dict[str, Any]:
    """``metadata`` with only the fields reconcilers read (and the listed annotations)."""
    out = {k: meta[k] for k in _KEEP_META if k in meta}
    wanted = set(annotations)
    if wanted:
        kept = {k: v for k, v in (meta.get("annotations") or {}).items() if k in wanted}
        if kept:
            out["annotations"] = kept
    return out


_POD_ANNOTATIONS = (
    c.ANNOTATION_STORAGE_PROVIDER_CLASS,
    c.ANNOTATION_MOUNT_PATH_ROOT,
    c.ANNOTATION_DISPATCH_POLICY,
)


def slim_pod(pod: Obj) -> Obj:
    """A pod reduced to identity, labels, dynvol annotations, node, phase and our volume."""
    spec = pod.get("spec") or {}
    volumes = [v for v in spec.get("volumes") or () if v.get("name") == c.VOLUME_NAME]
    out_spec: dict[str, Any] = {}
    if spec.get("nodeName"):
        out_spec["nodeName"] = spec["nodeName"]
    if volumes:
        out_spec["volumes"] = volumes
    status = pod.get("status") or {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": slim_metadata(pod.get("metadata") or {}, annotations=_POD_ANNOTATIONS),
        "spec": out_spec,
        "status": {"phase": status["phase"]} if "phase" in status else {},
    }


def slim_object(obj: Obj) -> Obj:
    """An object with its metadata slimmed (no managedFields), for objects whose spec and
    status are small already: DynamicVolumeMounts, claim slices."""
    return {**obj, "metadata": slim_metadata(obj.get("metadata") or {})}


slim_dvm = slim_object


_STATUS_SPEC = (
    "claimName",
    "claimUID",
    "podName",
    "podUID",
    "nodeName",
    "dmpName",
    "storageProviderClass",
    "mountpoint",
)


def slim_dvm_for_status(dvm: Obj) -> Obj:
    """A DynamicVolumeMount reduced to what claim status aggregation reads."""
    spec = dvm.get("spec") or {}
    status = dvm.get("status") or {}
    return {
        "apiVersion": dvm.get("apiVersion"),
        "kind": dvm.get("kind"),
        "metadata": slim_metadata(
            {
                k: v
                for k, v in (dvm.get("metadata") or {}).items()
                if k not in ("labels", "ownerReferences", "finalizers")
            }
        ),
        "spec": {k: spec[k] for k in _STATUS_SPEC if k in spec},
        "status": {k: status[k] for k in ("phase", "message") if k in status},
    }


def pod_info(pod: Mapping[str, Any]) -> PodInfo | None:
    """The core's reading of ``pod`` (:meth:`PodInfo.from_object`, the one pod reader), or
    None if it refuses the pod (e.g. a malformed dynvol volume)."""
    try:
        return PodInfo.from_object(pod)
    except InvalidObject:
        return None


def injected_volume(pod: Mapping[str, Any]) -> InjectedVolume | None:
    """The dynvol CSI volume of a pod, if the webhook injected it (and it is well-formed)."""
    info = pod_info(pod)
    return info.volume if info is not None else None


def injected_class(pod: Mapping[str, Any]) -> str | None:
    """The StorageProviderClass named by the pod's injected volume."""
    volume = injected_volume(pod)
    return volume.class_name if volume is not None and volume.class_name else None


def injected_policy(pod: Mapping[str, Any]) -> str:
    """The dispatch policy named by the pod's injected volume (default independent)."""
    volume = injected_volume(pod)
    return volume.policy if volume is not None else c.POLICY_INDEPENDENT


def is_terminated(pod: Mapping[str, Any]) -> bool:
    """A pod that finished (Succeeded/Failed) will never run containers again."""
    info = pod_info(pod)
    return info is not None and info.terminal


def is_deleting(obj: Mapping[str, Any]) -> bool:
    """Whether the object has a deletionTimestamp."""
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def owner_ref(obj: Mapping[str, Any], *, controller: bool = False) -> dict[str, Any]:
    """An ownerReference to ``obj`` (blockOwnerDeletion off: we never need foreground GC)."""
    meta = obj["metadata"]
    ref: dict[str, Any] = {
        "apiVersion": obj.get("apiVersion", "v1"),
        "kind": obj.get("kind", ""),
        "name": meta["name"],
        "uid": meta["uid"],
    }
    if controller:
        ref["controller"] = True
    return ref


def controller_ref(obj: Mapping[str, Any]) -> dict[str, Any]:
    """An ownerReference marking ``obj`` as the controller."""
    return owner_ref(obj, controller=True)


def now() -> str:
    """metav1.Time for now."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


__all__ += ["injected_volume", "is_deleting", "now", "pod_info"]


class ModelCache:
    """Parsed core models of cached objects, memoised by (uid, resourceVersion).

    Reconcilers re-read the same objects on every pass; parsing each once per revision
    keeps a pass over thousands of pods cheap. Invalid objects memoise their error.

    Parser errors are never swallowed: each revision the parser refuses is logged once
    and counted (``invalid``: an :class:`InvalidObject`, i.e. bad input; ``failures``:
    anything else, i.e. a parser bug, logged with its traceback), and :meth:`errors`
    lists the objects currently refused and why, so an object that "vanished" from a
    reconciler's view can be explained.
    """

    def __init__(self, parse: Any, *, size: int = 50_000) -> None:
        self._parse = parse
        self._size = size
        self._items: dict[tuple[str, str], Any] = {}
        self._what = getattr(parse, "__qualname__", repr(parse)).removesuffix(".from_object")
        #: Revisions the parser refused as invalid input (InvalidObject).
        self.invalid = 0
        #: Revisions on which the parser raised anything else: a bug in the parser.
        self.failures = 0
        self._errors: dict[str, BaseException] = {}

    @property
    def parse_errors(self) -> int:
        """Every revision the parser refused or failed on (``invalid + failures``)."""
        return self.invalid + self.failures

    def errors(self) -> dict[str, str]:
        """``namespace/name`` -> why the parser refuses its latest cached revision."""
        return {key: f"{type(exc).__name__}: {exc}" for key, exc in self._errors.items()}

    def get(self, obj: Mapping[str, Any]) -> Any:
        """The model of ``obj``; raises the parser's error (memoised) if it is invalid."""
        meta = obj.get("metadata") or {}
        key = (meta.get("uid") or meta.get("name", ""), meta.get("resourceVersion", ""))
        hit = self._items.get(key)
        if hit is None:
            name = "/".join(str(p) for p in (meta.get("namespace"), meta.get("name")) if p)
            try:
                hit = (True, self._parse(obj))
                self._errors.pop(name, None)
            except InvalidObject as exc:
                self.invalid += 1
                log.warning("%s %s is invalid and is ignored: %s", self._what, name, exc)
                hit = (False, exc)
            except Exception as exc:
                self.failures += 1
                log.error("parsing %s %s failed (a bug)", self._what, name, exc_info=True)
                hit = (False, exc)
            if not hit[0]:
                if len(self._errors) >= self._size:
                    self._errors.pop(next(iter(self._errors)))
                self._errors[name] = hit[1]
            if len(self._items) >= self._size:
                # Drop the oldest half; revisions superseded long ago go first.
                for old in list(self._items)[: self._size // 2]:
                    del self._items[old]
            self._items[key] = hit
        ok, value = hit
        if not ok:
            raise value
        return value

    def get_or_none(self, obj: Mapping[str, Any]) -> Any:
        """The model of ``obj``, or None if the parser refused it (logged and counted)."""
        try:
            return self.get(obj)
        except Exception:
            return None


__all__ += ["ModelCache"]


class NamespacePods:
    """The parsed pods of each namespace of a pod cache, kept until a pod there changes.

    Claims are reconciled far more often than their pods change (each mount's status
    reaches its claim), and parsing every pod of the namespace on each of those passes was
    most of the controller's CPU at scale. Call it with a namespace; :meth:`epoch` counts
    the pod events seen in a namespace, for callers that keep results derived from them.
    """

    def __init__(self, pods: Informer, models: ModelCache) -> None:
        self._pods = pods
        self._models = models
        self._epochs: dict[str, int] = {}
        self._parsed: dict[str, tuple[int, list[PodInfo]]] = {}
        pods.add_handler(self._changed)

    def _changed(self, event: Event) -> None:
        for obj in (event.obj, event.old):
            if obj:
                ns = obj["metadata"].get("namespace", "")
                self._epochs[ns] = self._epochs.get(ns, 0) + 1

    def epoch(self, namespace: str) -> int:
        return self._epochs.get(namespace, 0)

    def __call__(self, namespace: str) -> list[PodInfo]:
        """The parsed pods of ``namespace`` (malformed ones left out); do not change it."""
        epoch = self.epoch(namespace)
        hit = self._parsed.get(namespace)
        if hit is not None and hit[0] == epoch:
            return hit[1]
        pods = [
            info
            for raw in self._pods.store.by_index("namespace", namespace)
            if (info := self._models.get_or_none(raw)) is not None
        ]
        self._parsed[namespace] = (epoch, pods)
        return pods


__all__ += ["NamespacePods"]
