"""``kubectl dynvol status``: each claim, and per node and pod the phase of its mount.

The report lists the claims of one namespace (or all), each with its counts and Ready
condition (written by the controller) and its DynamicVolumeMounts (one per matched pod,
written by the node plugin and the DMP): node, pod, phase, DMP, message. Mounts whose claim
is gone (being unmounted) are listed under the claim's name with ``exists: false``.
"""

from __future__ import annotations

from typing import Any

from dynvol_core import DynamicVolumeMount, InvalidObject
from dynvol_kube import Client
from dynvol_kube.resources import CLAIMS, MOUNTS

from .reading import dig, items, list_all, text
from .tables import age, render

__all__ = ["gather", "table"]


def _mount_entry(obj: dict[str, Any]) -> tuple[tuple[str, str], dict[str, Any]]:
    """The claim (namespace, name) a mount belongs to, and its report entry."""
    meta = obj.get("metadata") or {}
    try:
        dvm = DynamicVolumeMount.from_object(obj)
    except InvalidObject as exc:
        # Shown, not skipped: a malformed mount is something the user needs to see.
        entry: dict[str, Any] = {
            "name": text(meta, "name"),
            "node": text(obj, "spec", "nodeName"),
            "pod": text(obj, "spec", "podName"),
            "podUID": text(obj, "spec", "podUID"),
            "phase": "Invalid",
            "dmp": text(obj, "spec", "dmpName"),
            "message": str(exc),
            "created": text(meta, "creationTimestamp"),
        }
        return (text(meta, "namespace"), text(obj, "spec", "claimName")), entry
    status = dvm.status
    entry = {
        "name": dvm.name,
        "node": dvm.spec.node_name,
        "pod": dvm.spec.pod_name,
        "podUID": dvm.spec.pod_uid,
        "phase": str(status.phase) if status else "Pending",
        "dmp": dvm.spec.dmp_name,
        "message": status.message if status else "",
        "repairCount": status.repair_count if status else 0,
        "deleting": dvm.deleting,
        "created": text(meta, "creationTimestamp"),
    }
    return (dvm.namespace, dvm.spec.claim_name), entry


def _ready(claim: dict[str, Any]) -> dict[str, str]:
    for condition in items(claim, "status", "conditions"):
        if condition.get("type") == "Ready":
            return {k: text(condition, k) for k in ("status", "reason", "message")}
    return {"status": "Unknown", "reason": "", "message": ""}


def _count(claim: dict[str, Any], field: str) -> int:
    value = dig(claim, "status", field)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


async def gather(client: Client, namespace: str | None) -> dict[str, Any]:
    """The status report of the claims in ``namespace`` (None: every namespace)."""
    claims = await list_all(client, CLAIMS, namespace=namespace)
    mounts = await list_all(client, MOUNTS, namespace=namespace)
    by_claim: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for obj in mounts:
        owner, entry = _mount_entry(obj)
        by_claim.setdefault(owner, []).append(entry)
    report: list[dict[str, Any]] = []
    seen = set()
    for claim in claims:
        ns, name = text(claim, "metadata", "namespace"), text(claim, "metadata", "name")
        seen.add((ns, name))
        report.append({
            "namespace": ns,
            "name": name,
            "exists": True,
            "storageProvider": text(claim, "spec", "storageProvider"),
            "mountpoint": text(claim, "spec", "mountpoint"),
            "readOnly": dig(claim, "spec", "readOnly") is True,
            "matchedPods": _count(claim, "matchedPods"),
            "mountedPods": _count(claim, "mountedPods"),
            "failedPods": _count(claim, "failedPods"),
            "ready": _ready(claim),
            "created": text(claim, "metadata", "creationTimestamp"),
            "mounts": by_claim.get((ns, name), []),
        })  # fmt: skip
    for (ns, name), entries in by_claim.items():
        if (ns, name) not in seen:
            report.append({"namespace": ns, "name": name, "exists": False, "mounts": entries})
    report.sort(key=lambda c: (c["namespace"], c["name"]))
    for claim in report:
        claim["mounts"].sort(key=lambda m: (m["node"], m["pod"], m["name"]))
    return {"kind": "DynvolStatus", "claims": report}


def table(report: dict[str, Any], *, all_namespaces: bool) -> str:
    """One row per claim and mount (a claim that matched no pod gets one row of its own)."""
    headers = ["claim", "ready", "mounted", "node", "pod", "phase", "dmp", "age", "message"]
    if all_namespaces:
        headers.insert(0, "namespace")
    rows = []
    for claim in report["claims"]:
        if claim["exists"]:
            ready = claim["ready"]["status"]
            mounted = f"{claim['mountedPods']}/{claim['matchedPods']}"
        else:
            ready, mounted = "Deleted", ""
        for mount in claim["mounts"] or [None]:
            if mount is None:
                row = [claim["name"], ready, mounted, "", "", "", "", age(claim["created"]),
                       claim["ready"]["message"]]  # fmt: skip
            else:
                phase = mount["phase"] + (" (deleting)" if mount.get("deleting") else "")
                row = [claim["name"], ready, mounted, mount["node"], mount["pod"], phase,
                       mount["dmp"], age(mount["created"]), mount["message"]]  # fmt: skip
            if all_namespaces:
                row.insert(0, claim["namespace"])
            rows.append(row)
    if not rows:
        return ""
    return render(headers, rows)
