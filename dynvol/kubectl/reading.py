"""Reading API objects for display: every field may be missing or of the wrong type.

The plugin shows what is in the cluster, including objects that a buggy or hostile writer
left malformed; a field that is not what it should be reads as empty instead of failing
the command. Also the resources the plugin reads beyond :mod:`dynvol_kube.resources`, and
a helper that lists every page of a collection.
"""

from __future__ import annotations

from typing import Any

from dynvol_kube import Client, Resource

__all__ = [
    "CRDS",
    "CSIDRIVERS",
    "CSINODES",
    "DAEMONSETS",
    "DEPLOYMENTS",
    "dig",
    "items",
    "list_all",
    "text",
]

DAEMONSETS = Resource("apps", "v1", "daemonsets", "DaemonSet")
DEPLOYMENTS = Resource("apps", "v1", "deployments", "Deployment")
CSIDRIVERS = Resource("storage.k8s.io", "v1", "csidrivers", "CSIDriver", namespaced=False)
CSINODES = Resource("storage.k8s.io", "v1", "csinodes", "CSINode", namespaced=False)
CRDS = Resource(
    "apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
    namespaced=False,
)  # fmt: skip

_PAGE = 500


def dig(obj: object, *path: str | int) -> Any:
    """``obj[path[0]][path[1]]...``, or None where a step is missing or of the wrong type."""
    for step in path:
        if isinstance(step, int):
            if not isinstance(obj, list) or not -len(obj) <= step < len(obj):
                return None
            obj = obj[step]
        else:
            if not isinstance(obj, dict):
                return None
            obj = obj.get(step)
    return obj


def text(obj: object, *path: str | int) -> str:
    """The string at ``path`` ('' when missing or not a string)."""
    value = dig(obj, *path)
    return value if isinstance(value, str) else ""


def items(obj: object, *path: str | int) -> list[dict[str, Any]]:
    """The list of objects at ``path`` (entries that are not objects are left out)."""
    value = dig(obj, *path)
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


async def list_all(
    client: Client,
    resource: Resource,
    *,
    namespace: str | None = None,
    label_selector: str | None = None,
) -> list[dict[str, Any]]:
    """Every object of ``resource`` (all pages)."""
    found: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        page = await client.list(
            resource, namespace=namespace, label_selector=label_selector, limit=_PAGE,
            continue_token=token,
        )  # fmt: skip
        found += items(page, "items")
        token = text(page, "metadata", "continue") or None
        if token is None:
            return found
