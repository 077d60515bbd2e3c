"""Which claims mount into which pods, and what the node plugin must create for it.

Pure planning, in three steps:

1. :func:`match` pairs claims with the pods they select (same namespace, non-empty
   selector, pod opted in, scheduled and alive) and checks each pair against the pod's
   StorageProviderClass: a pinned class must be the pod's class (``ClassMismatch``), the
   class must exist (``StorageProviderClassNotFound``) and admit the namespace
   (``NamespaceNotAllowed``), and the claim's provider must be the class's
   (``ProviderMismatch``). Rejected pairs are kept, with the reason, for claim status and
   Events.
2. Among the accepted claims of one pod, equal or nested mountpoints conflict; the older
   claim (creation timestamp, then name) wins and the others get ``MountpointConflict``.
3. :func:`plan_node` turns the accepted pairs of one node into desired DynamicVolumeMounts
   and Dynamic Mount Pods (DMPs), and compares them with what exists.

:func:`dmp_pod_manifest` renders the DMP the node plugin creates; the node plugin executes
the plan, and planning again after applying a plan yields a plan without actions.
:func:`credential_secret_manifest` renders the one copy of a class's Secret that the
leader-elected controller keeps in the system namespace (docs/design.md §2, §6.5): DMPs mount
that copy by the name :func:`credentials_secret_name` gives, so the node plugin never
reads or writes a Secret.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from dynvol_core import constants as c
from dynvol_core.models import (
    DynamicVolumeClaim,
    DynamicVolumeMount,
    MountResources,
    MountSpec,
    ObjectRef,
    OwnerReference,
    PodInfo,
    StorageProviderClass,
    Toleration,
)
from dynvol_core.paths import PodSlot, XvolsLayout

__all__ = [
    "ANNOTATION_DATA_DIGEST",
    "ANNOTATION_SOURCE_SECRET",
    "DMP_NODE_TOLERATIONS",
    "MAX_DMP_TOLERATIONS",
    "DmpSpec",
    "DmpTolerations",
    "Match",
    "NodePlan",
    "Reason",
    "credential_secret_manifest",
    "credentials_digest",
    "credentials_secret_name",
    "dmp_container_resources",
    "dmp_name",
    "dmp_pod_manifest",
    "dmp_tolerations",
    "dvm_name",
    "label_value",
    "match",
    "missing_tolerations",
    "mountpoints_overlap",
    "plan_node",
    "resolve_conflicts",
    "selected_pods",
]


class Reason(enum.StrEnum):
    """Why a claim that selects a pod does not mount into it (condition/Event reasons)."""

    PROVIDER_MISMATCH = "ProviderMismatch"
    NAMESPACE_NOT_ALLOWED = "NamespaceNotAllowed"
    CLASS_MISMATCH = "ClassMismatch"
    CLASS_NOT_FOUND = "StorageProviderClassNotFound"
    MOUNTPOINT_CONFLICT = "MountpointConflict"


@attrs.frozen(kw_only=True)
class Match:
    """A claim that selects a pod, and whether it may mount there (``reason`` None) or not."""

    claim: DynamicVolumeClaim
    pod: PodInfo
    storage_class: StorageProviderClass | None
    reason: Reason | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        """Whether the claim is to be mounted into the pod."""
        return self.reason is None


# --------------------------------------------------------------------------- matching


def selected_pods(claim: DynamicVolumeClaim, pods: Iterable[PodInfo]) -> tuple[PodInfo, ...]:
    """The pods ``claim`` selects: same namespace, eligible, non-empty selector matching."""
    if claim.deleting:
        return ()
    return tuple(
        pod
        for pod in pods
        if pod.namespace == claim.namespace and pod.eligible and claim.selector.selects(pod.labels)
    )


def _check_pair(
    claim: DynamicVolumeClaim, pod: PodInfo, classes: Mapping[str, StorageProviderClass]
) -> Match:
    assert pod.volume is not None
    class_name = pod.volume.class_name
    spc = classes.get(class_name)
    if claim.storage_provider_class is not None and claim.storage_provider_class != class_name:
        return Match(
            claim=claim,
            pod=pod,
            storage_class=spc,
            reason=Reason.CLASS_MISMATCH,
            message=(
                f"claim pins StorageProviderClass {claim.storage_provider_class!r} but pod "
                f"{pod.name} uses {class_name!r}"
            ),
        )
    if spc is None:
        return Match(
            claim=claim,
            pod=pod,
            storage_class=None,
            reason=Reason.CLASS_NOT_FOUND,
            message=f"pod {pod.name} uses StorageProviderClass {class_name!r}, which is missing",
        )
    if not spc.allows_namespace(pod.namespace):
        return Match(
            claim=claim,
            pod=pod,
            storage_class=spc,
            reason=Reason.NAMESPACE_NOT_ALLOWED,
            message=(
                f"StorageProviderClass {class_name!r} does not allow namespace {pod.namespace!r}"
                " (see its spec.allowedNamespaces)"
            ),
        )
    if spc.provider != claim.storage_provider:
        return Match(
            claim=claim,
            pod=pod,
            storage_class=spc,
            reason=Reason.PROVIDER_MISMATCH,
            message=(
                f"claim wants storageProvider {claim.storage_provider!r} but pod {pod.name}'s "
                f"StorageProviderClass {class_name!r} provides {spc.provider!r}"
            ),
        )
    return Match(claim=claim, pod=pod, storage_class=spc)


def _claim_age_key(claim: DynamicVolumeClaim) -> tuple[bool, str, str]:
    # Unknown creation times (never from the API) count as newest.
    ts = claim.creation_timestamp
    return (ts is None, ts.isoformat() if ts else "", claim.name)


def mountpoints_overlap(a: str, b: str) -> bool:
    """Whether two normalised mountpoints are equal or one is nested in the other."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def resolve_conflicts(matches: Iterable[Match]) -> tuple[Match, ...]:
    """Mark accepted matches that overlap an older claim's mountpoint in the same pod.

    For each pod, accepted claims are taken oldest first (creation timestamp, then name);
    one whose mountpoint equals or nests with an already-kept claim's is rejected with
    ``MountpointConflict``. Rejected matches pass through unchanged. Order is preserved.
    """
    matches = tuple(matches)
    by_pod: dict[tuple[str, str, str], list[Match]] = {}
    for m in matches:
        if m.ok:
            by_pod.setdefault((m.pod.namespace, m.pod.name, m.pod.uid), []).append(m)
    losers: dict[int, Match] = {}
    for group in by_pod.values():
        kept: list[Match] = []
        for m in sorted(group, key=lambda m: _claim_age_key(m.claim)):
            winner = next(
                (k for k in kept if mountpoints_overlap(k.claim.mountpoint, m.claim.mountpoint)),
                None,
            )
            if winner is None:
                kept.append(m)
                continue
            losers[id(m)] = attrs.evolve(
                m,
                reason=Reason.MOUNTPOINT_CONFLICT,
                message=(
                    f"mountpoint {m.claim.mountpoint} overlaps {winner.claim.mountpoint} of "
                    f"older claim {winner.claim.name} in pod {m.pod.name}"
                ),
            )
    return tuple(losers.get(id(m), m) for m in matches)


