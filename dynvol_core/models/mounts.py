"""DynamicVolumeMount: one claim x pod, the unit of mounting work and of status."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from typing import Any

import attrs

from dynvol_core import constants as c
from dynvol_core.errors import FieldError, InvalidObject
from dynvol_core.models.conditions import Condition
from dynvol_core.models.fields import (
    Fields,
    OwnerReference,
    raise_if_errors,
    read_meta,
    top_object,
)
from dynvol_core.models.freezing import (
    FrozenMap,
    format_time,
    json_map_of,
    str_map_of,
    thaw_json,
)
from dynvol_core.validation import normalize_mountpoint

__all__ = ["DynamicVolumeMount", "MountPhase", "MountSpec", "MountStatus"]


class MountPhase(enum.StrEnum):
    """Where a DynamicVolumeMount is in its life."""

    PENDING = "Pending"
    MOUNTING = "Mounting"
    MOUNTED = "Mounted"
    UNMOUNTING = "Unmounting"
    FAILED = "Failed"


_MOUNT_SPEC_FIELDS = {
    "claimName": "claim_name",
    "claimUID": "claim_uid",
    "podName": "pod_name",
    "podUID": "pod_uid",
    "nodeName": "node_name",
    "dmpName": "dmp_name",
    "provider": "provider",
    "storageProviderClass": "storage_provider_class",
    "mountpoint": "mountpoint",
    "slotPath": "slot_path",
    "dmpTargetPath": "dmp_target_path",
}


@attrs.frozen(kw_only=True)
class MountSpec:
    """What one DynamicVolumeMount asks for: this claim's storage in this pod, via this DMP."""

    claim_name: str
    claim_uid: str
    pod_name: str
    pod_uid: str
    node_name: str
    dmp_name: str
    provider: str
    storage_provider_class: str
    config: FrozenMap[str, object] = attrs.field(factory=FrozenMap, converter=json_map_of)
    read_only: bool = False
    mountpoint: str
    slot_path: str
    dmp_target_path: str

    def to_object(self) -> dict[str, Any]:
        """The wire form (camelCase)."""
        obj: dict[str, Any] = {wire: getattr(self, py) for wire, py in _MOUNT_SPEC_FIELDS.items()}
        obj["config"] = thaw_json(self.config)
        obj["readOnly"] = self.read_only
        return obj


@attrs.frozen(kw_only=True)
class MountStatus:
    """Observed state of a DynamicVolumeMount, written by its DMP."""

    phase: MountPhase = MountPhase.PENDING
    conditions: tuple[Condition, ...] = ()
    message: str = ""
    observed_generation: int = 0
    mounted_at: dt.datetime | None = None
    last_repair_at: dt.datetime | None = None
    repair_count: int = 0

    def to_object(self) -> dict[str, Any]:
        """The wire form."""
        obj: dict[str, Any] = {
            "phase": str(self.phase),
            "conditions": [cond.to_object() for cond in self.conditions],
            "observedGeneration": self.observed_generation,
            "repairCount": self.repair_count,
        }
        if self.message:
            obj["message"] = self.message
        if self.mounted_at is not None:
            obj["mountedAt"] = format_time(self.mounted_at)
        if self.last_repair_at is not None:
            obj["lastRepairAt"] = format_time(self.last_repair_at)
        return obj


@attrs.frozen(kw_only=True)
class DynamicVolumeMount:
    """One claim x pod: the unit of mounting work and of status. Owned by the pod."""

    name: str
    namespace: str
    uid: str = ""
    generation: int = 0
    resource_version: str = ""
    labels: FrozenMap[str, str] = attrs.field(factory=FrozenMap, converter=str_map_of)
    owner_references: tuple[OwnerReference, ...] = ()
    finalizers: tuple[str, ...] = ()
    deleting: bool = False
    spec: MountSpec
    status: MountStatus | None = None

    @classmethod
    def from_object(cls, obj: object) -> DynamicVolumeMount:
        """Parse a DynamicVolumeMount; :raises InvalidObject: listing every problem."""
        top = top_object(obj, c.KIND_MOUNT)
        errors: list[FieldError] = []
        meta = read_meta(top, errors, namespaced=True)
        f = Fields(top.get("spec"), "spec", errors)
        f.only((*_MOUNT_SPEC_FIELDS, "config", "readOnly"), "a DynamicVolumeMount")
        values = {py: f.string(wire, required=True) for wire, py in _MOUNT_SPEC_FIELDS.items()}
        if values["mountpoint"]:
            try:
                values["mountpoint"] = normalize_mountpoint(
                    values["mountpoint"], f.at("mountpoint")
                )
            except InvalidObject as exc:
                errors += exc.errors
        config = f.obj.get("config") or {}
        if not isinstance(config, Mapping):
            f.error("config", "must be an object")
            config = {}
        read_only = f.boolean("readOnly")
        status = _read_mount_status(top.get("status"), errors) if "status" in top else None
        raise_if_errors(errors, c.KIND_MOUNT, top)
        return cls(
            name=meta.name,
            namespace=meta.namespace,
            uid=meta.uid,
            generation=meta.generation,
            resource_version=meta.resource_version,
            labels=meta.labels,
            owner_references=meta.owner_references,
            finalizers=meta.finalizers,
            deleting=meta.deleting,
            spec=MountSpec(config=config, read_only=read_only, **values),
            status=status,
        )

    def to_object(self) -> dict[str, Any]:
        """The wire form, ready to create or replace (status included when set)."""
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if self.uid:
            metadata["uid"] = self.uid
        if self.resource_version:
            metadata["resourceVersion"] = self.resource_version
        if self.labels:
            metadata["labels"] = dict(self.labels)
        if self.owner_references:
            metadata["ownerReferences"] = [o.to_object() for o in self.owner_references]
        if self.finalizers:
            metadata["finalizers"] = list(self.finalizers)
        obj: dict[str, Any] = {
            "apiVersion": c.API_VERSION,
            "kind": c.KIND_MOUNT,
            "metadata": metadata,
            "spec": self.spec.to_object(),
        }
        if self.status is not None:
            obj["status"] = self.status.to_object()
        return obj


def _read_mount_status(raw: object, errors: list[FieldError]) -> MountStatus:
    f = Fields(raw, "status", errors)
    phase_raw = f.string("phase", default=str(MountPhase.PENDING))
    try:
        phase = MountPhase(phase_raw)
    except ValueError:
        f.error("phase", f"must be one of {', '.join(p.value for p in MountPhase)}")
        phase = MountPhase.PENDING
    conditions = []
    raw_conditions = f.obj.get("conditions") or []
    if not isinstance(raw_conditions, list):
        f.error("conditions", "must be a list")
        raw_conditions = []
    for i, item in enumerate(raw_conditions):
        try:
            conditions.append(Condition.from_object(item, f"status.conditions[{i}]"))
        except InvalidObject as exc:
            errors += exc.errors
    return MountStatus(
        phase=phase,
        conditions=tuple(conditions),
        message=f.string("message"),
        observed_generation=f.integer("observedGeneration"),
        mounted_at=f.timestamp("mountedAt"),
        last_repair_at=f.timestamp("lastRepairAt"),
        repair_count=f.integer("repairCount"),
    )
