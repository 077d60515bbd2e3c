"""Pods as dynvol reads them: identity, labels, dynvol annotations, node, phase, volume,
tolerations.

This is the one reader of pod fields: the controllers, the node plugin and the DMP all go
through :meth:`PodInfo.from_object`.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from dynvol_core import constants as c
from dynvol_core.errors import FieldError
from dynvol_core.models.fields import Fields, raise_if_errors, read_meta, top_object
from dynvol_core.models.freezing import FrozenMap, str_map_of
from dynvol_core.models.tolerations import Toleration
from dynvol_core.validation import check_dns1123_subdomain

__all__ = ["InjectedVolume", "PodInfo"]


@attrs.frozen
class InjectedVolume:
    """The dynvol CSI inline volume the webhook put into a pod."""

    class_name: str
    policy: str = c.POLICY_INDEPENDENT


_TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


@attrs.frozen(kw_only=True)
class PodInfo:
    """What dynvol needs to know about a pod (a user pod, or a DMP)."""

    namespace: str
    name: str
    uid: str
    node_name: str | None = None
    labels: FrozenMap[str, str] = attrs.field(factory=FrozenMap, converter=str_map_of)
    annotations: FrozenMap[str, str] = attrs.field(factory=FrozenMap, converter=str_map_of)
    phase: str = "Pending"
    deleting: bool = False
    volume: InjectedVolume | None = None
    tolerations: tuple[Toleration, ...] = ()
    #: A container of the pod crash-loops: kubelet waits before it starts it again
    #: (:func:`container_crash_looping`).
    crash_looping: bool = False
    #: ... and that container is not running: it has exited and waits out its back-off (so
    #: nothing of the pod runs that a deletion would have to stop).
    crashed_and_stopped: bool = False

    @classmethod
    def from_object(cls, obj: object) -> PodInfo:
        """Read a Pod.

        Pods are not dynvol's to validate, except for the dynvol volume, whose attributes end
        up in host paths, and the tolerations, which the pod's DMP inherits:
        :raises InvalidObject: if they are malformed.
        """
        top = top_object(obj, "Pod")
        errors: list[FieldError] = []
        meta = read_meta(top, errors, namespaced=True)
        spec = Fields(top.get("spec"), "spec", errors)
        status = Fields(top.get("status"), "status", errors)
        volume = _read_injected_volume(spec, errors)
        tolerations = _read_tolerations(spec, errors)
        raise_if_errors(errors, "Pod", top)
        return cls(
            namespace=meta.namespace,
            name=meta.name,
            uid=meta.uid,
            node_name=spec.string("nodeName") or None,
            labels=meta.labels,
            annotations=meta.annotations,
            phase=status.string("phase", default="Pending"),
            deleting=meta.deleting,
            volume=volume,
            tolerations=tolerations,
            crash_looping=_crash_looping(status.obj),
            crashed_and_stopped=_crash_looping(status.obj, stopped=True),
        )

    @property
    def storage_provider_class_annotation(self) -> str | None:
        """The class the pod asked for by annotation (the volume is what counts, though)."""
        return self.annotations.get(c.ANNOTATION_STORAGE_PROVIDER_CLASS)

    @property
    def mount_path_root(self) -> str | None:
        """Where in its containers the pod wants dynamic volumes (annotation)."""
        return self.annotations.get(c.ANNOTATION_MOUNT_PATH_ROOT)

    @property
    def dispatch_policy_annotation(self) -> str | None:
        """The dispatch policy the pod asked for by annotation, if any."""
        return self.annotations.get(c.ANNOTATION_DISPATCH_POLICY)

    @property
    def opted_in(self) -> bool:
        """Whether the pod carries the dynvol volume (the only way a mount can reach it)."""
        return self.volume is not None

    @property
    def terminal(self) -> bool:
        """Whether the pod has finished (Succeeded or Failed) and will not run again."""
        return self.phase in _TERMINAL_PHASES

    @property
    def eligible(self) -> bool:
        """Whether dynvol should mount into this pod: opted in, on a node, alive."""
        return (
            self.opted_in
            and self.node_name is not None
            and not self.deleting
            and not (self.terminal)
        )


def _crash_looping(status: Mapping[str, object], *, stopped: bool = False) -> bool:
    """Whether a container of the pod crash-loops (see :func:`container_crash_looping`);
    with ``stopped``, one that has exited and is not being started again right now."""
    statuses = status.get("containerStatuses")
    if not isinstance(statuses, list):
        return False
    return any(
        isinstance(s, Mapping)
        and container_crash_looping(s)
        and (not stopped or isinstance(_state(s).get("terminated"), Mapping))
        for s in statuses
    )


def _state(status: Mapping[str, object]) -> Mapping[str, object]:
    state = status.get("state")
    return state if isinstance(state, Mapping) else {}


def container_crash_looping(status: Mapping[str, object]) -> bool:
    """Whether kubelet will start this container (one entry of ``containerStatuses``) again
    only after a back-off: it waits in CrashLoopBackOff, or it has exited after having been
    restarted already (kubelet restarts a container at once only after its first exit, and
    reports the back-off only when it is over). The status is kubelet's: read leniently."""
    state = status.get("state")
    if not isinstance(state, Mapping):
        return False
    waiting = state.get("waiting")
    if isinstance(waiting, Mapping) and waiting.get("reason") == c.CRASH_LOOP_BACK_OFF:
        return True
    restarts = status.get("restartCount")
    return (
        isinstance(state.get("terminated"), Mapping)
        and isinstance(restarts, int)
        and not isinstance(restarts, bool)
        and restarts >= 1
    )


def _read_tolerations(spec: Fields, errors: list[FieldError]) -> tuple[Toleration, ...]:
    raw = spec.obj.get("tolerations")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        spec.error("tolerations", "must be a list")
        return ()
    read = (Toleration.read(t, f"{spec.at('tolerations')}[{i}]", errors) for i, t in enumerate(raw))
    return tuple(t for t in read if t is not None)


def _read_injected_volume(spec: Fields, errors: list[FieldError]) -> InjectedVolume | None:
    volumes = spec.obj.get("volumes") or []
    if not isinstance(volumes, list):
        return None
    for i, volume in enumerate(volumes):
        if not isinstance(volume, Mapping) or volume.get("name") != c.VOLUME_NAME:
            continue
        csi = volume.get("csi")
        if not isinstance(csi, Mapping) or csi.get("driver") != c.DRIVER_NAME:
            return None
        path = f"spec.volumes[{i}].csi.volumeAttributes"
        attrs_ = Fields(csi.get("volumeAttributes"), path, errors)
        class_name = attrs_.string(c.VOLUME_ATTR_CLASS, required=True)
        if class_name:
            attrs_.check(check_dns1123_subdomain(class_name, attrs_.at(c.VOLUME_ATTR_CLASS)))
        policy = attrs_.string(c.VOLUME_ATTR_POLICY, default=c.POLICY_INDEPENDENT)
        if policy not in c.POLICIES:
            attrs_.error(
                c.VOLUME_ATTR_POLICY, f"must be {c.POLICY_INDEPENDENT} or {c.POLICY_SHARED}"
            )
        return InjectedVolume(class_name=class_name, policy=policy)
    return None