def match(
    claims: Iterable[DynamicVolumeClaim],
    pods: Iterable[PodInfo],
    classes: Mapping[str, StorageProviderClass] | Iterable[StorageProviderClass],
) -> tuple[Match, ...]:
    """Every (claim, pod) pair where the claim selects the pod, accepted or with a reason.

    The result is sorted by pod (namespace, name, UID) then claim name, and does not depend
    on the order of the inputs.
    """
    class_map = _class_map(classes)
    pods = sorted(pods, key=lambda p: (p.namespace, p.name, p.uid))
    claims = sorted(claims, key=lambda cl: (cl.namespace, cl.name, cl.uid))
    pairs = [
        _check_pair(claim, pod, class_map) for claim in claims for pod in selected_pods(claim, pods)
    ]
    pairs.sort(key=lambda m: (m.pod.namespace, m.pod.name, m.pod.uid, m.claim.name, m.claim.uid))
    return resolve_conflicts(pairs)


def _class_map(
    classes: Mapping[str, StorageProviderClass] | Iterable[StorageProviderClass],
) -> Mapping[str, StorageProviderClass]:
    if isinstance(classes, Mapping):
        return classes
    return {spc.name: spc for spc in classes}


# --------------------------------------------------------------------------- names and labels


_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_NAME_CHUNK = re.compile(r"[^a-z0-9-]")


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def label_value(value: str) -> str:
    """``value`` itself if it is a valid label value, else a stable shortened form.

    Names may be longer than a label value's 63 characters; selectors must then use this
    function too, which keeps a readable prefix and adds a digest of the whole name.
    """
    if not value or _LABEL_VALUE.fullmatch(value):
        return value
    prefix = re.sub(r"[^-A-Za-z0-9_.]", "-", value[:46]).strip("-_.")
    return f"{prefix}-{_digest(value)[:16]}" if prefix else f"h{_digest(value)[:40]}"


def _chunk(name: str, size: int) -> str:
    """A DNS-label-safe piece of ``name`` (for readable generated names)."""
    return _NAME_CHUNK.sub("-", name.lower())[:size].strip("-") or "x"


def dvm_name(claim: DynamicVolumeClaim, pod: PodInfo) -> str:
    """The DynamicVolumeMount name for ``claim`` x ``pod``: claim name + digest of both UIDs."""
    return f"{_chunk(claim.name, 40)}-{_digest(claim.uid, pod.uid)[:16]}"


