"""Host path layout of the node plugin: slots, class directories, records, DMP views.

Everything under the node root is derived here, from validated components only, so that no
user-controlled string (a class name, a pod UID, a claim's mountpoint) can make a path that
leaves its slot. Neighbours: ``records`` persists the slot a volume was given,
``mountplans`` plans mounts at targets built by :meth:`PodSlot.target`, and the CSI node
plugin and the DMP agent turn those paths into real mounts.

Layout under the node root (``root``)::

    root/xvols/<class>/<slot-uuid>/<podUID>     a pod's slot (bound onto kubelet's target)
    root/state/volumes/<volume_id>.json         the node plugin's record of a volume
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Final, Literal

import attrs

from dynvol_core.constants import DEFAULT_ROOT, DMP_XVOLS_DIR, POLICY_INDEPENDENT, POLICY_SHARED
from dynvol_core.errors import FieldError, InvalidPath
from dynvol_core.validation import check_dns1123_subdomain, check_mountpoint, has_control_chars

__all__ = [
    "DEFAULT_DMP_ROOT",
    "DispatchPolicy",
    "PodSlot",
    "XvolsLayout",
    "components_below",
    "path_is_within",
    "validate_class_name",
    "validate_uid",
    "validate_volume_id",
]

DispatchPolicy = Literal["independent", "shared"]

#: Where the DMP sees its hostPath volume (the slot or the class directory).
DEFAULT_DMP_ROOT: Final = PurePosixPath(DMP_XVOLS_DIR)

_MAX_VOLUME_ID_BYTES: Final = 128  # the CSI spec's bound on a volume ID

_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

_XVOLS: Final = "xvols"
_STATE: Final = "state"
_VOLUMES: Final = "volumes"
_RECORD_SUFFIX: Final = ".json"


def _raise_first(errors: list[FieldError]) -> None:
    if errors:
        raise InvalidPath(str(errors[0]))


def validate_class_name(name: str) -> str:
    """Return ``name`` if it is a valid StorageProviderClass name (a DNS-1123 subdomain).

    :raises InvalidPath: otherwise, with a message saying what is wrong.
    """
    _raise_first(check_dns1123_subdomain(name, "storage provider class name"))
    return name


def validate_uid(value: str, *, what: str = "UID") -> str:
    """Return ``value`` if it is a canonical lowercase UUID string (like Kubernetes UIDs).

    :param what: names the value in the error message ("pod UID", "slot UUID").
    :raises InvalidPath: otherwise.
    """
    if not isinstance(value, str) or not _CANONICAL_UUID.fullmatch(value):
        raise InvalidPath(
            f"invalid {what} {value!r}: expected a lowercase UUID such as "
            "'0f8c3ad2-5b1e-4c4e-9d0a-2f1b7c6e9a10'"
        )
    return value


def validate_volume_id(volume_id: str) -> str:
    """Return ``volume_id`` if it can safely name a record file (one path component).

    :raises InvalidPath: for an empty, over-long (more than 128 bytes, the CSI limit) ID, one
        with '/', control characters, or a leading '.'.
    """
    if not isinstance(volume_id, str) or not volume_id:
        raise InvalidPath("volume ID must be a non-empty string")
    if len(volume_id.encode("utf-8", "surrogatepass")) > _MAX_VOLUME_ID_BYTES:
        raise InvalidPath(f"volume ID is longer than {_MAX_VOLUME_ID_BYTES} bytes: {volume_id!r}")
    if "/" in volume_id or volume_id.startswith(".") or has_control_chars(volume_id):
        raise InvalidPath(
            f"invalid volume ID {volume_id!r}: it must not contain '/' or control characters "
            "and must not start with '.'"
        )
    return volume_id


def _relative_mountpoint(mountpoint: str | PurePosixPath) -> PurePosixPath:
    # The claim's own validation (dynvol_core.validation) decides what a mountpoint may be;
    # its normal form has no '.', '..' or empty components, so the relative path built here
    # stays below whatever it is joined to.
    text = str(mountpoint) if isinstance(mountpoint, PurePosixPath) else mountpoint
    _raise_first(check_mountpoint(text, "mountpoint"))
    relative = PurePosixPath(*(part for part in text.split("/") if part not in ("", ".")))
    if not relative.parts or ".." in relative.parts or relative.is_absolute():
        raise InvalidPath(f"mountpoint {text!r} does not name a directory below the root")
    return relative


def path_is_within(path: PurePosixPath, base: PurePosixPath) -> bool:
    """Whether ``path`` is ``base`` or lies below it, component-wise.

    ``/a/b`` is within ``/a`` but ``/a/bc`` is not. Both paths should be normalised.
    """
    return path == base or base in path.parents


def components_below(path: str | PurePosixPath, base: str | PurePosixPath) -> tuple[str, ...]:
    """The names leading from ``base`` down to ``path``, each one path component.

    For a walk that opens one name at a time (never a path, so nothing can be reinterpreted
    along the way): every name is non-empty, not ``.`` or ``..``, and free of control
    characters; ``path`` must lie strictly below ``base``. The text is checked as given,
    not normalised, so ``/xvols/a/../b`` is refused rather than read as ``/xvols/b``.

    :raises InvalidPath: naming what is wrong.
    """
    text, root = str(path), str(base)
    if not root.startswith("/") or has_control_chars(root):
        raise InvalidPath(f"base {root!r} must be an absolute path without control characters")
    prefix = root.rstrip("/") + "/"
    if not text.startswith(prefix):
        raise InvalidPath(f"{text!r} is not below {root!r}")
    names = tuple(text[len(prefix) :].split("/"))
    for name in names:
        if name in ("", ".", "..") or has_control_chars(name):
            raise InvalidPath(
                f"{text!r} has the component {name!r}; each component below {root!r} must "
                "be a plain name (no empty, '.' or '..' components, no control characters)"
            )
    return names


def _to_path(value: str | PurePosixPath) -> PurePosixPath:
    return value if isinstance(value, PurePosixPath) else PurePosixPath(value)


def _require_absolute(value: object, what: str) -> None:
    if not isinstance(value, PurePosixPath):
        raise InvalidPath(f"{what} must be a path, not {type(value)!r}")
    text = str(value)
    if (
        not value.is_absolute()
        or text.startswith("//")
        or ".." in value.parts
        or has_control_chars(text)
    ):
        raise InvalidPath(
            f"{what} {text!r} must be a normalised absolute path without '..' or control characters"
        )


def _check_root(
    _instance: object, attribute: attrs.Attribute[PurePosixPath], value: object
) -> None:
    _require_absolute(value, attribute.name)


def _check_class(_instance: object, _attribute: attrs.Attribute[str], value: str) -> None:
    validate_class_name(value)


def _check_slot_uuid(_instance: object, _attribute: attrs.Attribute[str], value: str) -> None:
    validate_uid(value, what="slot UUID")


def _check_pod_uid(_instance: object, _attribute: attrs.Attribute[str], value: str) -> None:
    validate_uid(value, what="pod UID")


def _check_policy(policy: str) -> DispatchPolicy:
    if policy == POLICY_INDEPENDENT:
        return POLICY_INDEPENDENT
    if policy == POLICY_SHARED:
        return POLICY_SHARED
    raise InvalidPath(
        f"unknown mount pod dispatch policy {policy!r}: use 'independent' or 'shared'"
    )


@attrs.frozen(kw_only=True)
class PodSlot:
    """A pod's private directory on the host, ``root/xvols/<class>/<slot-uuid>/<podUID>``.

    Every component is validated on construction, so a ``PodSlot`` always names a path
    inside the node root's ``xvols`` directory.
    """

    root: PurePosixPath = attrs.field(converter=_to_path, validator=_check_root)
    class_name: str = attrs.field(validator=_check_class)
    slot_uuid: str = attrs.field(validator=_check_slot_uuid)
    pod_uid: str = attrs.field(validator=_check_pod_uid)

    @property
    def class_dir(self) -> PurePosixPath:
        """The directory of the pod's storage provider class, ``root/xvols/<class>``."""
        return self.root / _XVOLS / self.class_name

    @property
    def path(self) -> PurePosixPath:
        """The slot itself, ``root/xvols/<class>/<slot-uuid>/<podUID>``."""
        return self.class_dir / self.slot_uuid / self.pod_uid

    def target(self, mountpoint: str | PurePosixPath) -> PurePosixPath:
        """The host path where a claim's ``mountpoint`` is mounted for this pod.

        The mountpoint is validated and normalised like a claim's (``dynvol_core.validation``);
        ``//data/./x/`` and ``/data/x`` are the same target. The
        result is always strictly inside :attr:`path`.

        :raises InvalidPath: for a mountpoint that is relative, ``/``, contains ``..`` etc.
        """
        return self.path / _relative_mountpoint(mountpoint)


