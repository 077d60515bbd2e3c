"""Admission decisions, as pure functions of the AdmissionReview request.

:func:`mutate_pod` decides whether a pod opted in and returns the JSON patch that injects
the CSI ephemeral volume and its HostToContainer mounts (docs/design.md §1);
:func:`review_response` wraps a decision into an AdmissionReview response. The webhook
server in :mod:`.webhooks` calls these; no I/O happens here, so they are unit-tested.

Opt-in (pod annotations win over namespace defaults):

* a pod annotated with ``storage-provider-class`` (and optionally
  ``volume-mount-path-root``, default ``/dynamic``, and ``mount-pod-dispatch-policy``,
  default ``independent``); or
* any pod in a namespace labelled ``dynamicvolume.csi.cloudnative101.net/inject=enabled``,
  taking the class, root and policy from the namespace's annotations of the same names.
* a pod annotated ``dynamicvolume.csi.cloudnative101.net/inject: "false"`` is never
  touched.

The patch also writes the opt-in onto the pod (class, root and policy annotations it does
not have yet), so that a pod carrying the volume always carries, itself, what the volume was
made from. The ValidatingAdmissionPolicy ``dynvol-pods`` (``manifests/base/
admission-policies.yaml``) refuses a pod whose dynvol volume is not exactly
:func:`injected_volume` of its own annotations, and the node plugin checks the same again
before it publishes (:func:`dynvol_csi.guards.check_pod`).

Which containers get the mount: every regular container and every native sidecar (an init
container with ``restartPolicy: Always``), because they run for the pod's whole life, which
is when claims come and go. Run-to-completion init containers do not: they finish before
the pod is Running, so a mount that arrives later could never reach them, and giving them
the root would only suggest otherwise.
"""

from __future__ import annotations

import base64
import json
import posixpath
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from dynvol_core import constants as c
from dynvol_core.validation import check_dns1123_subdomain, has_control_chars

__all__ = [
    "DEFAULT_ROOT_PATH",
    "INJECT_ENABLED",
    "LABEL_INJECT",
    "AdmissionDecision",
    "OptIn",
    "OptInError",
    "apply_patch",
    "injected_mount",
    "injected_volume",
    "mutate_pod",
    "opt_in_annotations",
    "opt_in_of",
    "review_response",
]

DEFAULT_ROOT_PATH = "/dynamic"
#: Namespace label that opts every pod of the namespace in (and pod annotation to opt out).
LABEL_INJECT = f"{c.GROUP}/inject"
INJECT_ENABLED = "enabled"

ClassLookup = Callable[[str], Mapping[str, Any] | None]


@attrs.frozen
class OptIn:
    """What a pod asked for: the class, the root path in its containers, the policy."""

    class_name: str
    root: str
    policy: str


@attrs.frozen(kw_only=True)
class AdmissionDecision:
    """Allow (with an optional JSON patch and warnings) or deny with a message."""

    allowed: bool
    patch: tuple[dict[str, Any], ...] = ()
    message: str = ""
    reason: str = ""
    warnings: tuple[str, ...] = ()

    @classmethod
    def allow(
        cls,
        patch: list[dict[str, Any]] | tuple[dict[str, Any], ...] = (),
        warnings: tuple[str, ...] = (),
    ) -> AdmissionDecision:
        return cls(allowed=True, patch=tuple(patch), warnings=warnings)

    @classmethod
    def deny(cls, message: str, *, reason: str = "Invalid") -> AdmissionDecision:
        return cls(allowed=False, message=message, reason=reason)


class OptInError(ValueError):
    """The pod opted in, but with values that cannot work."""


