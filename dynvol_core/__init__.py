"""dynvol's pure core: API models, validation, selectors, paths, mountinfo and plans.

No I/O, no asyncio, no Kubernetes or gRPC: functions take desired and observed state and
return values or plans, which the services (node plugin, controllers, mount pod agent)
carry out. The names below are the public surface; the modules behind them are internal
except for ``dynvol_core.constants``, which is public as a whole.
"""

from dynvol_core.dispatch import NodePlan, plan_node
from dynvol_core.errors import DynvolError, FieldError, InvalidObject, InvalidPath
from dynvol_core.models import (
    Condition,
    DynamicVolumeClaim,
    DynamicVolumeMount,
    MountPhase,
    PodInfo,
    ProviderConfig,
    StorageProviderClass,
)
from dynvol_core.mountinfo import MountEntry, parse_mountinfo
from dynvol_core.mountplans import DesiredMount, LazyUnmount, Mount, Repair, plan_mounts
from dynvol_core.paths import PodSlot, XvolsLayout
from dynvol_core.records import VolumeRecord
from dynvol_core.selectors import LabelSelector
from dynvol_core.validation import normalize_mountpoint

__all__ = [
    "Condition",
    "DesiredMount",
    "DynamicVolumeClaim",
    "DynamicVolumeMount",
    "DynvolError",
    "FieldError",
    "InvalidObject",
    "InvalidPath",
    "LabelSelector",
    "LazyUnmount",
    "Mount",
    "MountEntry",
    "MountPhase",
    "NodePlan",
    "PodInfo",
    "PodSlot",
    "ProviderConfig",
    "Repair",
    "StorageProviderClass",
    "VolumeRecord",
    "XvolsLayout",
    "normalize_mountpoint",
    "parse_mountinfo",
    "plan_mounts",
    "plan_node",
]
