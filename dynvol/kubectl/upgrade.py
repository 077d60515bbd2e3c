"""``kubectl dynvol upgrade-dmps``: move running mounts onto the node plugin's current image.

An upgrade of dynvol rolls the node plugin and the controller; it never restarts a Dynamic
Mount Pod, because a DMP's FUSE daemons are the mounts its pods read (docs/operations.md,
"Upgrading dynvol"). DMPs started before the upgrade keep the old image until an operator
moves them: this command replaces, one DMP at a time, each DMP whose image is not the one
its node's plugin now gives DMPs (its ``--dmp-image``, else its own image). The node plugin
creates the DMP again at once under the same name with the new image, and its agent mounts
every DynamicVolumeMount again. The pods it serves see their mounts go for that gap (reads
fail: the path is an empty directory), which the command measures and prints per DMP: from
the deletion to every mount of the DMP reported Mounted again.

    kubectl dynvol upgrade-dmps [--node NODE] [--dry-run] [--timeout SECONDS]
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from typing import Any

from dynvol_core import constants as c
from dynvol_core.dispatch import label_value
from dynvol_kube import APINotFound, Client
from dynvol_kube.resources import MOUNTS, PODS

from .reading import dig, items, list_all, text

__all__ = ["UpgradeError", "outdated", "plugin_images", "run", "table"]

#: The node plugin's pods (manifests/base/node.yaml).
NODE_PODS = f"{c.LABEL_COMPONENT}=node"
DMP_PODS = f"{c.LABEL_COMPONENT}={c.COMPONENT_DMP},{c.LABEL_MANAGED_BY}={c.LABEL_MANAGED_BY_VALUE}"
_POLL = 0.2


class UpgradeError(RuntimeError):
    """A DMP did not come back within the timeout (the command stops there)."""


def _arg(args: Iterable[object], flag: str) -> str | None:
    """The value of ``--flag=VALUE`` or ``--flag VALUE`` in a container's command line."""
    listed = [a for a in args if isinstance(a, str)]
    for i, arg in enumerate(listed):
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1 :]
        if arg == flag and i + 1 < len(listed):
            return listed[i + 1]
    return None


def plugin_images(node_pods: Iterable[dict[str, Any]]) -> dict[str, str]:
    """node -> the image that node's plugin gives the DMPs it creates now.

    A node plugin pod being deleted or not running is left out (during a rollout its node
    has no answer yet, and its DMPs are left alone).
    """
    found: dict[str, str] = {}
    for pod in node_pods:
        if dig(pod, "metadata", "deletionTimestamp") or text(pod, "status", "phase") != "Running":
            continue
        node = text(pod, "spec", "nodeName")
        containers = items(pod, "spec", "containers")
        named = [x for x in containers if x.get("name") == "node"] or containers[:1]
        if not node or not named:
            continue
        container = named[0]
        args = [*(dig(container, "command") or []), *(dig(container, "args") or [])]
        image = _arg(args, "--dmp-image") or text(container, "image")
        if image:
            found[node] = image
    return found


def _dmp_image(dmp: dict[str, Any]) -> str:
    containers = items(dmp, "spec", "containers")
    named = [x for x in containers if x.get("name") == "dmp"] or containers[:1]
    return text(named[0], "image") if named else ""


def outdated(
    dmps: Iterable[dict[str, Any]], images: Mapping[str, str], *, node: str | None = None
) -> list[dict[str, Any]]:
    """The DMPs to move, in the order to move them (by node, then name): running, not being
    deleted, on a node whose plugin's image is known, with another image than that."""
    chosen = []
    for dmp in dmps:
        where = text(dmp, "spec", "nodeName")
        if node is not None and where != node:
            continue
        if dig(dmp, "metadata", "deletionTimestamp") or text(dmp, "status", "phase") != "Running":
            continue
        want = images.get(where)
        if want and _dmp_image(dmp) != want:
            chosen.append(dmp)
    return sorted(chosen, key=lambda d: (text(d, "spec", "nodeName"), text(d, "metadata", "name")))