def opt_in_of(pod: Mapping[str, Any], namespace: Mapping[str, Any] | None = None) -> OptIn | None:
    """What the pod (or its namespace) asks for; None if it did not opt in.

    :raises OptInError: with a message for the user when the values are unusable.
    """
    annotations = pod.get("metadata", {}).get("annotations") or {}
    if str(annotations.get(LABEL_INJECT, "")).lower() == "false":
        return None
    ns_meta = (namespace or {}).get("metadata", {})
    ns_labels = ns_meta.get("labels") or {}
    ns_annotations = ns_meta.get("annotations") or {}
    namespace_opt_in = ns_labels.get(LABEL_INJECT) == INJECT_ENABLED

    def value(key: str) -> str | None:
        if key in annotations:
            return str(annotations[key])
        if namespace_opt_in and key in ns_annotations:
            return str(ns_annotations[key])
        return None

    class_name = value(c.ANNOTATION_STORAGE_PROVIDER_CLASS)
    if class_name is None:
        if namespace_opt_in:
            raise OptInError(
                f"the namespace opts pods in ({LABEL_INJECT}={INJECT_ENABLED}) but neither it "
                f"nor the pod has the annotation {c.ANNOTATION_STORAGE_PROVIDER_CLASS}; add it "
                "to the namespace or the pod"
            )
        if c.ANNOTATION_MOUNT_PATH_ROOT in annotations:
            raise OptInError(
                f"the pod sets {c.ANNOTATION_MOUNT_PATH_ROOT} but not "
                f"{c.ANNOTATION_STORAGE_PROVIDER_CLASS}; name the StorageProviderClass too"
            )
        return None
    errors = check_dns1123_subdomain(class_name, c.ANNOTATION_STORAGE_PROVIDER_CLASS)
    if errors:
        raise OptInError(f"annotation {errors[0]}")
    root = _normal_root(value(c.ANNOTATION_MOUNT_PATH_ROOT) or DEFAULT_ROOT_PATH)
    policy = value(c.ANNOTATION_DISPATCH_POLICY) or c.POLICY_INDEPENDENT
    if policy not in c.POLICIES:
        raise OptInError(
            f"annotation {c.ANNOTATION_DISPATCH_POLICY}: {policy!r} is not a dispatch policy; "
            f"use {c.POLICY_INDEPENDENT!r} or {c.POLICY_SHARED!r}"
        )
    return OptIn(class_name, root, policy)


