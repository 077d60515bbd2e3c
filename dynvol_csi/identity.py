"""The CSI Identity service: who the plugin is, what it offers, whether it is ready.

Neighbours: ``server`` (serves it next to ``node``).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata

from dynvol_core.constants import DRIVER_NAME
from dynvol_csi._proto.csi import v1 as csi
from dynvol_csi.errors import grpc_errors

__all__ = ["IdentityService", "plugin_version"]


def plugin_version() -> str:
    """The installed version of the dynvol distribution this plugin belongs to."""
    try:
        return metadata.version("dynvol")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


class IdentityService(csi.IdentityBase):
    """Identity for a node-only plugin: no controller service, no topology.

    :param ready: tells Probe whether the plugin can serve (its start-up is complete).
    """

    def __init__(self, *, ready: Callable[[], bool]) -> None:
        self._ready = ready
        self._version = plugin_version()

    @grpc_errors
    async def get_plugin_info(
        self, get_plugin_info_request: csi.GetPluginInfoRequest
    ) -> csi.GetPluginInfoResponse:
        return csi.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=self._version)

    @grpc_errors
    async def get_plugin_capabilities(
        self, get_plugin_capabilities_request: csi.GetPluginCapabilitiesRequest
    ) -> csi.GetPluginCapabilitiesResponse:
        # Advertising nothing is how a plugin says it is node-only: the CO then never
        # calls the Controller service, which dynvol does not serve.
        return csi.GetPluginCapabilitiesResponse(capabilities=[])

    @grpc_errors
    async def probe(self, probe_request: csi.ProbeRequest) -> csi.ProbeResponse:
        return csi.ProbeResponse(ready=self._ready())
