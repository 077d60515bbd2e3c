"""Finding providers: the plugin manager factory and the registry the hooks fill.

Built-in providers (s3, rclone, nfs) are plugins published through the same
``dynvol.providers`` entry point group as third-party ones, so an operator can block any
of them by name (``make_plugin_manager(blocked={"nfs"})``).

Neighbours: :mod:`dynvol_providers.hookspecs` (the hooks),
:mod:`dynvol_providers.base` (what is registered).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import attrs
import pluggy

from dynvol_core.errors import DynvolError
from dynvol_providers import hookspecs
from dynvol_providers.base import Provider

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
        return tuple(sorted(self._providers))

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
