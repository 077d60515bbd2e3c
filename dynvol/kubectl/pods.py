"""``kubectl dynvol pod NAME``: what is mounted where in one pod, its health and its DMP.

For the pod: its opt-in (class, root path, dispatch policy, whether the webhook injected
the volume), and for each DynamicVolumeMount made for it (matched by the pod's UID): the
path inside the containers (root path + mountpoint), read-only or not, the provider, the
phase and Ready condition, repairs, and the Dynamic Mount Pod that holds the mount, with
that pod's phase and readiness.
"""

from __future__ import annotations

import posixpath
from typing import Any

from dynvol_core import DynamicVolumeMount, InvalidObject, PodInfo
from dynvol_core import constants as c
from dynvol_kube import APINotFound, Client
from dynvol_kube.resources import MOUNTS, PODS

from .reading import items, list_all, text
from .tables import render

__all__ = ["PodNotFound", "gather", "table"]


class PodNotFound(Exception):
    """The pod the command names does not exist."""


def _dmp_entry(dmp: dict[str, Any] | None, name: str) -> dict[str, Any]:
    if dmp is None:
        return {"name": name, "exists": False, "phase": "", "ready": False, "restarts": 0}
    statuses = items(dmp, "status", "containerStatuses")
    restarts = sum(
        s.get("restartCount", 0) for s in statuses if isinstance(s.get("restartCount"), int)
    )
    ready = any(
        cond.get("type") == "Ready" and cond.get("status") == "True"
        for cond in items(dmp, "status", "conditions")
    )
    return {
        "name": name,
        "exists": True,
        "phase": text(dmp, "status", "phase"),
        "ready": ready,
        "restarts": restarts,
        "node": text(dmp, "spec", "nodeName"),
    }


def _condition(obj: dict[str, Any], kind: str) -> dict[str, str] | None:
    for cond in items(obj, "status", "conditions"):
        if cond.get("type") == kind:
            return {k: text(cond, k) for k in ("status", "reason", "message", "lastTransitionTime")}
    return None


def _path(root: str, mountpoint: str) -> str:
    """Where the mount shows in the containers: the root path joined with the mountpoint."""
    return posixpath.join(root, mountpoint.lstrip("/")) if root else mountpoint


async def gather(
    client: Client, namespace: str, name: str, system_namespace: str
) -> dict[str, Any]:
    """The report of pod ``namespace/name``; raises :class:`PodNotFound`."""
    try:
        obj = await client.get(PODS, name, namespace=namespace)
    except APINotFound as exc:
        raise PodNotFound(f'pod "{name}" not found in namespace "{namespace}"') from exc
    try:
        pod = PodInfo.from_object(obj)
    except InvalidObject as exc:
        raise PodNotFound(f'pod "{name}" in namespace "{namespace}" cannot be read: {exc}') from exc
    root = pod.mount_path_root or ""
    mounts = await list_all(
        client, MOUNTS, namespace=namespace, label_selector=f"{c.LABEL_POD_UID}={pod.uid}"
    )
    dmps: dict[str, dict[str, Any] | None] = {}
    entries: list[dict[str, Any]] = []
    for raw in mounts:
        try:
            dvm = DynamicVolumeMount.from_object(raw)
        except InvalidObject as exc:
            entries.append({
                "name": text(raw, "metadata", "name"), "claim": text(raw, "spec", "claimName"),
                "path": "", "phase": "Invalid", "message": str(exc), "dmp": None,
            })  # fmt: skip
            continue
        if dvm.spec.pod_uid != pod.uid:
            continue  # a label can lie; the spec says whose mount it is
        dmp_name = dvm.spec.dmp_name
        if dmp_name and dmp_name not in dmps:
            try:
                dmps[dmp_name] = await client.get(PODS, dmp_name, namespace=system_namespace)
            except APINotFound:
                dmps[dmp_name] = None
        status = dvm.status
        entries.append({
            "name": dvm.name,
            "claim": dvm.spec.claim_name,
            "path": _path(root, dvm.spec.mountpoint),
            "mountpoint": dvm.spec.mountpoint,
            "readOnly": dvm.spec.read_only,
            "provider": dvm.spec.provider,
            "phase": str(status.phase) if status else "Pending",
            "ready": _condition(raw, "Ready"),
            "message": status.message if status else "",
            "repairCount": status.repair_count if status else 0,
            "lastRepairAt": text(raw, "status", "lastRepairAt"),
            "mountedAt": text(raw, "status", "mountedAt"),
            "dmp": _dmp_entry(dmps.get(dmp_name), dmp_name) if dmp_name else None,
        })  # fmt: skip
    entries.sort(key=lambda e: (e["path"], e["name"]))
    volume = pod.volume
    return {
        "kind": "DynvolPod",
        "namespace": pod.namespace,
        "name": pod.name,
        "uid": pod.uid,
        "node": pod.node_name or "",
        "phase": pod.phase,
        "annotated": bool(pod.storage_provider_class_annotation),
        "storageProviderClass": pod.storage_provider_class_annotation or "",
        "rootPath": root,
        "dispatchPolicy": volume.policy if volume else (pod.dispatch_policy_annotation or ""),
        "volumeInjected": volume is not None,
        "created": text(obj, "metadata", "creationTimestamp"),
        "mounts": entries,
    }


def _health(entry: dict[str, Any]) -> str:
    ready = entry.get("ready")
    if not ready:
        return ""
    health = "Ready" if ready["status"] == "True" else (ready["reason"] or "NotReady")
    if entry.get("repairCount"):
        health += f" ({entry['repairCount']} repairs)"
    return health


def _dmp_state(dmp: dict[str, Any] | None) -> str:
    if dmp is None:
        return ""
    if not dmp["exists"]:
        return "Missing"
    state = f"{dmp['phase']}{'' if dmp['ready'] else ', not ready'}"
    return state + (f", {dmp['restarts']} restarts" if dmp["restarts"] else "")


def _volume(report: dict[str, Any]) -> str:
    if report["volumeInjected"]:
        return "injected"
    if report["annotated"]:
        # Opted in by annotation, but admitted without the webhook's volume.
        return "not injected (was the pod created while dynvol's webhook was not serving?)"
    return "not injected (the pod has not opted in)"


def table(report: dict[str, Any]) -> str:
    """A few lines about the pod, then one row per mount."""
    policy = f" ({report['dispatchPolicy']})" if report["dispatchPolicy"] else ""
    lines = [
        f"Pod:         {report['namespace']}/{report['name']}",
        f"Node:        {report['node'] or '<none>'}",
        f"Class:       {(report['storageProviderClass'] or '<none>') + policy}",
        f"Root path:   {report['rootPath'] or '<none>'}",
        f"Volume:      {_volume(report)}",
    ]
    out = "\n".join(lines) + "\n\n"
    if not report["mounts"]:
        return out + "No dynvol mounts in this pod.\n"
    rows = [
        [
            m["path"],
            m["claim"],
            m.get("provider", ""),
            "ro" if m.get("readOnly") else "rw",
            m["phase"],
            _health(m),
            (m["dmp"] or {}).get("name", ""),
            _dmp_state(m["dmp"]),
            m["message"],
        ]
        for m in report["mounts"]
    ]
    headers = [
        "path",
        "claim",
        "provider",
        "mode",
        "phase",
        "health",
        "dmp",
        "dmp status",
        "message",
    ]
    return out + render(headers, rows)
