"""The CSI Node service: publish and unpublish dynvol's ephemeral inline volumes.

Handlers translate between the wire and the plugin: they validate the request (see
``validation``), hand the work to :class:`~dynvol_csi.volumes.VolumeManager` and build the
response. Errors become gRPC statuses in one place (``errors``).

Neighbours: ``validation``, ``volumes``, ``server``.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from dynvol_csi._proto.csi import v1 as csi
from dynvol_csi.errors import grpc_errors
from dynvol_csi.guards import PublishGuard
from dynvol_csi.validation import PublishRequest, StatsRequest, UnpublishRequest
from dynvol_csi.volumes import VolumeManager

__all__ = ["NodeService"]

# betterproto declares enum members as plain ints; convert so the fields get the enum type.
_UNITS = {
    "bytes": csi.VolumeUsageUnit(csi.VolumeUsageUnit.BYTES),
    "inodes": csi.VolumeUsageUnit(csi.VolumeUsageUnit.INODES),
}


class NodeService(csi.NodeBase):
    """The Node service of one node.

    :param node_id: this node's name, reported by NodeGetInfo.
    :param kubelet_dir: kubelet's root directory; targets must lie in its pod directories.
    :param guard: asked, after validation and before anything is bound, whether the pod may
        have the volume (see ``guards``).
    """

    def __init__(
        self,
        *,
        volumes: VolumeManager,
        node_id: str,
        kubelet_dir: PurePosixPath,
        guard: PublishGuard,
    ) -> None:
        self._volumes = volumes
        self._node_id = node_id
        self._kubelet_dir = kubelet_dir
        self._guard = guard

    @grpc_errors
    async def node_publish_volume(
        self, node_publish_volume_request: csi.NodePublishVolumeRequest
    ) -> csi.NodePublishVolumeResponse:
        request = PublishRequest.from_message(
            node_publish_volume_request, kubelet_dir=self._kubelet_dir
        )
        await self._guard.check(request)
        await self._volumes.publish(request)
        return csi.NodePublishVolumeResponse()

    @grpc_errors
    async def node_unpublish_volume(
        self, node_unpublish_volume_request: csi.NodeUnpublishVolumeRequest
    ) -> csi.NodeUnpublishVolumeResponse:
        request = UnpublishRequest.from_message(
            node_unpublish_volume_request, kubelet_dir=self._kubelet_dir
        )
        await self._volumes.unpublish(request)
        return csi.NodeUnpublishVolumeResponse()

    @grpc_errors
    async def node_get_volume_stats(
        self, node_get_volume_stats_request: csi.NodeGetVolumeStatsRequest
    ) -> csi.NodeGetVolumeStatsResponse:
        request = StatsRequest.from_message(node_get_volume_stats_request)
        usage = await self._volumes.usage(request)
        return csi.NodeGetVolumeStatsResponse(
            usage=[
                csi.VolumeUsage(
                    unit=_UNITS[u.unit], total=u.total, available=u.available, used=u.used
                )
                for u in usage
            ]
        )

    @grpc_errors
    async def node_get_capabilities(
        self, node_get_capabilities_request: csi.NodeGetCapabilitiesRequest
    ) -> csi.NodeGetCapabilitiesResponse:
        # No STAGE_UNSTAGE_VOLUME: there is no device to stage; kubelet goes straight to
        # NodePublishVolume.
        return csi.NodeGetCapabilitiesResponse(
            capabilities=[
                csi.NodeServiceCapability(
                    rpc=csi.NodeServiceCapabilityRpc(
                        type=csi.NodeServiceCapabilityRpcType(
                            csi.NodeServiceCapabilityRpcType.GET_VOLUME_STATS
                        )
                    )
                )
            ]
        )

    @grpc_errors
    async def node_get_info(
        self, node_get_info_request: csi.NodeGetInfoRequest
    ) -> csi.NodeGetInfoResponse:
        # max_volumes_per_node 0 = no limit: a slot costs one bind mount.
        return csi.NodeGetInfoResponse(node_id=self._node_id, max_volumes_per_node=0)
