"""Pod slots for the node reconciler where no node plugin publishes volumes (tests only).

In ``dynvol node`` the slot of a pod comes from the CSI node plugin's records (it mints the
slot UUID at NodePublishVolume). Clusters without kubelet -- the integration tests and the
benchmark, which bind pods to made-up nodes -- have no such records; :class:`SyntheticSlots`
derives a deterministic slot from the layout instead, so the reconciler can be exercised
against a real apiserver without a node.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from dynvol_controllers import NodeReconciler, NodeReconcilerSettings
from dynvol_core import constants as c
from dynvol_core.paths import PodSlot
from dynvol_kube import Client

__all__ = ["SyntheticSlots", "node_reconciler_without_kubelet"]

_NAMESPACE = uuid.UUID("6f1b7d0e-3c1a-4d55-9a43-4a3b2d1c0e9f")


class SyntheticSlots:
    """``slot_lookup`` that gives every pod with a known class a deterministic slot.

    :param class_of: the class of a pod by UID (``NodeReconciler.pod_class``).
    """

    def __init__(
        self, class_of: Callable[[str], str | None], *, root: str = c.DEFAULT_ROOT
    ) -> None:
        self._class_of = class_of
        self._root = PurePosixPath(root)

    def __call__(self, pod_uid: str) -> PodSlot | None:
        class_name = self._class_of(pod_uid)
        if class_name is None:
            return None
        slot_uuid = str(uuid.uuid5(_NAMESPACE, pod_uid))
        return PodSlot(root=self._root, class_name=class_name, slot_uuid=slot_uuid, pod_uid=pod_uid)


def node_reconciler_without_kubelet(
    client: Client, node: str, *, registry: Any = None, **settings: Any
) -> NodeReconciler:
    """A :class:`NodeReconciler` for a made-up node, its slots from :class:`SyntheticSlots`.

    ``settings`` are :meth:`NodeReconcilerSettings.of`'s flat names (``dmp_delete_grace=0``).
    """
    reconciler = NodeReconciler(
        client, node, NodeReconcilerSettings.of(**settings), registry=registry
    )
    reconciler.slot_lookup = SyntheticSlots(reconciler.pod_class)
    return reconciler
