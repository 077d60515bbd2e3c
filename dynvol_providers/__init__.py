"""Storage providers for dynvol, as pluggy plugins.

Public surface: the hook markers, the Provider contract and its values, the registry and
its factory. Built-ins live in :mod:`dynvol_providers.builtin`; the host that runs
mounters in :mod:`dynvol_providers.hosting`; the conformance kit for provider authors in
:mod:`dynvol_providers.testing`.
"""

from dynvol_providers.base import (
    CommandMountProvider,
    CommandResult,
    CommandSpec,
    Credentials,
    DaemonHandle,
    DaemonSpec,
    FileSpec,
    FuseProvider,
    Health,
    HealthState,
    MountFailed,
    MountHandle,
    MountHost,
    MountRequest,
    Provider,
    Reason,
)
from dynvol_providers.hookspecs import hookimpl, hookspec
from dynvol_providers.registry import (
    ENTRY_POINT_GROUP,
    DuplicateProvider,
    ProviderRegistry,
    UnknownProvider,
    load_registry,
    make_plugin_manager,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "CommandMountProvider",
    "CommandResult",
    "CommandSpec",
    "Credentials",
    "DaemonHandle",
    "DaemonSpec",
    "DuplicateProvider",
    "FileSpec",
    "FuseProvider",
    "Health",
    "HealthState",
    "MountFailed",
    "MountHandle",
    "MountHost",
    "MountRequest",
    "Provider",
    "ProviderRegistry",
    "Reason",
    "UnknownProvider",
    "hookimpl",
    "hookspec",
    "load_registry",
    "make_plugin_manager",
]