@attrs.frozen
class XvolsLayout:
    """The node plugin's directories under its root (``/var/lib/dynamic`` by default)."""

    root: PurePosixPath = attrs.field(converter=_to_path, validator=_check_root)

    @classmethod
    def default(cls) -> XvolsLayout:
        """The layout under the default node root, ``/var/lib/dynamic``."""
        return cls(PurePosixPath(DEFAULT_ROOT))

    @property
    def xvols_dir(self) -> PurePosixPath:
        """The tree the node plugin makes an rshared mount, holding every slot."""
        return self.root / _XVOLS

    @property
    def state_dir(self) -> PurePosixPath:
        """The node plugin's persistent state."""
        return self.root / _STATE

    @property
    def volumes_state_dir(self) -> PurePosixPath:
        """Where the records of published volumes are kept."""
        return self.state_dir / _VOLUMES

    def class_dir(self, class_name: str) -> PurePosixPath:
        """The directory of one storage provider class.

        :raises InvalidPath: if ``class_name`` is not a DNS-1123 subdomain.
        """
        return self.xvols_dir / validate_class_name(class_name)

    def slot(self, class_name: str, slot_uuid: str, pod_uid: str) -> PodSlot:
        """The slot of a pod, validating every component.

        :raises InvalidPath: if the class is not a DNS-1123 subdomain or the UUIDs are not
            canonical lowercase UUIDs.
        """
        return PodSlot(root=self.root, class_name=class_name, slot_uuid=slot_uuid, pod_uid=pod_uid)

    def record_path(self, volume_id: str) -> PurePosixPath:
        """The file holding the node plugin's record of ``volume_id``.

        :raises InvalidPath: if the volume ID cannot safely name a file.
        """
        return self.volumes_state_dir / f"{validate_volume_id(volume_id)}{_RECORD_SUFFIX}"

    def parse_slot(self, path: str | PurePosixPath) -> PodSlot | None:
        """The slot whose path is exactly ``path``, or None if ``path`` is not a valid slot path.

        Never raises for a malformed path; a path with ``..``, ``.``, repeated slashes or an
        invalid component is simply not a slot.
        """
        text = str(path)
        prefix = f"{self.xvols_dir}/"
        if not text.startswith(prefix):
            return None
        components = text[len(prefix) :].split("/")
        if len(components) != 3:
            return None
        try:
            return self.slot(*components)
        except InvalidPath:
            return None

    def slot_containing(self, path: str | PurePosixPath) -> PodSlot | None:
        """The slot that ``path`` is, or lies inside of (e.g. a mount point in a slot)."""
        text = str(path)
        prefix = f"{self.xvols_dir}/"
        if not text.startswith(prefix):
            return None
        components = text[len(prefix) :].split("/")
        if len(components) < 3 or any(part in ("", ".", "..") for part in components):
            return None
        return self.parse_slot(f"{prefix}{'/'.join(components[:3])}")

    def dmp_host_path(self, slot: PodSlot, policy: str) -> PurePosixPath:
        """The host directory bound into the DMP at ``/xvols``.

        ``independent``: the pod's slot (the DMP serves one pod); ``shared``: the class
        directory (the DMP serves every pod of the class on the node).

        :raises InvalidPath: for an unknown policy or a slot of another node root.
        """
        self._check_own(slot)
        if _check_policy(policy) == POLICY_INDEPENDENT:
            return slot.path
        return slot.class_dir

    def dmp_target(
        self,
        slot: PodSlot,
        policy: str,
        mountpoint: str | PurePosixPath,
        dmp_root: PurePosixPath = DEFAULT_DMP_ROOT,
    ) -> PurePosixPath:
        """Where the DMP mounts ``mountpoint`` for ``slot``, as a path inside the DMP.

        It is the host path :meth:`PodSlot.target` seen through the DMP's hostPath volume:
        ``/xvols/<mountpoint>`` for ``independent``, and
        ``/xvols/<slot-uuid>/<podUID>/<mountpoint>`` for ``shared``.

        :raises InvalidPath: for an invalid mountpoint, policy or ``dmp_root``.
        """
        _require_absolute(dmp_root, "DMP root")
        relative_dir = slot.path.relative_to(self.dmp_host_path(slot, policy))
        return dmp_root / relative_dir / _relative_mountpoint(mountpoint)

    def _check_own(self, slot: PodSlot) -> None:
        if slot.root != self.root:
            raise InvalidPath(f"slot {slot.path} does not belong to node root {self.root}")
