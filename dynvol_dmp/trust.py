"""Whether a DynamicVolumeMount is one this mount pod may act on (docs/design.md §6.3).

Admission lets only the node plugin write DynamicVolumeMounts, but the mount pod is a
privileged root process and does not rely on that alone: before it mounts anything, it
checks each object against what it knows to be true, namely its own Pod (written by the
node plugin: its node, the class and, for an ``independent`` mount pod, the one user pod it
serves) and the objects the mount names, read from the API: the user pod, the claim and the
class. An object that fails a check gets a Warning Event (``UntrustedMount``) and is
otherwise left alone: no finalizer, no status, no mount.

Everything here is pure; :mod:`dynvol_dmp.agent` reads the objects and acts on the verdict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import attrs

from dynvol_core import constants as c
from dynvol_core.dispatch import label_value
from dynvol_core.errors import InvalidObject, InvalidPath
from dynvol_core.models import DynamicVolumeMount, PodInfo, StorageProviderClass
from dynvol_core.paths import components_below, validate_uid

__all__ = ["REASON_UNTRUSTED", "Identity", "check_mount", "target_names"]

#: The reason of the Warning Event about a DynamicVolumeMount the mount pod refuses.
REASON_UNTRUSTED: Final = "UntrustedMount"


@attrs.frozen(kw_only=True)
class Identity:
    """What this mount pod is, read from its own Pod object.

    ``pod_uid`` and ``pod_namespace`` name the user pod of an ``independent`` mount pod
    (empty for ``shared`` ones, which serve every pod of their class on the node).
    """

    name: str
    namespace: str
    node_name: str
    policy: str
    class_label: str
    pod_uid: str = ""
    pod_namespace: str = ""

    @classmethod
    def from_pod(cls, obj: Mapping[str, Any]) -> Identity:
        """Read the mount pod's own Pod.

        :raises ValueError: if it does not carry what the node plugin gives every mount pod
            (a node, the component, class and policy labels, and for an independent one
            the user pod's UID and namespace).
        """
        try:
            pod = PodInfo.from_object(obj)
        except InvalidObject as exc:
            raise ValueError(f"this mount pod's own Pod is invalid: {exc}") from None
        labels = pod.labels
        problems = []
        if not pod.node_name:
            problems.append("spec.nodeName is not set")
        if labels.get(c.LABEL_COMPONENT) != c.COMPONENT_DMP:
            problems.append(f"label {c.LABEL_COMPONENT} is not {c.COMPONENT_DMP!r}")
        policy = labels.get(c.LABEL_POLICY, "")
        if policy not in c.POLICIES:
            problems.append(f"label {c.LABEL_POLICY} is {policy!r}")
        if not labels.get(c.LABEL_CLASS):
            problems.append(f"label {c.LABEL_CLASS} is missing")
        pod_uid = labels.get(c.LABEL_POD_UID, "")
        pod_namespace = labels.get(c.LABEL_POD_NAMESPACE, "")
        if policy == c.POLICY_INDEPENDENT and not (pod_uid and pod_namespace):
            problems.append(f"labels {c.LABEL_POD_UID} and {c.LABEL_POD_NAMESPACE} are missing")
        if problems:
            raise ValueError(
                f"Pod {pod.namespace}/{pod.name} does not look like a Dynamic Mount Pod made "
                f"by the node plugin: {'; '.join(problems)}"
            )
        return cls(
            name=pod.name,
            namespace=pod.namespace,
            node_name=pod.node_name or "",
            policy=policy,
            class_label=labels.get(c.LABEL_CLASS, ""),
            pod_uid=pod_uid if policy == c.POLICY_INDEPENDENT else "",
            pod_namespace=pod_namespace if policy == c.POLICY_INDEPENDENT else "",
        )


def target_names(identity: Identity, dvm: DynamicVolumeMount) -> tuple[tuple[str, ...], int]:
    """The names of ``spec.dmpTargetPath`` below ``/xvols``, and how many belong to the slot.

    An independent mount pod's ``/xvols`` is the slot, so the names are the mountpoint's;
    a shared one's is the class directory, so they are ``<slot-uuid>/<podUID>`` and then
    the mountpoint's, and the pod UID must be the mount's own: a mount of one pod cannot
    name another pod's slot.

    :raises InvalidPath: if the path is anything else.
    """
    spec = dvm.spec
    names = components_below(spec.dmp_target_path, c.DMP_XVOLS_DIR)
    mountpoint = tuple(part for part in spec.mountpoint.split("/") if part)
    slot_part = 0 if identity.policy == c.POLICY_INDEPENDENT else 2
    if slot_part:
        if len(names) < 2:
            raise InvalidPath(f"spec.dmpTargetPath {spec.dmp_target_path!r} names no slot")
        validate_uid(names[0], what="slot UUID in spec.dmpTargetPath")
        if names[1] != spec.pod_uid:
            raise InvalidPath(
                f"spec.dmpTargetPath {spec.dmp_target_path!r} is in the slot of pod UID "
                f"{names[1]!r}, not of spec.podUID {spec.pod_uid!r}"
            )
    if names[slot_part:] != mountpoint or not mountpoint:
        raise InvalidPath(
            f"spec.dmpTargetPath {spec.dmp_target_path!r} does not end in "
            f"spec.mountpoint {spec.mountpoint!r}"
        )
    return names, slot_part


def check_mount(
    identity: Identity,
    dvm: DynamicVolumeMount,
    *,
    pod: Mapping[str, Any] | None,
    claim: Mapping[str, Any] | None,
    spc: StorageProviderClass | None,
) -> str | None:
    """Why this mount pod must not act on ``dvm``, or None if it may.

    :param pod: the user pod ``spec.podName`` in the mount's namespace (None: not found).
    :param claim: the claim ``spec.claimName`` (None: not found).
    :param spc: the class ``spec.storageProviderClass`` (None: not found).
    """
    spec, namespace = dvm.spec, dvm.namespace
    if spec.node_name != identity.node_name:
        return (
            f"spec.nodeName is {spec.node_name!r}, but this mount pod runs on node "
            f"{identity.node_name!r}"
        )
    if label_value(spec.storage_provider_class) != identity.class_label:
        return (
            f"spec.storageProviderClass {spec.storage_provider_class!r} is not the class "
            "this mount pod serves"
        )
    if identity.policy == c.POLICY_INDEPENDENT and (
        spec.pod_uid != identity.pod_uid or namespace != identity.pod_namespace
    ):
        return (
            f"spec.podUID {spec.pod_uid!r} in namespace {namespace!r} is not the pod this "
            f"mount pod serves (pod UID {identity.pod_uid!r} in {identity.pod_namespace!r})"
        )
    try:
        target_names(identity, dvm)
    except InvalidPath as exc:
        return str(exc)
    problem = _check_pod(identity, dvm, pod)
    if problem:
        return problem
    if claim is None:
        return f"spec.claimName: DynamicVolumeClaim {namespace}/{spec.claim_name} does not exist"
    claim_uid = (claim.get("metadata") or {}).get("uid")
    if claim_uid != spec.claim_uid:
        return (
            f"spec.claimUID {spec.claim_uid!r} is not the UID of DynamicVolumeClaim "
            f"{namespace}/{spec.claim_name} ({claim_uid!r})"
        )
    pinned = (claim.get("spec") or {}).get("storageProviderClass")
    if pinned and pinned != spec.storage_provider_class:
        return (
            f"DynamicVolumeClaim {namespace}/{spec.claim_name} pins class {pinned!r}, not "
            f"spec.storageProviderClass {spec.storage_provider_class!r}"
        )
    if spc is None:
        return (
            f"spec.storageProviderClass: StorageProviderClass {spec.storage_provider_class!r} "
            "does not exist"
        )
    if not spc.allows_namespace(namespace):
        return (
            f"StorageProviderClass {spc.name!r} does not allow namespace {namespace!r} "
            "(spec.allowedNamespaces)"
        )
    if spc.provider != spec.provider:
        return (
            f"spec.provider {spec.provider!r} is not the provider of StorageProviderClass "
            f"{spc.name!r} ({spc.provider!r})"
        )
    return None


def _check_pod(
    identity: Identity, dvm: DynamicVolumeMount, raw: Mapping[str, Any] | None
) -> str | None:
    spec, namespace = dvm.spec, dvm.namespace
    where = f"Pod {namespace}/{spec.pod_name}"
    if raw is None:
        return f"spec.podName: {where} does not exist"
    try:
        pod = PodInfo.from_object(raw)
    except InvalidObject as exc:
        return f"spec.podName: {where} is invalid: {exc}"
    if pod.uid != spec.pod_uid:
        return f"spec.podUID {spec.pod_uid!r} is not the UID of {where} ({pod.uid!r})"
    if pod.node_name != identity.node_name:
        return f"{where} runs on node {pod.node_name!r}, not on {identity.node_name!r}"
    if pod.volume is None or pod.volume.class_name != spec.storage_provider_class:
        return f"{where} does not carry the dynvol volume of class {spec.storage_provider_class!r}"
    if pod.volume.policy != identity.policy:
        return (
            f"{where} asks for dispatch policy {pod.volume.policy!r}; this mount pod is "
            f"{identity.policy!r}"
        )
    return None
