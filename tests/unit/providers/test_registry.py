"""The plugin manager factory and the provider registry."""

from __future__ import annotations

import pluggy
import pytest

from dynvol_providers import (
    Credentials,
    DuplicateProvider,
    ProviderRegistry,
    UnknownProvider,
    hookimpl,
    load_registry,
    make_plugin_manager,
)
from dynvol_providers.builtin.s3 import S3Provider


def test_builtins_come_from_entry_points() -> None:
    pm = make_plugin_manager()
    assert {"s3", "rclone", "nfs"} <= {name for name, _ in pm.list_name_plugin()}
    registry = ProviderRegistry.from_plugin_manager(pm)
    assert {"s3", "rclone", "nfs"} <= set(registry.names())
    assert registry.get("s3").name == "s3"


def test_operator_blocks_a_plugin_by_name() -> None:
    registry = load_registry(blocked={"nfs"})
    assert "nfs" not in registry
    assert "s3" in registry
    with pytest.raises(UnknownProvider, match="unknown storage provider 'nfs'"):
        registry.get("nfs")


def test_hookimpl_without_spec_is_rejected() -> None:
    class Misspelt:
        @hookimpl
        def dynvol_register_provider(self, registry: ProviderRegistry) -> None:
            """Missing the trailing s."""

    with pytest.raises(pluggy.PluginValidationError):
        make_plugin_manager(load_entry_points=False, plugins=[Misspelt()])


def test_duplicate_names_are_refused() -> None:
    class Again:
        @hookimpl
        def dynvol_register_providers(self, registry: ProviderRegistry) -> None:
            registry.register(S3Provider())

    pm = make_plugin_manager(plugins=[Again()])
    with pytest.raises(DuplicateProvider, match="'s3' is registered twice"):
        ProviderRegistry.from_plugin_manager(pm)


def test_non_providers_are_refused() -> None:
    with pytest.raises(TypeError):
        ProviderRegistry().register(object())  # type: ignore[arg-type]


def test_unknown_provider_lists_what_is_installed() -> None:
    registry = ProviderRegistry()
    registry.register(S3Provider())
    with pytest.raises(UnknownProvider, match=r"installed: s3\)"):
        registry.get("gcs")


def test_credentials_never_show_values() -> None:
    creds = Credentials(values={"secret-access-key": "hunter2"})
    assert "hunter2" not in repr(creds)
    assert "hunter2" not in str(creds)
    assert "hunter2" not in f"{creds!r} {[creds]}"
    assert creds.secret_values() == {"hunter2"}
