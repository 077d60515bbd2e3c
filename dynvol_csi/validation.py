"""Validation of CSI Node requests, before anything on the host is touched.

Each ``*.from_message`` constructor checks every field of a wire request and either returns
a plain value the rest of the plugin can trust, or raises
:class:`~dynvol_core.errors.InvalidObject` listing every problem at once (the node service
answers INVALID_ARGUMENT with that text). Pure: no I/O, so it is unit-tested directly.

Neighbours: ``node`` (calls these), ``volumes`` (acts on the values).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import PurePosixPath
from typing import Final

import attrs
import betterproto

from dynvol_core.constants import (
    CSI_CTX_EPHEMERAL,
    CSI_CTX_POD_NAME,
    CSI_CTX_POD_NAMESPACE,
    CSI_CTX_POD_UID,
    DRIVER_NAME,
    POLICY_INDEPENDENT,
    POLICY_SHARED,
    VOLUME_ATTR_CLASS,
    VOLUME_ATTR_POLICY,
)
from dynvol_core.errors import FieldError, InvalidObject, InvalidPath
from dynvol_core.paths import path_is_within, validate_class_name, validate_uid, validate_volume_id
from dynvol_csi._proto.csi import v1 as csi

__all__ = ["PublishRequest", "StatsRequest", "UnpublishRequest"]

_DNS1123_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN: Final = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)
_PATH_MAX: Final = 4095


def _ctx(key: str) -> str:
    return f"volume_context[{key}]"


def _check_volume_id(volume_id: str, errors: list[FieldError]) -> None:
    if not volume_id:
        errors.append(FieldError("volume_id", "is required"))
        return
    try:
        validate_volume_id(volume_id)
    except InvalidPath as exc:
        errors.append(FieldError("volume_id", str(exc)))


def _normalised_absolute(field: str, text: str, errors: list[FieldError]) -> PurePosixPath | None:
    """``text`` as a path if it is absolute and already normalised; otherwise record why not."""
    if not text:
        errors.append(FieldError(field, "is required"))
        return None
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        errors.append(FieldError(field, f"{text!r} contains a NUL or other control character"))
        return None
    if not text.startswith("/"):
        errors.append(FieldError(field, f"{text!r} must be an absolute path"))
        return None
    if ".." in text.split("/"):
        errors.append(FieldError(field, f"{text!r} must not contain '..' (path traversal)"))
        return None
    if posixpath.normpath(text) != text or text.startswith("//"):
        errors.append(
            FieldError(
                field,
                f"{text!r} must be a normalised path (no '.', repeated or trailing '/'); "
                f"did you mean {posixpath.normpath(text)!r}?",
            )
        )
        return None
    if len(text.encode("utf-8", "surrogatepass")) > _PATH_MAX:
        errors.append(FieldError(field, f"is longer than {_PATH_MAX} bytes"))
        return None
    return PurePosixPath(text)


def _check_under(
    field: str, path: PurePosixPath, base: PurePosixPath, errors: list[FieldError]
) -> bool:
    if path == base or not path_is_within(path, base):
        errors.append(
            FieldError(
                field,
                f"{str(path)!r} is outside {str(base)!r}; the node plugin only publishes into "
                "kubelet's own pod volume directories (check --kubelet-dir)",
            )
        )
        return False
    return True


def _pod_volumes_dir(kubelet_dir: PurePosixPath, pod_uid: str) -> PurePosixPath:
    return kubelet_dir / "pods" / pod_uid / "volumes"


@attrs.frozen(kw_only=True)
class PublishRequest:
    """A validated NodePublishVolume for one of dynvol's ephemeral inline volumes."""

    volume_id: str
    target_path: PurePosixPath
    pod_uid: str
    pod_name: str
    pod_namespace: str
    class_name: str
    policy: str
    read_only: bool

    @classmethod
    def from_message(
        cls, msg: csi.NodePublishVolumeRequest, *, kubelet_dir: PurePosixPath
    ) -> PublishRequest:
        """Validate ``msg`` against kubelet's directory ``kubelet_dir``.

        :raises InvalidObject: listing every invalid or missing field.
        """
        errors: list[FieldError] = []
        _check_volume_id(msg.volume_id, errors)
        target = _normalised_absolute("target_path", msg.target_path, errors)

        if not betterproto.serialized_on_wire(msg.volume_capability):
            errors.append(FieldError("volume_capability", "is required"))
        elif betterproto.which_one_of(msg.volume_capability, "access_type")[0] == "block":
            errors.append(
                FieldError(
                    "volume_capability",
                    "block access is not supported: dynvol volumes are directories "
                    "(use a mount/filesystem volume)",
                )
            )

        context = msg.volume_context
        if context.get(CSI_CTX_EPHEMERAL) != "true":
            errors.append(
                FieldError(
                    _ctx(CSI_CTX_EPHEMERAL),
                    f"must be 'true', not {context.get(CSI_CTX_EPHEMERAL)!r}: {DRIVER_NAME} "
                    "only serves CSI ephemeral inline volumes (a 'csi:' volume in the pod "
                    "spec; its CSIDriver needs volumeLifecycleModes: [Ephemeral] and "
                    "podInfoOnMount: true)",
                )
            )

        pod_uid = context.get(CSI_CTX_POD_UID, "")
        pod_uid_ok = False
        if not pod_uid:
            errors.append(
                FieldError(_ctx(CSI_CTX_POD_UID), "is required (set podInfoOnMount: true)")
            )
        else:
            try:
                validate_uid(pod_uid, what="pod UID")
                pod_uid_ok = True
            except InvalidPath as exc:
                errors.append(FieldError(_ctx(CSI_CTX_POD_UID), str(exc)))

        pod_name = context.get(CSI_CTX_POD_NAME, "")
        if not pod_name:
            errors.append(FieldError(_ctx(CSI_CTX_POD_NAME), "is required"))
        elif len(pod_name) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(pod_name):
            errors.append(
                FieldError(_ctx(CSI_CTX_POD_NAME), f"{pod_name!r} is not a valid pod name")
            )

        pod_namespace = context.get(CSI_CTX_POD_NAMESPACE, "")
        if not pod_namespace:
            errors.append(FieldError(_ctx(CSI_CTX_POD_NAMESPACE), "is required"))
        elif len(pod_namespace) > 63 or not _DNS1123_LABEL.fullmatch(pod_namespace):
            errors.append(
                FieldError(
                    _ctx(CSI_CTX_POD_NAMESPACE), f"{pod_namespace!r} is not a valid namespace"
                )
            )

        class_name = context.get(VOLUME_ATTR_CLASS, "")
        if not class_name:
            errors.append(
                FieldError(
                    _ctx(VOLUME_ATTR_CLASS),
                    "is required: the volumeAttributes must name the StorageProviderClass",
                )
            )
        else:
            try:
                validate_class_name(class_name)
            except InvalidPath as exc:
                errors.append(FieldError(_ctx(VOLUME_ATTR_CLASS), str(exc)))

        # The webhook always sets the policy; a hand-written volume may leave it out, and
        # then gets the documented default.
        policy = context.get(VOLUME_ATTR_POLICY, POLICY_INDEPENDENT)
        if policy not in (POLICY_INDEPENDENT, POLICY_SHARED):
            errors.append(
                FieldError(
                    _ctx(VOLUME_ATTR_POLICY),
                    f"unknown mount pod dispatch policy {policy!r}: use "
                    f"{POLICY_INDEPENDENT!r} or {POLICY_SHARED!r}",
                )
            )

        inside_kubelet = target is not None and _check_under(
            "target_path", target, kubelet_dir, errors
        )
        if inside_kubelet and pod_uid_ok:
            assert target is not None
            pod_dir = _pod_volumes_dir(kubelet_dir, pod_uid)
            if target == pod_dir or not path_is_within(target, pod_dir):
                errors.append(
                    FieldError(
                        "target_path",
                        f"{str(target)!r} is not inside {str(pod_dir)!r}, the volume "
                        f"directory of pod {pod_uid} named in the volume context",
                    )
                )

        if errors:
            raise InvalidObject(errors, kind="NodePublishVolumeRequest", name=msg.volume_id)
        assert target is not None  # every path that leaves it None records an error
        return cls(
            volume_id=msg.volume_id,
            target_path=target,
            pod_uid=pod_uid,
            pod_name=pod_name,
            pod_namespace=pod_namespace,
            class_name=class_name,
            policy=policy,
            read_only=bool(msg.readonly),
        )


