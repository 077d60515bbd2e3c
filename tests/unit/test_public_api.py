"""The public API other controllers and provider authors import (docs/library.md).

The imports below are exactly the names docs/library.md lists; removing or renaming one
fails here first. Each package's ``__all__`` must be that list, no more (a new public name
is added to docs/library.md and to this file together), every name must be in the document,
and the modules a base install serves must import without any service's dependencies.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

import dynvol.crds
import dynvol.testing
import dynvol.testing.pytest_plugin
import dynvol_core
import dynvol_core.constants
import dynvol_providers
import dynvol_providers.testing
from dynvol.crds import CRD_FILES, crd_dir, crd_files
from dynvol.testing import (
    ControlPlane,
    MinioServer,
    Process,
    ToolsBuildFailed,
    ToolsMissing,
    WrongRelease,
    default_bin_dir,
    free_port,
    install_tools,
    rshared_dir,
    wait_until,
)
from dynvol_core import (
    Condition,
    DesiredMount,
    DynamicVolumeClaim,
    DynamicVolumeMount,
    DynvolError,
    FieldError,
    InvalidObject,
    InvalidPath,
    LabelSelector,
    LazyUnmount,
    Mount,
    MountEntry,
    MountPhase,
    NodePlan,
    PodInfo,
    PodSlot,
    ProviderConfig,
    Repair,
    StorageProviderClass,
    VolumeRecord,
    XvolsLayout,
    normalize_mountpoint,
    parse_mountinfo,
    plan_mounts,
    plan_node,
)
from dynvol_core.models import ConnectionPolicy
from dynvol_providers import (
    ENTRY_POINT_GROUP,
    CommandMountProvider,
    CommandResult,
    CommandSpec,
    Credentials,
    DaemonHandle,
    DaemonSpec,
    DuplicateProvider,
    FileSpec,
    FuseProvider,
    Health,
    HealthState,
    MountFailed,
    MountHandle,
    MountHost,
    MountRequest,
    Provider,
    ProviderRegistry,
    Reason,
    UnknownProvider,
    hookimpl,
    hookspec,
    load_registry,
    make_plugin_manager,
)
from dynvol_providers.base import join_mount_options
from dynvol_providers.testing import (
    ConformanceCase,
    ProviderConformance,
    command_shape,
    rshared_mount_dir,
)

DOC = (Path(__file__).resolve().parents[2] / "docs" / "library.md").read_text()

#: Each package's public names, as imported above.
PUBLIC: dict[ModuleType, dict[str, object]] = {
    dynvol_core: {
        "Condition": Condition,
        "DesiredMount": DesiredMount,
        "DynamicVolumeClaim": DynamicVolumeClaim,
        "DynamicVolumeMount": DynamicVolumeMount,
        "DynvolError": DynvolError,
        "FieldError": FieldError,
        "InvalidObject": InvalidObject,
        "InvalidPath": InvalidPath,
        "LabelSelector": LabelSelector,
        "LazyUnmount": LazyUnmount,
        "Mount": Mount,
        "MountEntry": MountEntry,
        "MountPhase": MountPhase,
        "NodePlan": NodePlan,
        "PodInfo": PodInfo,
        "PodSlot": PodSlot,
        "ProviderConfig": ProviderConfig,
        "Repair": Repair,
        "StorageProviderClass": StorageProviderClass,
        "VolumeRecord": VolumeRecord,
        "XvolsLayout": XvolsLayout,
        "normalize_mountpoint": normalize_mountpoint,
        "parse_mountinfo": parse_mountinfo,
        "plan_mounts": plan_mounts,
        "plan_node": plan_node,
    },
    dynvol_providers: {
        "ENTRY_POINT_GROUP": ENTRY_POINT_GROUP,
        "CommandMountProvider": CommandMountProvider,
        "CommandResult": CommandResult,
        "CommandSpec": CommandSpec,
        "Credentials": Credentials,
        "DaemonHandle": DaemonHandle,
        "DaemonSpec": DaemonSpec,
        "DuplicateProvider": DuplicateProvider,
        "FileSpec": FileSpec,
        "FuseProvider": FuseProvider,
        "Health": Health,
        "HealthState": HealthState,
        "MountFailed": MountFailed,
        "MountHandle": MountHandle,
        "MountHost": MountHost,
        "MountRequest": MountRequest,
        "Provider": Provider,
        "ProviderRegistry": ProviderRegistry,
        "Reason": Reason,
        "UnknownProvider": UnknownProvider,
        "hookimpl": hookimpl,
        "hookspec": hookspec,
        "load_registry": load_registry,
        "make_plugin_manager": make_plugin_manager,
    },
    dynvol_providers.testing: {
        "ConformanceCase": ConformanceCase,
        "ProviderConformance": ProviderConformance,
        "command_shape": command_shape,
        "rshared_mount_dir": rshared_mount_dir,
        # The pytest hook that makes the module a plugin (-p dynvol_providers.testing).
        "pytest_addoption": dynvol_providers.testing.pytest_addoption,
    },
    dynvol.testing: {
        "ControlPlane": ControlPlane,
        "MinioServer": MinioServer,
        "Process": Process,
        "ToolsBuildFailed": ToolsBuildFailed,
        "ToolsMissing": ToolsMissing,
        "WrongRelease": WrongRelease,
        "default_bin_dir": default_bin_dir,
        "free_port": free_port,
        "install_tools": install_tools,
        "rshared_dir": rshared_dir,
        "wait_until": wait_until,
    },
    dynvol.crds: {"CRD_FILES": CRD_FILES, "crd_dir": crd_dir, "crd_files": crd_files},
}

#: Public names of modules that are otherwise internal.
SINGLE_NAMES = {
    "dynvol_core.models": [ConnectionPolicy],
    "dynvol_providers.base": [join_mount_options],
}

FIXTURES = (
    "control_plane",
    "dynvol_extra_crds",
    "kube_client",
    "namespace",
    "minio",
    "rshared_dir",
)

#: What a base install (attrs and pluggy) lacks.
SERVICE_DEPENDENCIES = ("kubernetes_asyncio", "grpclib", "betterproto", "aiohttp", "yaml", "boto3")


@pytest.mark.parametrize("module", list(PUBLIC), ids=lambda m: m.__name__)
def test_all_is_exactly_the_documented_names(module: ModuleType) -> None:
    names = PUBLIC[module]
    assert sorted(module.__all__) == sorted(names), (
        f"{module.__name__}.__all__ changed: a public name is added to, or removed from, "
        "docs/library.md and tests/unit/test_public_api.py together"
    )
    for name, value in names.items():
        assert getattr(module, name) is value


def _documented(name: str) -> bool:
    return re.search(rf"`{re.escape(name)}[`(]", DOC) is not None


@pytest.mark.parametrize("module", list(PUBLIC), ids=lambda m: m.__name__)
def test_every_public_name_is_in_the_library_doc(module: ModuleType) -> None:
    assert f"`{module.__name__}`" in DOC
    hooks = {"pytest_addoption"}
    missing = [n for n in PUBLIC[module] if n not in hooks and not _documented(n)]
    assert not missing, f"docs/library.md does not list {missing} of {module.__name__}"


def test_the_single_public_names_of_internal_modules_are_documented() -> None:
    for module, values in SINGLE_NAMES.items():
        assert f"`{module}`" in DOC
        for value in values:
            assert _documented(value.__name__), value  # type: ignore[attr-defined]
    assert "`dynvol_core.constants`" in DOC
    assert dynvol_core.constants.GROUP == "dynamicvolume.csi.cloudnative101.net"


def test_the_plugin_serves_the_documented_fixtures() -> None:
    for name in FIXTURES:
        fixture = getattr(dynvol.testing.pytest_plugin, name)
        # pytest wraps a fixture function in a definition object that names it.
        assert "fixture" in type(fixture).__name__.lower(), (name, type(fixture))
        assert _documented(name), name
    assert _documented("dynvol_crds")
    assert _documented("--dynvol-crds")


def test_the_base_install_modules_import_without_service_dependencies() -> None:
    """With kubernetes-asyncio, grpclib, betterproto, aiohttp, PyYAML and boto3 made
    unimportable, every public module still imports (the wheel test checks the same in a
    real base install)."""
    program = textwrap.dedent(
        f"""
        import importlib, sys
        BLOCKED = {SERVICE_DEPENDENCIES!r}
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"blocked: {{name}}", name=name)
                return None
        sys.meta_path.insert(0, Block())
        for module in ("dynvol_core", "dynvol_core.constants", "dynvol_core.models",
                       "dynvol_providers", "dynvol_providers.base", "dynvol_providers.testing",
                       "dynvol.testing", "dynvol.testing.pytest_plugin", "dynvol.crds",
                       "dynvol.cli", "dynvol.commands.dev"):
            importlib.import_module(module)
        from dynvol_providers import load_registry
        assert {{"s3", "nfs", "rclone"}} <= set(load_registry())
        from dynvol.cli import build_parser
        build_parser()
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