def _normal_root(root: str) -> str:
    key = c.ANNOTATION_MOUNT_PATH_ROOT
    if has_control_chars(root) or not root.startswith("/"):
        raise OptInError(f"annotation {key}: {root!r} must be an absolute path such as /dynamic")
    parts = [p for p in root.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise OptInError(f"annotation {key}: {root!r} must not contain '..'")
    if not parts:
        raise OptInError(f"annotation {key}: the root path must not be '/'")
    if len(root) > 1024:
        raise OptInError(f"annotation {key}: the root path is longer than 1024 characters")
    return "/" + "/".join(parts)


def injected_volume(opt_in: OptIn) -> dict[str, Any]:
    """The CSI ephemeral inline volume of docs/design.md §1."""
    return {
        "name": c.VOLUME_NAME,
        "csi": {
            "driver": c.DRIVER_NAME,
            "readOnly": True,
            "volumeAttributes": {
                c.VOLUME_ATTR_POLICY: opt_in.policy,
                c.VOLUME_ATTR_CLASS: opt_in.class_name,
            },
        },
    }


def injected_mount(opt_in: OptIn) -> dict[str, Any]:
    """The volumeMount every long-running container gets."""
    return {
        "name": c.VOLUME_NAME,
        "mountPath": opt_in.root,
        "readOnly": True,
        "mountPropagation": "HostToContainer",
    }


def opt_in_annotations(opt_in: OptIn) -> dict[str, str]:
    """The pod annotations that say what ``opt_in`` says."""
    return {
        c.ANNOTATION_STORAGE_PROVIDER_CLASS: opt_in.class_name,
        c.ANNOTATION_MOUNT_PATH_ROOT: opt_in.root,
        c.ANNOTATION_DISPATCH_POLICY: opt_in.policy,
    }


def opt_in_annotations_patch(pod: Mapping[str, Any], opt_in: OptIn) -> list[dict[str, Any]]:
    """JSON patch operations that write the opt-in annotations the pod lacks.

    A pod opted in by its namespace gets the namespace's values copied onto it, so that every
    pod carrying the volume also carries, itself, the annotations the volume was made from:
    the admission policy (``manifests/base/admission-policies.yaml``) and the node plugin's
    publish check compare the volume with the pod's own annotations and never need the
    namespace. Annotations the pod already has are left alone (they won over the namespace).
    """
    present = pod.get("metadata", {}).get("annotations")
    wanted = opt_in_annotations(opt_in)
    if not present:
        return [{"op": "add", "path": "/metadata/annotations", "value": wanted}]
    return [
        {"op": "add", "path": "/metadata/annotations/" + _pointer_token(key), "value": value}
        for key, value in wanted.items()
        if key not in present
    ]


def _pointer_token(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _is_under(path: str, base: str) -> bool:
    path = posixpath.normpath(path)
    base = posixpath.normpath(base)
    return path == base or path.startswith(base.rstrip("/") + "/")


def mutate_pod(
    pod: Mapping[str, Any],
    namespace: Mapping[str, Any] | None = None,
    *,
    class_lookup: ClassLookup | None = None,
) -> AdmissionDecision:
    """The admission decision for a pod CREATE.

    Idempotent: a pod that already carries exactly the injected volume and mounts gets an
    empty patch. Denied: a root path that an existing volumeMount occupies (or one beneath
    it, which would hide claim mountpoints), a different volume already named
    ``dynamic-volume-root-path``, or opt-in values that cannot work. A pod that did not opt
    in is allowed untouched.
    """
    try:
        opt_in = opt_in_of(pod, namespace)
    except OptInError as exc:
        return AdmissionDecision.deny(str(exc))
    if opt_in is None:
        return AdmissionDecision.allow()
    warnings: list[str] = []
    pod_ns = pod.get("metadata", {}).get("namespace") or (namespace or {}).get("metadata", {}).get(
        "name", ""
    )
    if class_lookup is not None:
        spc = class_lookup(opt_in.class_name)
        if spc is None:
            warnings.append(
                f"StorageProviderClass {opt_in.class_name!r} does not exist (yet); claims "
                "will not mount in this pod until it does"
            )
        else:
            allowed = (spc.get("spec") or {}).get("allowedNamespaces")
            if allowed and pod_ns and pod_ns not in allowed:
                return AdmissionDecision.deny(
                    f"StorageProviderClass {opt_in.class_name!r} may not be used in namespace "
                    f"{pod_ns!r} (allowedNamespaces: {', '.join(allowed)})",
                    reason="Forbidden",
                )
    spec = pod.get("spec") or {}
    patch: list[dict[str, Any]] = opt_in_annotations_patch(pod, opt_in)
    volume = injected_volume(opt_in)
    volumes = spec.get("volumes")
    existing = next((v for v in volumes or () if v.get("name") == c.VOLUME_NAME), None)
    if existing is None:
        if volumes is None:
            patch.append({"op": "add", "path": "/spec/volumes", "value": [volume]})
        else:
            patch.append({"op": "add", "path": "/spec/volumes/-", "value": volume})
    elif existing != volume:
        return AdmissionDecision.deny(
            f"the pod already has a volume named {c.VOLUME_NAME!r} that is not the one dynvol "
            "injects; rename it or drop the dynvol annotations"
        )
    mount = injected_mount(opt_in)
    for field, containers in (
        ("containers", spec.get("containers") or []),
        ("initContainers", spec.get("initContainers") or []),
    ):
        for index, container in enumerate(containers):
            if field == "initContainers" and container.get("restartPolicy") != "Always":
                continue
            mounts = container.get("volumeMounts")
            ours = [m for m in mounts or () if m.get("name") == c.VOLUME_NAME]
            if ours:
                if ours != [mount]:
                    return AdmissionDecision.deny(
                        f"container {container.get('name')!r} already mounts "
                        f"{c.VOLUME_NAME!r} differently from what dynvol injects"
                    )
                continue
            for other in mounts or ():
                path = other.get("mountPath", "")
                if _is_under(path, opt_in.root):
                    return AdmissionDecision.deny(
                        f"container {container.get('name')!r} mounts volume "
                        f"{other.get('name')!r} at {path!r}, which is (inside) the dynamic "
                        f"volume root {opt_in.root!r}; choose another root with the annotation "
                        f"{c.ANNOTATION_MOUNT_PATH_ROOT}",
                        reason="Conflict",
                    )
            base = f"/spec/{field}/{index}/volumeMounts"
            if mounts is None:
                patch.append({"op": "add", "path": base, "value": [mount]})
            else:
                patch.append({"op": "add", "path": f"{base}/-", "value": mount})
    return AdmissionDecision.allow(patch, tuple(warnings))


def apply_patch(obj: Any, patch: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> Any:
    """Apply the ``add`` operations :func:`mutate_pod` emits (for tests and idempotence)."""
    result = json.loads(json.dumps(obj))
    for op in patch:
        if op["op"] != "add":
            raise ValueError(f"unsupported op {op['op']!r}")
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]]
        parent = result
        for token in tokens[:-1]:
            parent = parent[int(token)] if isinstance(parent, list) else parent[token]
        last = tokens[-1]
        if isinstance(parent, list):
            if last == "-":
                parent.append(op["value"])
            else:
                parent.insert(int(last), op["value"])
        else:
            parent[last] = op["value"]
    return result


def review_response(request: Mapping[str, Any], decision: AdmissionDecision) -> dict[str, Any]:
    """The AdmissionReview (admission.k8s.io/v1) answering ``request``."""
    response: dict[str, Any] = {"uid": request.get("uid", ""), "allowed": decision.allowed}
    if decision.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(list(decision.patch)).encode()).decode()
    if not decision.allowed:
        code = (
            409
            if decision.reason == "Conflict"
            else (403 if decision.reason == "Forbidden" else 422)
        )
        response["status"] = {
            "status": "Failure",
            "message": decision.message,
            "reason": decision.reason or "Invalid",
            "code": code,
        }
    if decision.warnings:
        response["warnings"] = list(decision.warnings)
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
