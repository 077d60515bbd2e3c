"""The Kubernetes resources dynvol reads and writes, and how their URLs are built.

Plain descriptors used by :mod:`.client` (which sends the requests) and by the informers in
:mod:`dynvol_kube.watching` (which list and watch them).
"""

from __future__ import annotations

from urllib.parse import quote

import attrs

from dynvol_core import constants


@attrs.frozen
class Resource:
    """One API resource: where it lives and what its objects are called."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        """``apiVersion`` of its objects (``v1`` for the core group)."""
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(
        self,
        *,
        namespace: str | None = None,
        name: str | None = None,
        subresource: str | None = None,
    ) -> str:
        """The URL path of the collection (no name) or of one object."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        parts = [base]
        if self.namespaced and namespace:
            parts.append(f"namespaces/{quote(namespace, safe='')}")
        parts.append(self.plural)
        if name is not None:
            if not name:
                raise ValueError(f"empty {self.kind} name")
            parts.append(quote(name, safe=""))
            if subresource:
                parts.append(subresource)
        return "/".join(parts)


PODS = Resource("", "v1", "pods", "Pod")
SECRETS = Resource("", "v1", "secrets", "Secret")
NAMESPACES = Resource("", "v1", "namespaces", "Namespace", namespaced=False)
NODES = Resource("", "v1", "nodes", "Node", namespaced=False)
EVENTS = Resource("", "v1", "events", "Event")
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease")
MUTATING_WEBHOOKS = Resource(
    "admissionregistration.k8s.io",
    "v1",
    "mutatingwebhookconfigurations",
    "MutatingWebhookConfiguration",
    namespaced=False,
)
VALIDATING_WEBHOOKS = Resource(
    "admissionregistration.k8s.io",
    "v1",
    "validatingwebhookconfigurations",
    "ValidatingWebhookConfiguration",
    namespaced=False,
)
CLASSES = Resource(
    constants.GROUP,
    constants.VERSION,
    "storageproviderclasses",
    "StorageProviderClass",
    namespaced=False,
)
CLAIMS = Resource(constants.GROUP, constants.VERSION, "dynamicvolumeclaims", "DynamicVolumeClaim")
MOUNTS = Resource(constants.GROUP, constants.VERSION, "dynamicvolumemounts", "DynamicVolumeMount")
#: One per node, named after it, written by the controller: the claims its node plugin needs.
CLAIM_SLICES = Resource(
    constants.GROUP,
    constants.VERSION,
    constants.PLURAL_CLAIM_SLICE,
    constants.KIND_CLAIM_SLICE,
    namespaced=False,
)
