"""Finding providers: the plugin manager factory and the registry the hooks fill.

Built-in providers (s3, rclone, nfs) are plugins published through the same
``dynvol.providers`` entry point group as third-party ones, so an operator can block any
of them by name (``make_plugin_manager(blocked={"nfs"})``).

Neighbours: :mod:`dynvol_providers.hookspecs` (the hooks),
:mod:`dynvol_providers.base` (what is registered).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import attrs
import pluggy

from dynvol_core.errors import DynvolError, FieldError, InvalidObject
from dynvol_core.models import ConnectionPolicy, ProviderConfig, config_block_for, thaw_json
from dynvol_providers import hookspecs
from dynvol_providers.base import (
    Provider,
    config_block_of,
    config_schema_of,
    parse_provider_config,
    qualify_config_errors,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "DuplicateProvider",
    "ProviderRegistry",
    "UnknownProvider",
    "load_registry",
    "make_plugin_manager",
]

ENTRY_POINT_GROUP = "dynvol.providers"


class UnknownProvider(DynvolError):
    """No registered provider has that name."""


class DuplicateProvider(DynvolError):
    """Two plugins registered a provider under the same name."""


@attrs.define
class ProviderRegistry:
    """Provider objects by name, filled by the ``dynvol_register_providers`` hook."""

    _providers: dict[str, Provider] = attrs.field(factory=dict, alias="providers")

    def register(self, provider: Provider) -> None:
        """Add ``provider`` under ``provider.name``.

        :raises DuplicateProvider: the name is taken.
        :raises TypeError: the object does not implement the Provider protocol.
        """
        if not isinstance(provider, Provider):
            raise TypeError(f"{provider!r} does not implement dynvol_providers.Provider")
        name = provider.name
        if not name or not isinstance(name, str):
            raise TypeError(f"{provider!r} has no provider name")
        block = config_block_of(provider)
        if block != config_block_for(name):
            raise TypeError(
                f"provider {name!r} says its config comes in {block!r}, but claims give it in "
                f"{config_block_for(name)!r} (spec.<provider>Config exists only for s3, nfs "
                "and rclone; every other provider takes spec.config)"
            )
        if name in self._providers:
            raise DuplicateProvider(
                f"provider {name!r} is registered twice ({self._providers[name]!r} and "
                f"{provider!r}); block one of the plugins"
            )
        self._providers[name] = provider

    def get(self, name: str) -> Provider:
        """The provider called ``name``.

        :raises UnknownProvider: with the names that are available.
        """
        try:
            return self._providers[name]
        except KeyError:
            known = ", ".join(sorted(self._providers)) or "none"
            raise UnknownProvider(
                f"unknown storage provider {name!r} (installed: {known}); install the "
                f"plugin that provides it or fix the claim's storageProvider"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._providers

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._providers))

    def __len__(self) -> int:
        return len(self._providers)

    def names(self) -> tuple[str, ...]:
        """The registered provider names, sorted."""
        return tuple(sorted(self._providers))

    def config_schema(self, name: str) -> Mapping[str, Any] | None:
        """The OpenAPI schema provider ``name`` publishes for its config block, if any.

        :raises UnknownProvider: no such provider.
        """
        return config_schema_of(self.get(name))

    def parse_claim_config(
        self,
        config: ProviderConfig,
        *,
        parameters: Mapping[str, str] | None = None,
        connection: ConnectionPolicy | None = None,
        class_name: str | None = None,
    ) -> Any:
        """Have the claim's provider parse the claim's config block: the one validator of it.

        :param config: ``claim.provider_config`` (the raw block, as the core read it).
        :param parameters: the class's provider parameters (``provider_parameters``).
        :param connection: the class's connection policy, when the class is known.
        :returns: the provider's parsed config value.
        :raises UnknownProvider: the claim's provider is not installed.
        :raises InvalidObject: with full field paths (``spec.s3Config.region``,
            ``spec.config.<key>``, ``spec.parameters.<key>`` naming the class).
        """
        provider = self.get(config.provider)
        if config_block_of(provider) != config.kind:
            raise InvalidObject(
                [
                    FieldError(
                        f"spec.{config.kind}",
                        f"provider {config.provider!r} takes its config in "
                        f"spec.{config_block_of(provider)}",
                    )
                ]
            )
        try:
            return parse_provider_config(
                provider,
                thaw_json(config.values),
                parameters=parameters or {},
                connection=connection,
            )
        except InvalidObject as exc:
            raise qualify_config_errors(exc, block=config.kind, class_name=class_name) from None

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager) -> ProviderRegistry:
        """A registry filled by every plugin that ``pm`` holds."""
        registry = cls()
        pm.hook.dynvol_register_providers(registry=registry)
        return registry


def make_plugin_manager(
    *,
    blocked: Iterable[str] = (),
    load_entry_points: bool = True,
    plugins: Iterable[object] = (),
) -> pluggy.PluginManager:
    """A plugin manager with dynvol's hooks and its plugins loaded.

    :param blocked: plugin (entry point) names an operator refuses to load.
    :param load_entry_points: load the ``dynvol.providers`` entry point group (built-ins
        included); turn off to build a manager from ``plugins`` only.
    :param plugins: extra plugin objects or modules to register (e.g. in tests).
    :raises pluggy.PluginValidationError: a plugin implements a hook dynvol does not
        define (for instance a misspelt hook name).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in blocked:
        pm.set_blocked(name)
    if load_entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for plugin in plugins:
        pm.register(plugin)
    pm.check_pending()
    return pm


def load_registry(*, blocked: Iterable[str] = ()) -> ProviderRegistry:
    """The registry of every installed, non-blocked provider plugin."""
    return ProviderRegistry.from_plugin_manager(make_plugin_manager(blocked=blocked))
