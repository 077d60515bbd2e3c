"""The publish guard: NodePublishVolume re-checks the pod before it binds a slot.

Admission (the ``dynvol-pods`` ValidatingAdmissionPolicy) already refuses pods that carry
dynvol's volume without having opted in, or with a volume that differs from their
annotations. The node plugin runs as root, so it does not take that on trust: before it
binds a slot it looks at the pod named in the volume context (kubelet's podInfoOnMount)
and at the StorageProviderClass, and refuses (FAILED_PRECONDITION) unless

* the pod exists with the UID kubelet named, and is bound to this node;
* the pod opted in itself (the webhook copies a namespace's opt-in onto the pod) and its
  annotations name the class and dispatch policy the volume context carries;
* the pod's volume ``dynamic-volume-root-path`` is exactly what the webhook injects for
  those annotations, read-only included (whether the bind itself is read-only is the
  request's ``readonly``, which kubelet takes from that same field);
* the class exists and its ``allowedNamespaces`` (when set) include the pod's namespace.

:func:`check_pod` is that decision, pure. :class:`PodGuard` runs it over an
:class:`ObjectLookup`: the node process gives it one that reads the apiserver (wired in
:mod:`dynvol.wiring`, since this package talks to no apiserver itself);
:class:`DirectoryLookup` reads the objects from files, for runs with no apiserver such as
csi-sanity (``hack/sanity.sh`` writes the pod and class its fake volume belongs to).

Neighbours: ``validation`` (makes the :class:`PublishRequest`), ``node`` (calls the guard),
``errors`` (maps :class:`PublishRefused` and :class:`GuardUnavailable` to status codes).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs

from dynvol_core import constants as c
from dynvol_core.errors import DynvolError
from dynvol_csi.validation import PublishRequest

__all__ = [
    "DirectoryLookup",
    "GuardUnavailable",
    "ObjectLookup",
    "PodGuard",
    "PublishGuard",
    "PublishRefused",
    "check_pod",
    "expected_volume",
]

log = logging.getLogger(__name__)

_OPT_IN_HINT = (
    f"opt the pod in with the annotations {c.ANNOTATION_STORAGE_PROVIDER_CLASS} and "
    f"{c.ANNOTATION_MOUNT_PATH_ROOT} and let dynvol's webhook add the volume"
)


class PublishRefused(DynvolError):
    """The pod, or its class, does not allow this volume to be published."""


class GuardUnavailable(DynvolError):
    """The guard could not see the pod or the class now (apiserver unreachable); retry."""


class PublishGuard(Protocol):
    """Decides, before anything is bound, whether a publish may go ahead."""

    async def check(self, request: PublishRequest) -> None:
        """Return if the publish may proceed.

        :raises PublishRefused: it may not (the message says why, for kubelet's Events).
        :raises GuardUnavailable: the answer is not known now; kubelet retries.
        """


class ObjectLookup(Protocol):
    """Where a :class:`PodGuard` reads the pod and the class from."""

    async def pod(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        """The pod, or None if there is none."""

    async def storage_class(self, name: str) -> Mapping[str, Any] | None:
        """The StorageProviderClass, or None if there is none."""


def expected_volume(class_name: str, policy: str) -> dict[str, Any]:
    """The volume dynvol's webhook injects for this class and policy (docs/design.md §2)."""
    return {
        "name": c.VOLUME_NAME,
        "csi": {
            "driver": c.DRIVER_NAME,
            "readOnly": True,
            "volumeAttributes": {c.VOLUME_ATTR_POLICY: policy, c.VOLUME_ATTR_CLASS: class_name},
        },
    }


def check_pod(
    request: PublishRequest,
    pod: Mapping[str, Any] | None,
    storage_class: Mapping[str, Any] | None,
    *,
    node_id: str,
) -> None:
    """Refuse the publish unless the pod and class allow it (see the module docstring).

    :raises PublishRefused: naming the first thing that is wrong and what to do.
    """
    who = f"pod {request.pod_namespace}/{request.pod_name}"
    if pod is None:
        raise PublishRefused(f"{who} named in the volume context does not exist")
    meta = pod.get("metadata") or {}
    if meta.get("uid") != request.pod_uid:
        raise PublishRefused(
            f"{who} has UID {meta.get('uid')!r}, not {request.pod_uid!r} as in the volume "
            "context; it was replaced, kubelet will publish for the new pod"
        )
    bound_to = (pod.get("spec") or {}).get("nodeName")
    if bound_to != node_id:
        raise PublishRefused(f"{who} is bound to node {bound_to!r}, not to this node {node_id!r}")
    annotations = meta.get("annotations") or {}
    if str(annotations.get(f"{c.GROUP}/inject", "")).lower() == "false":
        raise PublishRefused(f"{who} opted out ({c.GROUP}/inject: 'false') but carries the volume")
    class_name = annotations.get(c.ANNOTATION_STORAGE_PROVIDER_CLASS)
    if not class_name:
        raise PublishRefused(
            f"{who} carries dynvol's volume without the annotation "
            f"{c.ANNOTATION_STORAGE_PROVIDER_CLASS}; {_OPT_IN_HINT}"
        )
    policy = annotations.get(c.ANNOTATION_DISPATCH_POLICY, c.POLICY_INDEPENDENT)
    if (class_name, policy) != (request.class_name, request.policy):
        raise PublishRefused(
            f"the volume context asks for class {request.class_name!r} with policy "
            f"{request.policy!r}, but the annotations of {who} say {class_name!r} and "
            f"{policy!r}; remove the volume from the pod spec and let dynvol's webhook add it"
        )
    volumes = (pod.get("spec") or {}).get("volumes") or []
    ours = [
        v
        for v in volumes
        if v.get("name") == c.VOLUME_NAME or (v.get("csi") or {}).get("driver") == c.DRIVER_NAME
    ]
    if ours != [expected_volume(class_name, policy)]:
        raise PublishRefused(
            f"{who}: its dynvol volume must be exactly what the webhook injects for its "
            f"annotations ({c.VOLUME_NAME}, driver {c.DRIVER_NAME}, readOnly: true, the class "
            "and policy as volumeAttributes); remove it from the pod spec and let the webhook "
            "add it"
        )
    if storage_class is None:
        raise PublishRefused(
            f"StorageProviderClass {class_name!r}, named by {who}, does not exist; create it "
            "or name another class in the annotation"
        )
    allowed = (storage_class.get("spec") or {}).get("allowedNamespaces")
    if allowed and request.pod_namespace not in allowed:
        raise PublishRefused(
            f"StorageProviderClass {class_name!r} may not be used in namespace "
            f"{request.pod_namespace!r} (allowedNamespaces: {', '.join(map(str, allowed))})"
        )


@attrs.frozen
class PodGuard:
    """A :class:`PublishGuard` that reads the pod and class through ``lookup``."""

    lookup: ObjectLookup
    node_id: str

    async def check(self, request: PublishRequest) -> None:
        pod = await self.lookup.pod(request.pod_namespace, request.pod_name)
        storage_class = await self.lookup.storage_class(request.class_name)
        check_pod(request, pod, storage_class, node_id=self.node_id)


@attrs.frozen
class DirectoryLookup:
    """Objects kept as JSON files: ``pods/<namespace>/<name>.json`` and
    ``storageproviderclasses/<name>.json`` under ``root``.

    For node plugins that run without an apiserver (``dynvol node --csi-only
    --publish-guard objects:DIR``, as csi-sanity does). The names come from a validated
    :class:`PublishRequest` (DNS-1123 names), so they are single path components.
    """

    root: Path

    async def pod(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return await asyncio.to_thread(self._read, self.root / "pods" / namespace / f"{name}.json")

    async def storage_class(self, name: str) -> Mapping[str, Any] | None:
        return await asyncio.to_thread(self._read, self.root / c.PLURAL_CLASS / f"{name}.json")

    @staticmethod
    def _read(path: Path) -> Mapping[str, Any] | None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise GuardUnavailable(f"cannot read {path}: {exc}") from exc
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise GuardUnavailable(f"{path} is not JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise GuardUnavailable(f"{path} does not hold an object")
        return obj