def dmp_name(
    *,
    policy: str,
    class_name: str,
    node_name: str,
    pod_uid: str = "",
    secret_ref: ObjectRef | None = None,
) -> str:
    """The deterministic name of a DMP (at most 63 characters, a DNS label).

    ``independent``: one per user pod and class (keyed by pod UID and class).
    ``shared``: one per node, class and credential (the class's Secret reference).
    """
    if policy == c.POLICY_INDEPENDENT:
        key = _digest(c.POLICY_INDEPENDENT, class_name, pod_uid)
        return f"dmp-{_chunk(class_name, 24)}-{key[:16]}"
    secret = str(secret_ref) if secret_ref is not None else ""
    key = _digest(c.POLICY_SHARED, node_name, class_name, secret)
    return f"dmp-{_chunk(class_name, 24)}-shared-{key[:16]}"


# --------------------------------------------------------------------------- DMPs


@attrs.frozen(kw_only=True)
class DmpSpec:
    """A Dynamic Mount Pod the node plugin wants to exist.

    ``host_path`` is bound into the DMP at /xvols: the pod's slot (``independent``) or the
    class directory (``shared``). ``pod_*`` name the user pod of an independent DMP.
    """

    name: str
    namespace: str
    node_name: str
    node_uid: str = ""
    class_name: str
    policy: str
    image: str
    host_path: str
    resources: MountResources = attrs.field(factory=MountResources)
    secret_ref: ObjectRef | None = None
    pod_namespace: str = ""
    pod_name: str = ""
    pod_uid: str = ""
    #: The tolerations of the pods it serves (see :func:`dmp_tolerations`).
    tolerations: tuple[Toleration, ...] = ()

    @property
    def credential_secret_name(self) -> str | None:
        """The class's credentials copy in the system namespace, if the class has a Secret."""
        return credentials_secret_name(self.class_name) if self.secret_ref is not None else None

    @property
    def labels(self) -> dict[str, str]:
        """Labels of the DMP pod; the node plugin selects its DMPs by them."""
        labels = {
            c.LABEL_MANAGED_BY: c.LABEL_MANAGED_BY_VALUE,
            c.LABEL_COMPONENT: c.COMPONENT_DMP,
            c.LABEL_DMP: self.name,
            c.LABEL_NODE: label_value(self.node_name),
            c.LABEL_CLASS: label_value(self.class_name),
            c.LABEL_POLICY: self.policy,
        }
        if self.policy == c.POLICY_INDEPENDENT:
            labels[c.LABEL_POD_UID] = self.pod_uid
            labels[c.LABEL_POD] = label_value(self.pod_name)
            labels[c.LABEL_POD_NAMESPACE] = self.pod_namespace
        if self.secret_ref is not None:
            labels[c.LABEL_CREDENTIAL] = _credential_label(self.secret_ref)
        return labels


def _node_owner(spec: DmpSpec) -> list[dict[str, Any]]:
    if not spec.node_uid:
        return []
    # The Node is the DMP's controller: the node's own dynvol manages it, and 'kubectl
    # drain' (without --force) evicts a pod that has a controller but refuses one that has
    # none. The garbage collector deletes the DMP with its Node.
    return [
        OwnerReference(
            api_version="v1", kind="Node", name=spec.node_name, uid=spec.node_uid,
            controller=True,
        ).to_object()
    ]  # fmt: skip


#: What the DMP agent itself (a Python process with its Kubernetes client) needs on top of
#: the class's mount resources, as (cpu millicores, memory MiB) for requests and limits
#: (measured on the local cluster: ~110 MiB RSS once its Kubernetes client is loaded).
#: The class's ``mount-*`` parameters size the mounts; a container limited to exactly
#: them (the seed's 10m CPU / 50Mi) spends minutes importing the agent under CFS
#: throttling, or is OOM-killed, before it mounts anything. Like a RuntimeClass's pod
#: overhead, the agent's share is added to every value the class sets.
DMP_AGENT_OVERHEAD_REQUESTS = (20, 128)
DMP_AGENT_OVERHEAD_LIMITS = (1000, 192)
_MI = 1024 * 1024