@attrs.frozen
class UnpublishRequest:
    """A validated NodeUnpublishVolume."""

    volume_id: str
    target_path: PurePosixPath

    @classmethod
    def from_message(
        cls, msg: csi.NodeUnpublishVolumeRequest, *, kubelet_dir: PurePosixPath
    ) -> UnpublishRequest:
        """Validate ``msg``.

        :raises InvalidObject: listing every invalid or missing field.
        """
        errors: list[FieldError] = []
        _check_volume_id(msg.volume_id, errors)
        target = _normalised_absolute("target_path", msg.target_path, errors)
        if target is not None:
            _check_under("target_path", target, kubelet_dir, errors)
        if errors:
            raise InvalidObject(errors, kind="NodeUnpublishVolumeRequest", name=msg.volume_id)
        assert target is not None
        return cls(msg.volume_id, target)


@attrs.frozen
class StatsRequest:
    """A validated NodeGetVolumeStats.

    The path is only compared with where the volume is published, never used to open
    anything, so it is merely required to be present.
    """

    volume_id: str
    volume_path: str

    @classmethod
    def from_message(cls, msg: csi.NodeGetVolumeStatsRequest) -> StatsRequest:
        """Validate ``msg``.

        :raises InvalidObject: listing every invalid or missing field.
        """
        errors: list[FieldError] = []
        if not msg.volume_id:
            errors.append(FieldError("volume_id", "is required"))
        if not msg.volume_path:
            errors.append(FieldError("volume_path", "is required"))
        if errors:
            raise InvalidObject(errors, kind="NodeGetVolumeStatsRequest", name=msg.volume_id)
        return cls(msg.volume_id, msg.volume_path)
