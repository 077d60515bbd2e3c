"""The hooks a dynvol provider plugin implements.

A plugin is a module (or object) with functions decorated by :data:`hookimpl`, published
through the ``dynvol.providers`` entry point group::

    [project.entry-points."dynvol.providers"]
    localdir = "dynvol_provider_example.plugin"

Hooks are synchronous: they only register provider objects; the async work (mounting)
lives on those objects (see :class:`dynvol_providers.base.Provider`).

Neighbours: :mod:`dynvol_providers.registry` calls these hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from dynvol_providers.registry import ProviderRegistry

PROJECT = "dynvol"

#: Marks the hook specifications below (used by dynvol only).
hookspec = pluggy.HookspecMarker(PROJECT)
#: Marks a plugin's hook implementations: ``@hookimpl def dynvol_register_providers(...)``.
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def dynvol_register_providers(registry: ProviderRegistry) -> None:
    """Register the plugin's providers.

    Called once per plugin when a dynvol process (the DMP agent, the node plugin, the
    controller, or the conformance kit) builds its provider registry, after every plugin
    has been loaded and before any claim is validated or mounted.

    :param registry: call ``registry.register(provider)`` for each provider object the
        plugin offers. A provider's ``name`` is the value of a claim's
        ``spec.storageProvider`` that selects it; registering a name twice is an error.
    """