def dmp_container_resources(mount: MountResources) -> dict[str, dict[str, str]]:
    """The DMP container's resources: the class's mount resources plus the agent's overhead.

    A value the class leaves unset stays unset (no limit, or the namespace's default), except
    requests, which always carry at least the agent's own share.
    """
    out: dict[str, dict[str, str]] = {}
    for section, (cpu_extra, mem_extra), cpu, memory, always in (
        ("requests", DMP_AGENT_OVERHEAD_REQUESTS, mount.cpu_request, mount.memory_request, True),
        ("limits", DMP_AGENT_OVERHEAD_LIMITS, mount.cpu_limit, mount.memory_limit, False),
    ):
        part: dict[str, str] = {}
        if cpu is not None or always:
            millis = (cpu.value * 1000 if cpu is not None else 0) + cpu_extra
            part["cpu"] = f"{int(-(-millis // 1))}m"
        if memory is not None or always:
            size = (memory.value if memory is not None else 0) + mem_extra * _MI
            whole = int(-(-size // 1))
            part["memory"] = f"{whole // _MI}Mi" if whole % _MI == 0 else str(whole)
        out[section] = part
    return {k: v for k, v in out.items() if v}


#: What every DMP tolerates whatever its pods do: a node that is not ready or unreachable
#: (NoExecute, without a time limit, as DaemonSet pods get). Kubernetes gives the user pods
#: 300 s for these (DefaultTolerationSeconds) or what they ask for; a DMP evicted first would
#: pull their mounts from under them, so it outlives them and goes when they are gone (the
#: node plugin deletes DMPs that serve nothing). NoSchedule taints need no toleration: a DMP
#: names its node, so no scheduler places it, and kubelet admits it despite them.
DMP_NODE_TOLERATIONS: tuple[Toleration, ...] = (
    Toleration(key="node.kubernetes.io/not-ready", operator="Exists", effect="NoExecute"),
    Toleration(key="node.kubernetes.io/unreachable", operator="Exists", effect="NoExecute"),
)
#: More distinct tolerations than this among a DMP's pods and it tolerates every taint
#: instead (what the union would nearly be anyway); bounds the size of a shared DMP that
#: many tenants' pods reach.
MAX_DMP_TOLERATIONS = 64
_TOLERATE_ALL = Toleration(operator="Exists")


def _union(tolerations: Iterable[Toleration]) -> tuple[Toleration, ...]:
    """Distinct tolerations without time limits, none covered by another, in a fixed order."""
    distinct = sorted({t.unbounded() for t in tolerations}, key=Toleration.sort_key)
    return tuple(t for t in distinct if not any(o != t and o.covers(t) for o in distinct))


def dmp_tolerations(served: Iterable[Toleration]) -> tuple[Toleration, ...]:
    """The tolerations of a DMP whose pods tolerate ``served`` (all of them together).

    The union of its pods' tolerations, so that a NoExecute taint they tolerate never
    evicts the DMP their mounts depend on, without ``tolerationSeconds`` (the DMP is to
    outlive the pods, not be evicted with them), plus :data:`DMP_NODE_TOLERATIONS`. Beyond
    :data:`MAX_DMP_TOLERATIONS` entries: one toleration of everything.
    """
    union = _union((*DMP_NODE_TOLERATIONS, *served))
    return (_TOLERATE_ALL,) if len(union) > MAX_DMP_TOLERATIONS else union


def missing_tolerations(
    have: Iterable[Toleration], want: Iterable[Toleration]
) -> tuple[Toleration, ...]:
    """The tolerations of ``want`` that no toleration of ``have`` covers."""
    have = tuple(have)
    return tuple(w for w in want if not any(h.covers(w) for h in have))


def dmp_pod_manifest(
    spec: DmpSpec,
    *,
    service_account_name: str = c.DEFAULT_DMP_SERVICE_ACCOUNT,
    priority_class_name: str = c.DEFAULT_DMP_PRIORITY_CLASS,
    image_pull_policy: str = "IfNotPresent",
    image_pull_secrets: Iterable[str] = (),
    host_network: bool = False,
    extra_env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The DMP Pod as a plain dict, ready to create in the system namespace.

    Privileged, with /dev/fuse and the slot or class directory at /xvols (Bidirectional, so
    its mounts propagate to the host and on to the user pod), pinned to its node, tolerating
    what its pods tolerate (:func:`dmp_tolerations`), at ``priority_class_name`` (by default
    dynvol's own class, which never preempts), pulling its image with the Secrets named by
    ``image_pull_secrets`` (they must exist in the system namespace). The owner is the Node
    (cluster-scoped owners are the only ones allowed across namespaces): the node plugin
    deletes independent DMPs when their user pod is gone.

    The credentials volume is the class's copy in the system namespace
    (:func:`credentials_secret_name`), kept by the controller; kubelet swaps its files when
    the copy changes, which the DMP agent watches. Until the copy exists kubelet keeps the
    DMP in ContainerCreating and retries.

    ``host_network`` and ``extra_env`` serve clusters whose pods cannot reach the apiserver
    through the cluster network (e.g. no kube-proxy): the operator passes them on to every
    DMP from the node plugin's flags.
    """
    argv = [
        "dynvol",
        "dmp",
        "--name",
        spec.name,
        "--namespace",
        spec.namespace,
        "--xvols",
        c.DMP_XVOLS_DIR,
        "--secrets-dir",
        c.DMP_SECRETS_DIR,
        "--work-dir",
        c.DMP_WORK_DIR,
    ]
    if spec.policy == c.POLICY_INDEPENDENT and spec.pod_namespace:
        # One pod's DMP: its mounts are all in that pod's namespace, and a watch by
        # namespace is indexed by the apiserver (a watch by label alone is handed every
        # mount change of the cluster).
        argv += ["--mounts-namespace", spec.pod_namespace]
    if not host_network:
        # On the pod network each DMP has its own address; on the host network several
        # DMPs of one node would clash on a fixed port, so they keep the default (loopback,
        # a free port) and have no probes.
        argv += ["--metrics-address", f"0.0.0.0:{c.DMP_METRICS_PORT}"]
    secret_volume: dict[str, Any] = (
        {"secret": {"secretName": spec.credential_secret_name, "defaultMode": 0o400}}
        if spec.credential_secret_name
        else {"emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}
    )
    container: dict[str, Any] = {
        "name": "dmp",
        "image": spec.image,
        "imagePullPolicy": image_pull_policy,
        "command": argv,
        "env": [
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
            *({"name": k, "value": v} for k, v in sorted((extra_env or {}).items())),
        ],
        "securityContext": {"privileged": True},
        "volumeMounts": [
            {"name": "xvols", "mountPath": c.DMP_XVOLS_DIR, "mountPropagation": "Bidirectional"},
            {"name": "fuse", "mountPath": "/dev/fuse"},
            {"name": "credentials", "mountPath": c.DMP_SECRETS_DIR, "readOnly": True},
            {"name": "work", "mountPath": c.DMP_WORK_DIR},
        ],
    }
    container["resources"] = dmp_container_resources(spec.resources)
    if not host_network:
        container["ports"] = [
            {"name": "metrics", "containerPort": c.DMP_METRICS_PORT, "protocol": "TCP"}
        ]
        # A restart of the container stops its mounters (the mounts come back with it), so
        # liveness is lenient: a minute of failed probes, not a slow scrape.
        container["livenessProbe"] = {
            "httpGet": {"path": "/healthz", "port": "metrics"},
            "initialDelaySeconds": 10,
            "periodSeconds": 20,
            "timeoutSeconds": 10,
            "failureThreshold": 3,
        }
        container["readinessProbe"] = {
            "httpGet": {"path": "/readyz", "port": "metrics"},
            "periodSeconds": 10,
            "timeoutSeconds": 10,
        }
    metadata: dict[str, Any] = {
        "name": spec.name,
        "namespace": spec.namespace,
        "labels": spec.labels,
    }
    owners = _node_owner(spec)
    if owners:
        metadata["ownerReferences"] = owners
    pull_secrets: dict[str, Any] = (
        {"imagePullSecrets": [{"name": name} for name in image_pull_secrets]}
        if image_pull_secrets
        else {}
    )
    network: dict[str, Any] = (
        {"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet"} if host_network else {}
    )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            **network,
            "nodeName": spec.node_name,
            "serviceAccountName": service_account_name,
            "priorityClassName": priority_class_name,
            "restartPolicy": "Always",
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 30,
            "tolerations": [t.to_object() for t in dmp_tolerations(spec.tolerations)],
            **pull_secrets,
            "containers": [container],
            "volumes": [
                {"name": "xvols", "hostPath": {"path": spec.host_path, "type": "Directory"}},
                {"name": "fuse", "hostPath": {"path": "/dev/fuse", "type": "CharDevice"}},
                {"name": "credentials", **secret_volume},
                # Survives a restart of the container (not of the pod): a mounter's cache
                # of writes not uploaded yet is found again by the mount made anew.
                {"name": "work", "emptyDir": {}},
            ],
        },
    }


#: Annotations on a credentials copy: the source it was copied from (``namespace/name``)
#: and a digest of the copied data, so a copy is rewritten only when the source changed.
ANNOTATION_SOURCE_SECRET = f"{c.GROUP}/source-secret"
ANNOTATION_DATA_DIGEST = f"{c.GROUP}/data-digest"
_CREDENTIALS_PREFIX = "dynvol-credentials-"


def credentials_secret_name(class_name: str) -> str:
    """The name of class ``class_name``'s credentials copy in the system namespace.

    A readable piece of the class name plus a digest of the whole name: distinct classes
    never share a copy (``a.b`` and ``a-b`` chunk alike), and the name stays a valid
    DNS subdomain of at most 63 characters whatever the class is called.
    """
    return (
        f"{_CREDENTIALS_PREFIX}{_chunk(class_name, 30)}-{_digest('credentials', class_name)[:12]}"
    )


def credentials_digest(data: Mapping[str, str]) -> str:
    """A digest of a Secret's ``data`` (key order does not matter)."""
    return _digest(*(f"{k}={v}" for k, v in sorted(data.items())))[:32]


def credential_secret_manifest(
    spc: StorageProviderClass, *, namespace: str, source: Mapping[str, Any]
) -> dict[str, Any]:
    """The copy of ``spc``'s Secret in the system namespace ``namespace``, owned by the class.

    ``source`` is the Secret the class references, as read from the API. Every ``data`` key
    is copied unchanged: providers read the keys they know from the mounted files and
    declare no list of them, so the copy cannot be narrowed without guessing. The owner is
    the class (a cluster-scoped owner of a namespaced object is allowed), so the copy goes
    with it; the annotations name the source and carry :func:`credentials_digest` of the
    data. Rendering again after the source changed gives the object to replace the copy with.

    :raises ValueError: if the class references no Secret.
    """
    if spc.secret_ref is None:
        raise ValueError(f"StorageProviderClass {spc.name} references no Secret")
    raw = source.get("data") or {}
    data = (
        {str(k): v for k, v in raw.items() if isinstance(v, str)}
        if isinstance(raw, Mapping)
        else {}
    )
    metadata: dict[str, Any] = {
        "name": credentials_secret_name(spc.name),
        "namespace": namespace,
        "labels": {
            c.LABEL_MANAGED_BY: c.LABEL_MANAGED_BY_VALUE,
            c.LABEL_COMPONENT: c.COMPONENT_CREDENTIALS,
            c.LABEL_CLASS: label_value(spc.name),
            c.LABEL_CREDENTIAL: _credential_label(spc.secret_ref),
        },
        "annotations": {
            ANNOTATION_SOURCE_SECRET: str(spc.secret_ref),
            ANNOTATION_DATA_DIGEST: credentials_digest(data),
        },
    }
    if spc.uid:
        metadata["ownerReferences"] = [
            OwnerReference(
                api_version=c.API_VERSION,
                kind=c.KIND_CLASS,
                name=spc.name,
                uid=spc.uid,
                controller=True,
            ).to_object()
        ]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": "Opaque",
        "data": data,
    }


def _credential_label(ref: ObjectRef) -> str:
    return _digest(str(ref))[:16]


# --------------------------------------------------------------------------- planning a node


@attrs.frozen(kw_only=True)
class NodePlan:
    """What one node should have, and the actions that get it there.

    - ``dvms`` / ``dmps``: everything desired on the node.
    - ``create_dvms``: desired mounts that do not exist; ``update_dvms``: existing ones whose
      spec or labels differ (carrying the existing identity, ready for a replace).
    - ``delete_dvms``: existing mounts no longer desired (their DMP unmounts, then the
      finalizer goes).
    - ``create_dmps``; ``delete_dmps``: independent DMPs serving nothing and DMPs that
      have terminated; ``idle_dmps``: shared DMPs serving nothing, which the shell deletes
      after a grace delay (they are reference-counted by the mounts that name them).
    - ``replace_dmps``: DMPs in use whose container is in CrashLoopBackOff: its mounts died
      with it, and kubelet would start it again only after a delay that doubles with every
      crash (10 s, 20 s, ... 5 min); a new pod of the same name starts at once. The shell
      deletes them within a budget of its own (then leaves them to kubelet's back-off), and
      they are created again as missing DMPs.
    - ``tolerate_dmps``: running DMPs that lack tolerations their pods now have (a new pod
      brought them); a pod's tolerations can be added to in place, never changed or
      removed, so the shell adds them and a DMP keeps any it no longer needs.
    - ``orphaned_dvms``: mounts to delete whose DMP is gone, so nothing will unmount them;
      the shell lazily unmounts their target and drops their finalizer.
    - ``matches``: every claim x pod pair on the node, with reasons for rejected ones;
      ``unpublished``: accepted pairs whose pod has no slot yet (NodePublishVolume pending).
    """

    dvms: tuple[DynamicVolumeMount, ...] = ()
    dmps: tuple[DmpSpec, ...] = ()
    create_dvms: tuple[DynamicVolumeMount, ...] = ()
    update_dvms: tuple[DynamicVolumeMount, ...] = ()
    delete_dvms: tuple[DynamicVolumeMount, ...] = ()
    orphaned_dvms: tuple[DynamicVolumeMount, ...] = ()
    create_dmps: tuple[DmpSpec, ...] = ()
    delete_dmps: tuple[PodInfo, ...] = ()
    idle_dmps: tuple[PodInfo, ...] = ()
    replace_dmps: tuple[PodInfo, ...] = ()
    tolerate_dmps: tuple[DmpTolerations, ...] = ()
    matches: tuple[Match, ...] = ()
    unpublished: tuple[Match, ...] = ()

    @property
    def has_actions(self) -> bool:
        """Whether anything must be created, changed or deleted now."""
        return bool(
            self.create_dvms
            or self.update_dvms
            or self.delete_dvms
            or self.create_dmps
            or self.delete_dmps
            or self.replace_dmps
            or self.tolerate_dmps
        )


@attrs.frozen(kw_only=True)
class DmpTolerations:
    """Tolerations to add to a running DMP (``add``, after those ``pod`` has)."""

    pod: PodInfo
    add: tuple[Toleration, ...]


def _dmp_for(
    pod: PodInfo,
    spc: StorageProviderClass,
    slot: PodSlot,
    *,
    node_name: str,
    node_uid: str,
    system_namespace: str,
    dmp_image: str,
) -> DmpSpec:
    assert pod.volume is not None
    policy = pod.volume.policy
    host_path = XvolsLayout(slot.root).dmp_host_path(slot, policy)
    independent = policy == c.POLICY_INDEPENDENT
    return DmpSpec(
        name=dmp_name(
            policy=policy,
            class_name=spc.name,
            node_name=node_name,
            pod_uid=pod.uid,
            secret_ref=spc.secret_ref,
        ),
        namespace=system_namespace,
        node_name=node_name,
        node_uid=node_uid,
        class_name=spc.name,
        policy=policy,
        image=dmp_image,
        host_path=str(host_path),
        resources=spc.resources,
        secret_ref=spc.secret_ref,
        pod_namespace=pod.namespace if independent else "",
        pod_name=pod.name if independent else "",
        pod_uid=pod.uid if independent else "",
    )


def _dvm_for(m: Match, slot: PodSlot, dmp: DmpSpec, node_name: str) -> DynamicVolumeMount:
    claim, pod = m.claim, m.pod
    assert m.storage_class is not None
    assert pod.volume is not None
    # dmp_target's default DMP root is c.DMP_XVOLS_DIR, where dmp_pod_manifest mounts it.
    target = XvolsLayout(slot.root).dmp_target(slot, pod.volume.policy, claim.mountpoint)
    return DynamicVolumeMount(
        name=dvm_name(claim, pod),
        namespace=pod.namespace,
        labels={
            c.LABEL_MANAGED_BY: c.LABEL_MANAGED_BY_VALUE,
            c.LABEL_CLAIM: label_value(claim.name),
            c.LABEL_CLAIM_UID: label_value(claim.uid),
            c.LABEL_POD: label_value(pod.name),
            c.LABEL_POD_UID: label_value(pod.uid),
            c.LABEL_NODE: label_value(node_name),
            c.LABEL_DMP: label_value(dmp.name),
            c.LABEL_CLASS: label_value(m.storage_class.name),
        },
        owner_references=(
            OwnerReference(api_version="v1", kind="Pod", name=pod.name, uid=pod.uid),
        ),
        spec=MountSpec(
            claim_name=claim.name,
            claim_uid=claim.uid,
            pod_name=pod.name,
            pod_uid=pod.uid,
            node_name=node_name,
            dmp_name=dmp.name,
            provider=claim.storage_provider,
            storage_provider_class=m.storage_class.name,
            config=claim.provider_config.values,
            read_only=claim.read_only,
            mountpoint=claim.mountpoint,
            slot_path=str(slot.path),
            dmp_target_path=str(target),
        ),
    )


def _is_own_dmp(pod: PodInfo, node_name: str, system_namespace: str) -> bool:
    return (
        pod.namespace == system_namespace
        and pod.labels.get(c.LABEL_COMPONENT) == c.COMPONENT_DMP
        and pod.labels.get(c.LABEL_MANAGED_BY) == c.LABEL_MANAGED_BY_VALUE
        and pod.labels.get(c.LABEL_NODE) == label_value(node_name)
    )


def plan_node(
    *,
    node_name: str,
    pods: Iterable[PodInfo],
    claims: Iterable[DynamicVolumeClaim],
    classes: Mapping[str, StorageProviderClass] | Iterable[StorageProviderClass],
    slots: Mapping[str, PodSlot],
    system_namespace: str,
    dmp_image: str,
    existing_dvms: Iterable[DynamicVolumeMount] = (),
    existing_dmps: Iterable[PodInfo] = (),
    node_uid: str = "",
) -> NodePlan:
    """Plan the DynamicVolumeMounts and DMPs of node ``node_name``.

    :param pods: user pods (others' and other nodes' are ignored).
    :param slots: the slot of each published pod, by pod UID (the node plugin's records).
    :param existing_dvms: DynamicVolumeMounts as they exist (any node; filtered here).
    :param existing_dmps: pods in the system namespace (only this node's DMPs count).
    :param node_uid: the Node's UID; when given, DMPs are owned by the Node.
    """
    local_pods = [p for p in pods if p.node_name == node_name]
    matches = match(claims, local_pods, classes)

    desired_dvms: dict[tuple[str, str], DynamicVolumeMount] = {}
    desired_dmps: dict[str, DmpSpec] = {}
    served: dict[str, set[Toleration]] = {}
    unpublished = []

    def want_dmp(pod: PodInfo, spc: StorageProviderClass, slot: PodSlot) -> DmpSpec:
        """The DMP serving ``pod`` (one DmpSpec per name), with the pod's tolerations."""
        dmp = _dmp_for(
            pod,
            spc,
            slot,
            node_name=node_name,
            node_uid=node_uid,
            system_namespace=system_namespace,
            dmp_image=dmp_image,
        )
        dmp = desired_dmps.setdefault(dmp.name, dmp)
        served.setdefault(dmp.name, set()).update(pod.tolerations)
        return dmp

    for m in matches:
        if not m.ok:
            continue
        slot = slots.get(m.pod.uid)
        if slot is None:
            unpublished.append(m)
            continue
        assert m.storage_class is not None
        dmp = want_dmp(m.pod, m.storage_class, slot)
        dvm = _dvm_for(m, slot, dmp, node_name)
        desired_dvms[(dvm.namespace, dvm.name)] = dvm

    # A class with ``dmp-start: OnPublish`` wants the DMP of every published pod of its
    # own running before any claim selects the pod (the first mount then finds it up).
    class_map = _class_map(classes)
    for pod in sorted(local_pods, key=lambda p: (p.namespace, p.name, p.uid)):
        slot = slots.get(pod.uid)
        if slot is None or pod.volume is None or not pod.eligible:
            continue
        spc = class_map.get(pod.volume.class_name)
        if spc is None or not spc.starts_on_publish or spc.deleting:
            continue
        if not spc.allows_namespace(pod.namespace):
            continue
        want_dmp(pod, spc, slot)

    for name, tolerations in served.items():
        desired_dmps[name] = attrs.evolve(desired_dmps[name], tolerations=_union(tolerations))

    own_dvms = sorted(
        (d for d in existing_dvms if d.spec.node_name == node_name),
        key=lambda d: (d.namespace, d.name),
    )
    existing_by_key = {(d.namespace, d.name): d for d in own_dvms}
    create_dvms, update_dvms = [], []
    for key in sorted(desired_dvms):
        want = desired_dvms[key]
        have = existing_by_key.get(key)
        if have is None:
            create_dvms.append(want)
        elif not have.deleting and (have.spec != want.spec or not _labels_hold(have, want)):
            update_dvms.append(
                attrs.evolve(
                    want,
                    uid=have.uid,
                    resource_version=have.resource_version,
                    generation=have.generation,
                    finalizers=have.finalizers,
                    labels={**have.labels, **want.labels},
                    status=have.status,
                )
            )
    desired_keys = set(desired_dvms)
    delete_dvms = [
        d for d in own_dvms if (d.namespace, d.name) not in desired_keys and not d.deleting
    ]

    dmp_pods = sorted(
        (p for p in existing_dmps if _is_own_dmp(p, node_name, system_namespace)),
        key=lambda p: p.name,
    )
    existing_dmp_names = {p.name for p in dmp_pods}
    # A DMP is in use while any mount names it, including mounts still being torn down.
    referenced = set(desired_dmps) | {d.spec.dmp_name for d in own_dvms}
    create_dmps = [desired_dmps[n] for n in sorted(desired_dmps) if n not in existing_dmp_names]
    delete_dmps, idle_dmps, replace_dmps = [], [], []
    for p in dmp_pods:
        if p.deleting:
            continue
        if p.terminal:
            delete_dmps.append(p)
        elif p.name not in referenced:
            if p.labels.get(c.LABEL_POLICY) == c.POLICY_SHARED:
                idle_dmps.append(p)
            else:
                delete_dmps.append(p)
        elif p.crash_looping:
            replace_dmps.append(p)
    live_dmps = {p.name for p in dmp_pods if not p.terminal and not p.deleting}
    tolerate = [
        DmpTolerations(pod=p, add=add)
        for p in dmp_pods
        if p.name in live_dmps
        and p.name in desired_dmps
        and (
            add := missing_tolerations(
                p.tolerations, dmp_tolerations(desired_dmps[p.name].tolerations)
            )
        )
    ]
    orphaned = [
        d
        for d in own_dvms
        if ((d.namespace, d.name) not in desired_keys or d.deleting)
        and d.spec.dmp_name not in live_dmps
        and d.spec.dmp_name not in desired_dmps
    ]
    return NodePlan(
        dvms=tuple(desired_dvms[k] for k in sorted(desired_dvms)),
        dmps=tuple(desired_dmps[n] for n in sorted(desired_dmps)),
        create_dvms=tuple(create_dvms),
        update_dvms=tuple(update_dvms),
        delete_dvms=tuple(delete_dvms),
        orphaned_dvms=tuple(orphaned),
        create_dmps=tuple(create_dmps),
        delete_dmps=tuple(delete_dmps),
        idle_dmps=tuple(idle_dmps),
        replace_dmps=tuple(replace_dmps),
        tolerate_dmps=tuple(tolerate),
        matches=matches,
        unpublished=tuple(unpublished),
    )


def _labels_hold(have: DynamicVolumeMount, want: DynamicVolumeMount) -> bool:
    return all(have.labels.get(k) == v for k, v in want.labels.items())
