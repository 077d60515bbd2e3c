"""Claim slices: the claims each node needs, so that no node has to watch every claim.

The leader-elected controller sees every claim and every pod. For each node it keeps one
``DynamicVolumeClaimSlice``, named after the node, listing the claims that select at
least one opted-in pod bound to it (same namespace, selector matching), each as a copy of
the claim's identity and spec. A node plugin watches only its own slice
(``fieldSelector metadata.name=<node>``), so a claim's creation or edit reaches the nodes
whose pods it selects, not all of them, and claim status writes reach none.

The slice is a superset filter, not a decision: the node's planner
(:func:`dynvol_core.dispatch.plan_node`) still matches every claim with every pod itself,
as it did when it read the claims directly. Everything here is pure: the controller's
shell (``dynvol_controllers.slicing``) feeds it from its caches and writes the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dynvol_core import constants as c
from dynvol_core.models import DynamicVolumeClaim, PodInfo

__all__ = [
    "ENTRY_METADATA",
    "claim_object",
    "claims_for_node",
    "slice_entries",
    "slice_entry",
    "slice_object",
]

#: The claim metadata a slice entry copies: what a node's planner reads of a claim.
ENTRY_METADATA = (
    "namespace",
    "name",
    "uid",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
)


def claims_for_node(
    claims: Iterable[DynamicVolumeClaim], pods: Iterable[PodInfo]
) -> list[DynamicVolumeClaim]:
    """The claims that select at least one opted-in pod of ``pods`` (one node's pods).

    Wider than :func:`dynvol_core.dispatch.selected_pods` on purpose: a claim being deleted,
    or one whose pods are terminating, stays in the slice, so that the node sees the same
    claims as it would reading them all and plans their unmounts itself.
    """
    by_namespace: dict[str, list[PodInfo]] = {}
    for pod in pods:
        if pod.opted_in:
            by_namespace.setdefault(pod.namespace, []).append(pod)
    chosen = [
        claim
        for claim in claims
        if any(claim.selector.selects(p.labels) for p in by_namespace.get(claim.namespace, ()))
    ]
    chosen.sort(key=lambda cl: (cl.namespace, cl.name, cl.uid))
    return chosen


def slice_entry(claim: Mapping[str, Any]) -> dict[str, Any]:
    """One slice entry: the claim's identity (:data:`ENTRY_METADATA`) and its spec."""
    meta = claim.get("metadata") or {}
    entry: dict[str, Any] = {k: meta[k] for k in ENTRY_METADATA if meta.get(k) is not None}
    entry["spec"] = claim.get("spec") or {}
    return entry


def slice_entries(claims: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The entries of ``claims`` (raw objects), in a stable order (namespace, name, uid), so
    that equal sets of claims give equal slices and no write."""
    entries = [slice_entry(cl) for cl in claims]
    entries.sort(key=lambda e: (e.get("namespace", ""), e.get("name", ""), e.get("uid", "")))
    return entries


def slice_object(node: str, entries: list[dict[str, Any]], *, node_uid: str = "") -> dict[str, Any]:
    """The ``DynamicVolumeClaimSlice`` of ``node``, owned by its Node when its UID is known
    (so that it goes with the Node)."""
    meta: dict[str, Any] = {
        "name": node,
        "labels": {c.LABEL_MANAGED_BY: c.LABEL_MANAGED_BY_VALUE},
    }
    if node_uid:
        meta["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Node", "name": node, "uid": node_uid}
        ]
    return {
        "apiVersion": f"{c.GROUP}/{c.VERSION}",
        "kind": c.KIND_CLAIM_SLICE,
        "metadata": meta,
        "spec": {"nodeName": node, "claims": entries},
    }


def claim_object(entry: Mapping[str, Any], *, revision: str = "") -> dict[str, Any]:
    """The DynamicVolumeClaim an entry stands for, as
    :meth:`~dynvol_core.models.DynamicVolumeClaim.from_object` reads it.

    ``revision`` becomes its ``metadata.resourceVersion`` (the slice's), so that parsed
    models can be memoised per revision of the slice.
    """
    meta: dict[str, Any] = {k: entry[k] for k in ENTRY_METADATA if k in entry}
    if revision:
        meta["resourceVersion"] = revision
    return {
        "apiVersion": f"{c.GROUP}/{c.VERSION}",
        "kind": c.KIND_CLAIM,
        "metadata": meta,
        "spec": entry.get("spec") or {},
    }