def _entry(dmp: dict[str, Any], images: Mapping[str, str]) -> dict[str, Any]:
    node = text(dmp, "spec", "nodeName")
    return {
        "name": text(dmp, "metadata", "name"),
        "node": node,
        "from": _dmp_image(dmp),
        "to": images.get(node, ""),
    }


async def _mounts_of(client: Client, name: str) -> list[dict[str, Any]]:
    return [
        d
        for d in await list_all(client, MOUNTS, label_selector=f"{c.LABEL_DMP}={label_value(name)}")
        if text(d, "spec", "dmpName") == name and not dig(d, "metadata", "deletionTimestamp")
    ]


async def _move(
    client: Client, dmp: dict[str, Any], want: str, system_namespace: str, wait_s: float
) -> dict[str, Any]:
    """Delete ``dmp`` and wait for its replacement to run ``want`` with every mount it had
    Mounted again; the figures of the move."""
    name, uid = text(dmp, "metadata", "name"), text(dmp, "metadata", "uid")
    # Each mount's mountedAt now: the new DMP's agent writes a new one when it has mounted
    # it again (the old one reports the mount Pending as it stops, when it gets to).
    before = {
        text(d, "metadata", "uid"): text(d, "status", "mountedAt")
        for d in await _mounts_of(client, name)
    }
    began = time.monotonic()
    await client.delete(PODS, name, namespace=system_namespace, uid=uid)
    running_at: float | None = None
    while True:
        elapsed = time.monotonic() - began
        if elapsed > wait_s:
            raise UpgradeError(
                f"DMP {name} did not come back on {want} with its {len(before)} mount(s) "
                f"Mounted within {wait_s:g}s"
            )
        try:
            pod: dict[str, Any] | None = await client.get(PODS, name, namespace=system_namespace)
        except APINotFound:
            pod = None
        if (
            pod is not None
            and text(pod, "metadata", "uid") != uid
            and text(pod, "status", "phase") == "Running"
            and _dmp_image(pod) == want
        ):
            if running_at is None:
                running_at = elapsed
            # Mounts that went away meanwhile (their pod left) no longer count.
            now = {text(d, "metadata", "uid"): d for d in await _mounts_of(client, name)}
            waiting = [
                u
                for u in before
                if u in now
                and (
                    text(now[u], "status", "phase") != "Mounted"
                    or text(now[u], "status", "mountedAt") == before[u]
                )
            ]
            if not waiting:
                return {
                    "mounts": len([u for u in before if u in now]),
                    "running_after_s": round(running_at, 3),
                    "mounted_after_s": round(elapsed, 3),
                }
        await asyncio.sleep(_POLL)


async def run(
    client: Client,
    system_namespace: str,
    *,
    node: str | None = None,
    dry_run: bool = False,
    wait_s: float = 120.0,
) -> dict[str, Any]:
    """Move the outdated DMPs (all, or those of ``node``) one after another, waiting up to
    ``wait_s`` for each to be back."""
    node_pods = await list_all(client, PODS, namespace=system_namespace, label_selector=NODE_PODS)
    images = plugin_images(node_pods)
    dmps = await list_all(client, PODS, namespace=system_namespace, label_selector=DMP_PODS)
    chosen = outdated(dmps, images, node=node)
    report: dict[str, Any] = {"dryRun": dry_run, "images": images, "dmps": []}
    for dmp in chosen:
        entry = _entry(dmp, images)
        if not dry_run:
            entry.update(await _move(client, dmp, entry["to"], system_namespace, wait_s))
        report["dmps"].append(entry)
    return report


def table(report: dict[str, Any]) -> str:
    rows = report["dmps"]
    if not rows:
        return "Every running DMP runs its node plugin's image; nothing to move.\n"
    out = [f"{'DMP':<48} {'NODE':<16} {'FROM -> TO'}"]
    for row in rows:
        line = f"{row['name']:<48} {row['node']:<16} {row['from']} -> {row['to']}"
        if "mounted_after_s" in row:
            line += (
                f"  moved: {row['mounts']} mount(s) Mounted again after "
                f"{row['mounted_after_s']:.2f}s (running after {row['running_after_s']:.2f}s)"
            )
        out.append(line)
    if report["dryRun"]:
        out.append("(dry run: nothing was moved)")
    return "\n".join(out) + "\n"
