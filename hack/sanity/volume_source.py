"""Stands in for kubelet as the source of ephemeral volumes during csi-sanity runs.

For an ephemeral inline volume kubelet itself invents the volume ID and fills the volume
context (the pod's identity, the volumeAttributes of the pod spec) before it calls
NodePublishVolume; there is no Controller service. csi-sanity's Node specs instead get
their volume from CreateVolume on a controller endpoint. This process answers those calls
on its own socket so that the specs that publish can run against dynvol's real node plugin:
CreateVolume returns a volume whose context is the --csi.testvolumeparameters file, i.e.
what kubelet would have sent. It does not touch the host.

    python hack/sanity/volume_source.py GENERATED_DIR SOCKET

GENERATED_DIR holds the betterproto code generated from hack/sanity/controller.proto. The
process also answers the Identity service (csi-sanity's Identity specs query every
endpoint it is given), as itself: "sanity-volume-source".
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import sys


async def serve(socket_path: str) -> None:
    from csi import v1 as csi  # generated at run time by hack/sanity.sh
    from grpclib.server import Server

    from dynvol_core.constants import DRIVER_NAME
    from dynvol_csi._proto.csi import v1 as csi_node

    class SourceIdentity(csi_node.IdentityBase):
        # csi-sanity's Identity specs also query the controller endpoint. This answers for
        # the stand-in only; the plugin's own Identity is tested on the node endpoint.
        async def get_plugin_info(
            self, get_plugin_info_request: csi_node.GetPluginInfoRequest
        ) -> csi_node.GetPluginInfoResponse:
            return csi_node.GetPluginInfoResponse(
                name=DRIVER_NAME, vendor_version="sanity-volume-source"
            )

        async def get_plugin_capabilities(
            self, get_plugin_capabilities_request: csi_node.GetPluginCapabilitiesRequest
        ) -> csi_node.GetPluginCapabilitiesResponse:
            return csi_node.GetPluginCapabilitiesResponse()

        async def probe(self, probe_request: csi_node.ProbeRequest) -> csi_node.ProbeResponse:
            return csi_node.ProbeResponse(ready=True)

    class VolumeSource(csi.ControllerBase):
        async def create_volume(
            self, create_volume_request: csi.CreateVolumeRequest
        ) -> csi.CreateVolumeResponse:
            name = create_volume_request.name
            # Kubelet's IDs are "csi-<sha256>"; the same name gives the same ID (idempotent).
            volume_id = "csi-" + hashlib.sha256(name.encode()).hexdigest()
            return csi.CreateVolumeResponse(
                volume=csi.Volume(
                    capacity_bytes=create_volume_request.capacity_range.required_bytes,
                    volume_id=volume_id,
                    volume_context=dict(create_volume_request.parameters),
                )
            )

        async def delete_volume(
            self, delete_volume_request: csi.DeleteVolumeRequest
        ) -> csi.DeleteVolumeResponse:
            return csi.DeleteVolumeResponse()

    server = Server([VolumeSource(), SourceIdentity()])
    await server.start(path=socket_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])
    asyncio.run(serve(sys.argv[2]))
