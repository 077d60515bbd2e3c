"""The API objects dynvol works with, as validated, immutable values.

Each model has a named constructor ``from_object(obj)`` that takes the object as the
Kubernetes API returns it (a plain dict, camelCase keys) and either returns a value or
raises :class:`~dynvol_core.errors.InvalidObject` listing every problem with its field path.
:class:`DynamicVolumeMount` also has ``to_object()``, because dynvol writes those. The models
do not depend on any Kubernetes client library.

Unknown fields in a ``spec`` are errors, mirroring the CRDs' structural schemas (which prune
or, with strict field validation, reject them); a misspelt ``readonly`` must not silently
mount read-write.

One module per kind (:mod:`.claims`, :mod:`.mounts`, :mod:`.classes`, :mod:`.pods`), plus
:mod:`.conditions`, :mod:`.freezing` (immutable JSON values, timestamps) and :mod:`.fields`
(the field walker the constructors share). Import the names below from this package.
"""

from dynvol_core.models.claims import (
    BUILTIN_CONFIG_BLOCKS,
    CONFIG_BLOCKS,
    GENERIC_CONFIG_BLOCK,
    TYPED_CONFIG_BLOCKS,
    DynamicVolumeClaim,
    ProviderConfig,
    config_block_for,
)
from dynvol_core.models.classes import ConnectionPolicy, MountResources, StorageProviderClass
from dynvol_core.models.conditions import Condition, ConditionStatus, set_condition
from dynvol_core.models.fields import ObjectRef, OwnerReference
from dynvol_core.models.freezing import FrozenMap, format_time, freeze_json, parse_time, thaw_json
from dynvol_core.models.mounts import DynamicVolumeMount, MountPhase, MountSpec, MountStatus
from dynvol_core.models.pods import InjectedVolume, PodInfo
from dynvol_core.models.tolerations import Toleration

__all__ = [
    "BUILTIN_CONFIG_BLOCKS",
    "CONFIG_BLOCKS",
    "GENERIC_CONFIG_BLOCK",
    "TYPED_CONFIG_BLOCKS",
    "Condition",
    "ConditionStatus",
    "ConnectionPolicy",
    "DynamicVolumeClaim",
    "DynamicVolumeMount",
    "FrozenMap",
    "InjectedVolume",
    "MountPhase",
    "MountResources",
    "MountSpec",
    "MountStatus",
    "ObjectRef",
    "OwnerReference",
    "PodInfo",
    "ProviderConfig",
    "StorageProviderClass",
    "Toleration",
    "config_block_for",
    "format_time",
    "freeze_json",
    "parse_time",
    "set_condition",
    "thaw_json",
]
