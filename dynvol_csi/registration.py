"""kubelet plugin registration: tells kubelet where the CSI socket is.

kubelet watches its plugins registry directory; when a socket appears there it calls
GetInfo, learns that a CSI plugin named ``dynamicvolume.csi.cloudnative101.net`` listens on
the returned endpoint, and reports the outcome through NotifyRegistrationStatus. This
replaces the node-driver-registrar sidecar.

Neighbours: ``server`` (runs this next to the CSI server).
"""

from __future__ import annotations

import logging
from pathlib import PurePosixPath

from dynvol_core.constants import DRIVER_NAME
from dynvol_csi._proto import pluginregistration as reg
from dynvol_csi.errors import grpc_errors

__all__ = ["CSI_VERSIONS", "RegistrationService", "registration_socket"]

log = logging.getLogger(__name__)

#: The CSI spec versions the plugin speaks, as kubelet expects them.
CSI_VERSIONS = ("1.0.0",)
_PLUGIN_TYPE = "CSIPlugin"


def registration_socket(registration_dir: PurePosixPath) -> PurePosixPath:
    """Where kubelet looks for the plugin's registration socket."""
    return registration_dir / f"{DRIVER_NAME}-reg.sock"


class RegistrationService(reg.RegistrationBase):
    """Answers kubelet's registration calls.

    :param endpoint: the CSI socket path as kubelet sees it.
    """

    def __init__(self, *, endpoint: PurePosixPath) -> None:
        self._endpoint = endpoint
        self.registered: bool | None = None
        self.error = ""

    @grpc_errors
    async def get_info(self, info_request: reg.InfoRequest) -> reg.PluginInfo:
        return reg.PluginInfo(
            type=_PLUGIN_TYPE,
            name=DRIVER_NAME,
            endpoint=str(self._endpoint),
            supported_versions=list(CSI_VERSIONS),
        )

    @grpc_errors
    async def notify_registration_status(
        self, registration_status: reg.RegistrationStatus
    ) -> reg.RegistrationStatusResponse:
        self.registered = registration_status.plugin_registered
        self.error = registration_status.error
        if self.registered:
            log.info("kubelet registered the plugin %s", DRIVER_NAME)
        else:
            # kubelet retries when the socket is recreated; the usual cause is a version or
            # name mismatch, which needs a human.
            log.error("kubelet refused the plugin registration: %s", self.error)
        return reg.RegistrationStatusResponse()
