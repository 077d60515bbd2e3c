"""Claim slices: the controller fans claims out into one object per node.

Each node plugin used to watch every claim of the cluster, so that every claim's creation
and every claim status write went to every node: at 1,000 nodes that is about 1,800 watch
events per claim, most of them for nodes the claim has nothing to do with. Instead, the
leader-elected controller, which watches every claim and pod anyway, keeps for each node
one ``DynamicVolumeClaimSlice`` named after it, listing copies of the claims that select
at least one opted-in pod bound to that node (:mod:`dynvol_core.slices`). A node watches
its own slice only.

Queue keys are node names. A claim event queues the nodes of the pods its old and new
versions select, and the nodes whose slices list it; a pod event queues the pod's node
when its node, labels, opt-in or existence changed; a slice event queues its node, so that
a slice changed or deleted by anyone else is put back. A pass compares the wanted entries
with the cached slice and writes only when they differ: a claim status write, which
changes no entry, costs nothing here and reaches no node.

Every node with an opted-in pod gets a slice, with no entries when no claim selects its
pods; a slice goes once no opted-in pod is bound to its node. So a node whose slice is
missing while it has opted-in pods knows that the controller has not spoken (not yet
installed or upgraded, or the slice was deleted), and holds still instead of unmounting
everything (:class:`~.observing.NodeView`).

A node whose first change comes after ``coalesce`` seconds of quiet is written at once (a
lone claim is not delayed); changes following within that window wait ``coalesce``, so a
burst of claims costs each node one more write, not one each.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from dynvol_core.models import DynamicVolumeClaim, PodInfo
from dynvol_core.slices import claims_for_node, slice_entries, slice_entry, slice_object
from dynvol_kube import (
    APIConflict,
    APINotFound,
    Client,
    Controller,
    Event,
    Informer,
    Manager,
    Outcome,
)
from dynvol_kube.resources import CLAIM_SLICES, CLAIMS, NODES, PODS

from . import objects

__all__ = ["INDEX_POD_NODE", "ClaimSlicer", "pod_node_index", "standalone_slicer"]

log = logging.getLogger(__name__)

FIELD_MANAGER = "dynvol-controller"
#: Index of the controller's pod cache by ``spec.nodeName``.
INDEX_POD_NODE = "node"
_INDEX_SLICE_CLAIM = "claim-uid"
#: A slice above this many bytes of JSON is logged: etcd refuses objects above 1.5 MiB.
SLICE_WARN_BYTES = 1 << 20


def pod_node_index(pod: Mapping[str, Any]) -> tuple[str, ...]:
    node = (pod.get("spec") or {}).get("nodeName")
    return (node,) if node else ()


def _slice_claim_index(obj: Mapping[str, Any]) -> tuple[str, ...]:
    entries = (obj.get("spec") or {}).get("claims") or ()
    return tuple(e["uid"] for e in entries if isinstance(e, Mapping) and e.get("uid"))


class ClaimSlicer:
    """Keep every node's ``DynamicVolumeClaimSlice`` as the claims and pods say.

    It shares the controller's claim, pod and node caches (the pod cache needs the
    :data:`INDEX_POD_NODE` index, :func:`pod_node_index`) and their parsed models, and adds
    a cache of the slices. :meth:`start` and :meth:`close` follow the Lease.
    """

    def __init__(
        self,
        client: Client,
        *,
        claims: Informer,
        pods: Informer,
        nodes: Informer,
        claim_models: objects.ModelCache,
        pod_models: objects.ModelCache,
        workers: int = 2,
        coalesce: float = 0.2,
        namespace_pods: objects.NamespacePods | None = None,
    ) -> None:
        self.client = client
        self.claims = claims
        self.pods = pods
        self.nodes = nodes
        self._claim_models = claim_models
        self._pod_models = pod_models
        self.coalesce = coalesce
        #: The parsed pods of a namespace (the controller's, when it shares its caches).
        self._namespace_pods = namespace_pods or objects.NamespacePods(pods, pod_models)
        self.slices = Informer(
            client,
            CLAIM_SLICES,
            transform=objects.slim_object,
            indexers={_INDEX_SLICE_CLAIM: _slice_claim_index},
        )
        self.controller = Controller(
            "claim-slices", self.reconcile, workers=workers, metrics=client.metrics
        )
        #: Slice writes (create, update, delete) this replica made.
        self.writes = 0
        claims.add_handler(self._on_claim)
        pods.add_handler(self._on_pod)
        self.slices.add_handler(self._on_slice)

    # -- lifecycle (the Lease's) -------------------------------------------------------------

    async def start(self) -> None:
        """Start writing slices, after a pass over every node that has or needs one."""
        await self.controller.start()
        wanted = {obj["metadata"]["name"] for obj in self.slices.store}
        for pod in self.pods.store:
            wanted.update(pod_node_index(pod))
        for node in sorted(wanted):
            self.controller.enqueue(node)

    async def close(self) -> None:
        await self.controller.close()

    # -- observe -> queue --------------------------------------------------------------------

    def queue(self, node: str) -> None:
        """Queue a pass for ``node``: at once after a quiet spell, else after ``coalesce``."""
        self.controller.queue.add_coalesced(node, self.coalesce)

    def _nodes_selected_by(self, raw: Mapping[str, Any] | None) -> set[str]:
        if not raw:
            return set()
        claim = self._claim_models.get_or_none(raw)
        if claim is None:
            return set()
        out = set()
        for pod in self._pods_in(claim.namespace):
            if pod.node_name and pod.node_name not in out and claim.selector.selects(pod.labels):
                out.add(pod.node_name)
        return out

    def _pods_in(self, namespace: str) -> Iterable[PodInfo]:
        return (pod for pod in self._namespace_pods(namespace) if pod.opted_in)

    def _on_claim(self, event: Event) -> None:
        if (
            event.type == "MODIFIED"
            and event.old is not None
            and slice_entry(event.old) == slice_entry(event.obj)
        ):
            return  # a status write, or metadata no slice copies
        nodes = self._nodes_selected_by(event.obj) | self._nodes_selected_by(event.old)
        uid = (event.obj.get("metadata") or {}).get("uid")
        if uid:
            nodes.update(s["metadata"]["name"] for s in self.slices.store.by_index(
                _INDEX_SLICE_CLAIM, uid
            ))  # fmt: skip
        for node in sorted(nodes):
            self.queue(node)

    def _on_pod(self, event: Event) -> None:
        old = event.old or {}
        if event.type == "MODIFIED" and (
            pod_node_index(old) == pod_node_index(event.obj)
            and (old.get("metadata") or {}).get("labels")
            == (event.obj.get("metadata") or {}).get("labels")
            and objects.injected_class(old) == objects.injected_class(event.obj)
        ):
            return
        for node in set(pod_node_index(event.obj)) | set(pod_node_index(old)):
            self.queue(node)

    def _on_slice(self, event: Event) -> None:
        if event.type != "RESYNC":
            self.queue(event.obj["metadata"]["name"])

    # -- process -------------------------------------------------------------------------------

    def wanted(self, node: str) -> list[dict[str, Any]] | None:
        """The entries ``node``'s slice should have, from the caches; None when the node
        needs no slice (no opted-in pod is bound to it)."""
        pods = [
            pod
            for raw in self.pods.store.by_index(INDEX_POD_NODE, node)
            if (pod := self._pod_models.get_or_none(raw)) is not None and pod.opted_in
        ]
        if not pods:
            return None
        raws: dict[str, Mapping[str, Any]] = {}
        models: list[DynamicVolumeClaim] = []
        for namespace in {p.namespace for p in pods}:
            for raw in self.claims.store.by_index("namespace", namespace):
                claim = self._claim_models.get_or_none(raw)
                if claim is not None:
                    raws[claim.uid] = raw
                    models.append(claim)
        return slice_entries([raws[claim.uid] for claim in claims_for_node(models, pods)])

    async def reconcile(self, node: str) -> Outcome | None:
        entries = self.wanted(node)
        current = self.slices.store.get(node)
        # A node with opted-in pods always has a slice, empty when no claim selects them:
        # a node without one has not heard from the controller yet, and waits for it
        # instead of unmounting (docs/design.md, "DynamicVolumeClaimSlice").
        if entries is None:
            if current is not None:
                with contextlib.suppress(APINotFound):
                    await self.client.delete(CLAIM_SLICES, node, uid=current["metadata"].get("uid"))
                self.writes += 1
            return None
        if current is not None and (current.get("spec") or {}).get("claims") == entries:
            return None
        size = len(json.dumps(entries))
        if size > SLICE_WARN_BYTES:
            log.warning(
                "the claim slice of node %s holds %d claims in %d bytes; etcd refuses an "
                "object above 1.5 MiB",
                node,
                len(entries),
                size,
                extra={"node": node},
            )
        if current is None:
            node_obj = self.nodes.store.get(node)
            node_uid = ((node_obj or {}).get("metadata") or {}).get("uid", "")
            try:
                await self.client.create(
                    CLAIM_SLICES,
                    slice_object(node, entries, node_uid=node_uid),
                    field_manager=FIELD_MANAGER,
                )
            except APIConflict:
                # It exists and the cache has not seen it yet: its ADDED event queues us.
                return None
        else:
            body = {
                **current,
                "spec": {"nodeName": node, "claims": entries},
            }
            await self.client.replace(CLAIM_SLICES, body, field_manager=FIELD_MANAGER)
        self.writes += 1
        return None


def standalone_slicer(client: Client, *, sync_timeout: float = 120.0) -> Manager:
    """A :class:`ClaimSlicer` with caches of its own, in a :class:`~dynvol_kube.Manager`
    (``await start()`` / ``await close()``): for node reconcilers run without
    ``dynvol controller``, as in the integration tests."""
    claims = Informer(client, CLAIMS)
    pods = Informer(
        client,
        PODS,
        transform=objects.slim_pod,
        indexers={INDEX_POD_NODE: pod_node_index},
    )
    nodes = Informer(client, NODES, transform=objects.slim_object)
    slicer = ClaimSlicer(
        client,
        claims=claims,
        pods=pods,
        nodes=nodes,
        claim_models=objects.ModelCache(DynamicVolumeClaim.from_object),
        pod_models=objects.ModelCache(PodInfo.from_object),
    )
    manager = Manager(client, sync_timeout=sync_timeout)
    for informer in (claims, pods, nodes, slicer.slices):
        manager.add_informer(informer)
    manager.add(slicer)
    return manager
