"""The cluster controller (``dynvol controller``): classes, claim status, admission.

Observes classes, claims, pods, DynamicVolumeMounts and namespaces (informers), queues
class and claim keys, and reconciles them while this replica holds the Lease:

* **class in-use protection**: every StorageProviderClass carries the finalizer
  ``<group>/in-use-protection``; a class being deleted keeps it while any pod's injected
  volume or any claim's ``storageProviderClass`` names it, and loses it (so the deletion
  completes) once nothing does.
* **claim status**: counts of matched pods and of their mounts (mounted / failed / pending),
  the DMPs in use (bounded), and two conditions per API conventions (``Accepted``,
  ``Ready``) with ``observedGeneration``; written only when it changed.
* **Events** on claims (transitions of those conditions) and on pods (a mount that became
  Mounted or Failed; an annotated pod that missed the webhook).
* **credential copies** (:mod:`.credentials`): one copy of each class's Secret in the
  system namespace, which the DMPs mount; its state is the class's ``CredentialsReady``
  condition.
* **claim slices** (:mod:`.slicing`): one ``DynamicVolumeClaimSlice`` per node with the
  claims that select its pods, which is all of the claims its node plugin watches.
* **lost nodes**: when a Node is deleted, the DynamicVolumeMounts bound to it lose the
  DMP's unmount finalizer and are deleted, since no DMP will ever run there again to
  unmount them; otherwise their namespaces would hang in Terminating.

It also makes the admission decisions the webhook server (:mod:`.webhooks`) asks for, from
the same caches: pod mutation (:func:`.admission.mutate_pod`) and validation of classes and
claims (what CEL cannot check: the provider exists and accepts the config, mountpoint
conflicts with claims selecting the same pods, the class's ``allowedNamespaces``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from dynvol_core import constants as c
from dynvol_core.dispatch import match, mountpoints_overlap, selected_pods
from dynvol_core.errors import DynvolError, InvalidObject
from dynvol_core.models import (
    ConnectionPolicy,
    DynamicVolumeClaim,
    PodInfo,
    StorageProviderClass,
)
from dynvol_kube import (
    NORMAL,
    WARNING,
    APIConflict,
    APIError,
    APINotFound,
    Client,
    Controller,
    Event,
    EventRecorder,
    Informer,
    Outcome,
    RequeueAfter,
)
from dynvol_kube.resources import CLAIMS, CLASSES, MOUNTS, NAMESPACES, NODES, PODS
from dynvol_providers.base import parse_provider_config, qualify_config_errors

from . import objects
from .admission import AdmissionDecision, mutate_pod
from .credentials import CONDITION_CREDENTIALS, CredentialCopier
from .slicing import INDEX_POD_NODE, ClaimSlicer, pod_node_index

__all__ = ["ClusterController"]

log = logging.getLogger(__name__)

INDEX_CLASS = "class"
INDEX_CLAIM = "claim"
INDEX_NODE = "node"
MAX_DMPS_IN_STATUS = 64
FIELD_MANAGER = "dynvol-controller"


def _pod_class_index(pod: dict[str, Any]) -> tuple[str, ...]:
    name = objects.injected_class(pod)
    return (name,) if name else ()


def _claim_class_index(claim: dict[str, Any]) -> tuple[str, ...]:
    name = (claim.get("spec") or {}).get("storageProviderClass")
    return (name,) if isinstance(name, str) and name else ()


def _dvm_class_index(dvm: dict[str, Any]) -> tuple[str, ...]:
    name = (dvm.get("spec") or {}).get("storageProviderClass")
    return (name,) if name else ()


def _dvm_claim_index(dvm: dict[str, Any]) -> tuple[str, ...]:
    ns = dvm.get("metadata", {}).get("namespace")
    name = (dvm.get("spec") or {}).get("claimName")
    return (f"{ns}/{name}",) if ns and name else ()


def _dvm_node_index(dvm: dict[str, Any]) -> tuple[str, ...]:
    name = (dvm.get("spec") or {}).get("nodeName")
    return (name,) if isinstance(name, str) and name else ()


def _slim_node(node: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": objects.slim_metadata(node.get("metadata") or {}),
    }


def _slim_namespace(ns: dict[str, Any]) -> dict[str, Any]:
    meta = ns.get("metadata") or {}
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": objects.slim_metadata(
            meta, annotations=list((meta.get("annotations") or {}).keys())
        ),
    }


def _condition(
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    previous: list[dict[str, Any]],
) -> dict[str, Any]:
    text = "True" if status else "False"
    old = next((p for p in previous if p.get("type") == type_), None)
    when = old["lastTransitionTime"] if old and old.get("status") == text else objects.now()
    return {
        "type": type_,
        "status": text,
        "reason": reason,
        "message": message[:2000],
        "lastTransitionTime": when,
        "observedGeneration": generation,
    }


def _without_times(status: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(status)
    out["conditions"] = [
        {k: v for k, v in cond.items() if k != "lastTransitionTime"}
        for cond in status.get("conditions") or ()
    ]
    return out


#: The labels of the controller's own pods in the base manifests and the chart (the webhook
#: Service's selector).
REPLICA_LABELS: Mapping[str, str] = {
    "app.kubernetes.io/name": "dynvol",
    c.LABEL_COMPONENT: "controller",
}


class ClusterController:
    """Reconcilers and admission decisions of ``dynvol controller``.

    :param registry: a :class:`dynvol_providers.registry.ProviderRegistry` (providers are
        looked up by name and asked to parse configs); ``None`` skips those checks.
    """

    def __init__(
        self,
        client: Client,
        *,
        recorder: EventRecorder,
        registry: Any = None,
        system_namespace: str = c.DEFAULT_SYSTEM_NAMESPACE,
        workers: int = 4,
        resync: float | None = 600.0,
        coalesce: float = 1.0,
        replica_labels: Mapping[str, str] | None = None,
    ) -> None:
        self.client = client
        #: The labels of this Deployment's own pods (those its webhook Service selects).
        self.replica_labels = dict(REPLICA_LABELS if replica_labels is None else replica_labels)
        self.recorder = recorder
        self.registry = registry
        self.leading = False
        # Mount status changes arrive in bursts; one status write per claim per burst.
        self.coalesce = coalesce
        self.classes = Informer(client, CLASSES, resync=resync)
        self.claims = Informer(
            client, CLAIMS, indexers={INDEX_CLASS: _claim_class_index}, resync=resync
        )
        # Every pod and mount of the cluster: list in pages (from_cache=False) so the first
        # list never holds them all, unslimmed, in memory at once.
        self.pods = Informer(
            client,
            PODS,
            transform=objects.slim_pod,
            indexers={INDEX_CLASS: _pod_class_index, INDEX_POD_NODE: pod_node_index},
            from_cache=False,
        )
        self.mounts = Informer(
            client,
            MOUNTS,
            transform=objects.slim_dvm_for_status,
            from_cache=False,
            indexers={
                INDEX_CLAIM: _dvm_claim_index,
                INDEX_CLASS: _dvm_class_index,
                INDEX_NODE: _dvm_node_index,
            },
        )
        self.namespaces = Informer(client, NAMESPACES, transform=_slim_namespace)
        self.nodes = Informer(client, NODES, transform=_slim_node)
        self._claim_models = objects.ModelCache(DynamicVolumeClaim.from_object)
        self._class_models = objects.ModelCache(StorageProviderClass.from_object)
        self._pod_models = objects.ModelCache(PodInfo.from_object)
        self.class_controller = Controller(
            "classes", self.reconcile_class, workers=workers, metrics=client.metrics
        )
        self.claim_controller = Controller(
            "claims", self.reconcile_claim, workers=workers, metrics=client.metrics
        )
        self.system_namespace = system_namespace
        #: Nodes whose deletion this replica saw, until their mounts are released.
        self._lost_nodes: set[str] = set()
        #: Nodes seen deleted (and not back): their pods only wait for pod GC.
        self._gone_nodes: set[str] = set()
        self.node_controller = Controller(
            "lost-nodes", self.reconcile_node, workers=1, metrics=client.metrics
        )
        self.credentials = CredentialCopier(
            client,
            self.classes,
            recorder,
            system_namespace=system_namespace,
            on_state=self.class_controller.enqueue,
        )
        #: The parsed pods of each namespace, and per claim the pods it selected as of a
        #: count of its namespace's pod events.
        self.pods_in = objects.NamespacePods(self.pods, self._pod_models)
        self._selected: dict[str, tuple[tuple[str, int, bool, int], tuple[PodInfo, ...]]] = {}
        #: The nodes' claim slices (:mod:`.slicing`), so that no node watches every claim.
        self.slicer = ClaimSlicer(
            client,
            claims=self.claims,
            pods=self.pods,
            nodes=self.nodes,
            claim_models=self._claim_models,
            pod_models=self._pod_models,
            workers=workers,
            namespace_pods=self.pods_in,
        )
        self.classes.add_handler(self._on_class)
        self.claims.add_handler(self._on_claim)
        self.pods.add_handler(self._on_pod)
        self.mounts.add_handler(self._on_mount)
        self.nodes.add_handler(self._on_node)

    @property
    def informers(self) -> tuple[Informer, ...]:
        """Every informer, in start order."""
        return (
            self.namespaces,
            self.nodes,
            self.classes,
            self.claims,
            self.pods,
            self.mounts,
            self.credentials.copies,
            self.slicer.slices,
        )

    # -- lifecycle (leader-gated part) ----------------------------------------------------

    async def start(self) -> None:
        """Start reconciling (called by the manager once this replica leads)."""
        self.leading = True
        await self.class_controller.start()
        await self.claim_controller.start()
        await self.node_controller.start()
        await self.credentials.start()
        await self.slicer.start()
        for obj in self.classes.store:
            self.class_controller.enqueue(obj["metadata"]["name"])
        for obj in self.claims.store:
            self.claim_controller.enqueue(_key(obj))
        # Nodes deleted while no replica led: their mounts being deleted are stuck.
        for dvm in self.mounts.store:
            self._check_stuck(dvm)

    async def close(self) -> None:
        """Stop reconciling."""
        self.leading = False
        await self.slicer.close()
        await self.credentials.close()
        await self.node_controller.close()
        await self.claim_controller.close()
        await self.class_controller.close()

    # -- event handlers (observe -> queue) --------------------------------------------------

    def _on_class(self, event: Event) -> None:
        self.class_controller.enqueue(event.obj["metadata"]["name"])
        self.credentials.on_class(event)
        if event.type != "RESYNC" and (
            event.old is None or event.old.get("spec") != event.obj.get("spec")
        ):
            # Provider, allowed namespaces or existence changed: every claim may be affected.
            for raw in self.claims.store:
                self.claim_controller.enqueue(_key(raw))

    def _on_claim(self, event: Event) -> None:
        if event.type == "DELETED":
            self._selected.pop(_key(event.obj), None)
        self.claim_controller.enqueue(_key(event.obj))
        for obj in (event.obj, event.old):
            for name in _claim_class_index(obj) if obj else ():
                self.class_controller.enqueue(name)

    def _claims_for_pod(self, pod: Mapping[str, Any] | None) -> None:
        if not pod:
            return
        ns = pod["metadata"].get("namespace")
        labels = pod["metadata"].get("labels") or {}
        for raw in self.claims.store.by_index("namespace", ns):
            claim = self._claim_models.get_or_none(raw)
            if claim is not None and claim.selector.selects(labels):
                self.claim_controller.enqueue(_key(raw))

    def _on_pod(self, event: Event) -> None:
        old_labels = (event.old or {}).get("metadata", {}).get("labels")
        new_labels = event.obj.get("metadata", {}).get("labels")
        old_class = objects.injected_class(event.old) if event.old else None
        new_class = objects.injected_class(event.obj)
        if (
            event.type in ("ADDED", "DELETED", "RESYNC")
            or old_labels != new_labels
            or (objects.is_terminated(event.obj) != objects.is_terminated(event.old or {}))
        ):
            self._claims_for_pod(event.obj)
            if event.old is not None and old_labels != new_labels:
                self._claims_for_pod(event.old)
        for name in {old_class, new_class} - {None}:
            if event.type == "DELETED" or objects.is_deleting(event.obj) or old_class != new_class:
                assert name is not None
                self.class_controller.enqueue(name)
        if event.type == "ADDED" and self.leading:
            self._check_injection(event.obj)
        if event.type == "DELETED":
            self._forget_gone_node(event.obj)

    def _forget_gone_node(self, pod: Mapping[str, Any]) -> None:
        """Forget a Node seen deleted once pod GC has removed the last pod bound to it (a
        scan of the cache, only for pods of such a Node)."""
        node = (pod.get("spec") or {}).get("nodeName")
        if not node or node not in self._gone_nodes:
            return
        if not any((p.get("spec") or {}).get("nodeName") == node for p in self.pods.store):
            self._gone_nodes.discard(node)

    def _check_injection(self, pod: Mapping[str, Any]) -> None:
        annotations = pod["metadata"].get("annotations") or {}
        if (
            annotations.get(c.ANNOTATION_STORAGE_PROVIDER_CLASS)
            and objects.injected_volume(pod) is None
            and not objects.is_terminated(pod)
        ):
            self.recorder.record(
                pod,
                WARNING,
                "InjectionMissing",
                "the pod asks for dynamic volumes but has no dynvol volume: it was created "
                "while the dynvol webhook was unavailable; recreate the pod to get it",
            )

    def _on_mount(self, event: Event) -> None:
        for name in _dvm_claim_index(event.obj):
            self.claim_controller.queue.add_after(name, self.coalesce)
        if event.type != "DELETED":
            self._check_stuck(event.obj)
        if not self.leading or event.type not in ("ADDED", "MODIFIED"):
            return
        phase = (event.obj.get("status") or {}).get("phase")
        old_phase = ((event.old or {}).get("status") or {}).get("phase")
        if phase == old_phase or phase not in ("Mounted", "Failed"):
            return
        spec = event.obj.get("spec") or {}
        pod_ref = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": spec.get("podName", ""),
                "namespace": event.obj["metadata"].get("namespace"),
                "uid": spec.get("podUID", ""),
            },
        }
        if phase == "Mounted":
            self.recorder.record(
                pod_ref,
                NORMAL,
                "Mounted",
                f"claim {spec.get('claimName')} mounted at {spec.get('mountpoint')}",
            )
        else:
            message = (event.obj.get("status") or {}).get("message") or "mount failed"
            self.recorder.record(
                pod_ref, WARNING, "FailedToMount", f"claim {spec.get('claimName')}: {message}"
            )

    def _on_node(self, event: Event) -> None:
        name = event.obj["metadata"]["name"]
        if event.type == "DELETED":
            self._lost_nodes.add(name)
            self._gone_nodes.add(name)
            self.node_controller.enqueue(name)
        else:
            self._lost_nodes.discard(name)
            self._gone_nodes.discard(name)

    def _check_stuck(self, dvm: Mapping[str, Any]) -> None:
        """Queue the node of a mount being deleted when that node does not exist."""
        if not self.leading or not self.nodes.synced:
            return
        if not (dvm.get("metadata") or {}).get("deletionTimestamp"):
            return
        for node in _dvm_node_index(dict(dvm)):
            if self.nodes.store.get(node) is None:
                self.node_controller.enqueue(node)

    # -- lost nodes ------------------------------------------------------------------------

    async def reconcile_node(self, name: str) -> Outcome | None:
        """Release the DynamicVolumeMounts bound to a Node that does not exist.

        A Node seen deleted loses all its mounts (finalizer, then the object). For a node
        that is merely absent (deleted while no replica led; or one that never registered)
        only mounts already being deleted whose DMP is gone are released: nothing else can
        ever drop their finalizer, and their namespace would hang in Terminating. The
        controller's own replica pods on a Node seen deleted are deleted too
        (:meth:`_retire_replicas`).
        """
        if self.nodes.store.get(name) is not None:
            self._lost_nodes.discard(name)
            return None  # re-registered: its node plugin takes over again
        try:
            await self.client.get(NODES, name)
        except APINotFound:
            pass
        else:
            return None
        seen_deleted = name in self._lost_nodes
        released = 0
        for slim in self.mounts.store.by_index(INDEX_NODE, name):
            meta = slim["metadata"]
            if not seen_deleted and not meta.get("deletionTimestamp"):
                continue
            try:
                dvm = await self.client.get(MOUNTS, meta["name"], namespace=meta["namespace"])
            except APINotFound:
                continue
            spec = dvm.get("spec") or {}
            if spec.get("nodeName") != name:
                continue
            if not seen_deleted and await self._dmp_exists(spec.get("dmpName") or ""):
                continue
            await self._release_mount(dvm)
            released += 1
        retired = await self._retire_replicas(name) if seen_deleted else 0
        if not self.mounts.store.by_index(INDEX_NODE, name):
            self._lost_nodes.discard(name)
        if retired:
            log.info("node %s is gone; deleted %d controller replica pod(s) on it", name, retired)
        if released:
            log.info(
                "node %s is gone; released %d DynamicVolumeMount(s) bound to it", name, released
            )
        return None

    async def _retire_replicas(self, node: str) -> int:
        """Delete (at once, as pod GC would 40 s later) this Deployment's pods on a Node seen
        deleted.

        Nothing on a deleted Node will ever report its pods not Ready, so until pod GC
        removes them they stay endpoints of the webhook Service. The apiserver's calls that
        land on the dead one time out, and a pod that opted in by annotation (``Ignore``)
        is admitted without its volume -- which is exactly what happens to the lost node's
        workload pods, whose replacements pod GC creates in the same sweep. Only pods in
        the system namespace carrying every one of the replica labels are touched, and
        each delete carries the pod's UID as a precondition.
        """
        if not self.replica_labels:
            return 0
        deleted = 0
        for pod in self.pods.store.by_index("namespace", self.system_namespace):
            meta = pod.get("metadata") or {}
            labels = meta.get("labels") or {}
            if (pod.get("spec") or {}).get("nodeName") != node:
                continue
            if any(labels.get(k) != v for k, v in self.replica_labels.items()):
                continue
            with contextlib.suppress(APINotFound, APIConflict):
                await self.client.delete(
                    PODS,
                    meta["name"],
                    namespace=self.system_namespace,
                    uid=meta.get("uid"),
                    grace_seconds=0,
                )
                deleted += 1
        return deleted

    async def _dmp_exists(self, name: str) -> bool:
        if not name:
            return False
        try:
            await self.client.get(PODS, name, namespace=self.system_namespace)
        except APINotFound:
            return False
        return True

    async def _release_mount(self, dvm: Mapping[str, Any]) -> None:
        meta = dvm["metadata"]
        ns, name = meta["namespace"], meta["name"]
        finalizers = list(meta.get("finalizers") or ())
        if c.FINALIZER_MOUNT in finalizers:
            patch = {
                "metadata": {
                    "finalizers": [f for f in finalizers if f != c.FINALIZER_MOUNT] or None,
                    "resourceVersion": meta["resourceVersion"],
                }
            }
            with contextlib.suppress(APINotFound):
                await self.client.patch(
                    MOUNTS, name, patch, namespace=ns, field_manager=FIELD_MANAGER
                )
        if not meta.get("deletionTimestamp"):
            with contextlib.suppress(APINotFound, APIConflict):
                await self.client.delete(MOUNTS, name, namespace=ns, uid=meta.get("uid"))
        spec = dvm.get("spec") or {}
        pod_ref = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": spec.get("podName", ""),
                "namespace": ns,
                "uid": spec.get("podUID", ""),
            },
        }
        self.recorder.record(
            pod_ref,
            WARNING,
            "NodeLost",
            f"node {spec.get('nodeName')} was deleted; the mount of claim "
            f"{spec.get('claimName')} is released without unmounting",
        )

    # -- classes ------------------------------------------------------------------------

    def class_users(self, name: str) -> tuple[list[str], list[str]]:
        """(pods, claims) that use class ``name``, as ``namespace/name`` keys."""
        pods = [_key(p) for p in self.pods.store.by_index(INDEX_CLASS, name)]
        claims = [_key(cl) for cl in self.claims.store.by_index(INDEX_CLASS, name)]
        return sorted(pods), sorted(claims)

    async def reconcile_class(self, key: str) -> Outcome | None:
        """Keep the in-use finalizer: add it to live classes, drop it once unused."""
        obj = self.classes.store.get(key)
        if obj is None:
            return None
        meta = obj["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        has = c.FINALIZER_CLASS_IN_USE in finalizers
        pods, claims = self.class_users(key)
        await self._write_class_status(obj, pods, claims)
        if not meta.get("deletionTimestamp"):
            if not has:
                await self._set_finalizers(obj, [*finalizers, c.FINALIZER_CLASS_IN_USE])
            return None
        if not has:
            return None
        if pods or claims:
            users = [f"pod {p}" for p in pods[:5]] + [f"claim {cl}" for cl in claims[:5]]
            more = len(pods) + len(claims) - len(users)
            message = (
                f"deletion waits until nothing uses the class; in use by {', '.join(users)}"
                + (f" and {more} more" if more > 0 else "")
            )
            self.recorder.record(obj, WARNING, "DeletionBlocked", message)
            # Pod and claim events requeue the class; this is only a safety net.
            return RequeueAfter(60)
        await self._set_finalizers(obj, [f for f in finalizers if f != c.FINALIZER_CLASS_IN_USE])
        log.info("class %s is no longer used; released its finalizer", key)
        return None

    async def _write_class_status(
        self, obj: Mapping[str, Any], pods: list[str], claims: list[str]
    ) -> None:
        meta = obj["metadata"]
        generation = int(meta.get("generation") or 0)
        previous = list((obj.get("status") or {}).get("conditions") or [])
        dmps = {
            (d.get("spec") or {}).get("dmpName")
            for d in self.mounts.store.by_index(INDEX_CLASS, meta["name"])
        } - {None, ""}
        ready: tuple[bool, str, str] = (True, "Valid", "the class is valid")
        try:
            spc = StorageProviderClass.from_object(obj)
        except InvalidObject as exc:
            ready = (False, "InvalidSpec", str(exc))
        else:
            if self.registry is not None:
                try:
                    self.registry.get(spc.provider)
                except DynvolError as exc:
                    ready = (False, "UnknownProvider", str(exc))
        in_use = bool(pods or claims)
        extra = []
        credentials = self.credentials.condition(meta["name"])
        if credentials is not None:
            extra.append(
                _condition(
                    CONDITION_CREDENTIALS,
                    credentials.ok,
                    credentials.reason,
                    credentials.message,
                    generation,
                    previous,
                )
            )
        status = {
            "observedGeneration": generation,
            "inUse": {"pods": len(pods), "claims": len(claims), "dmps": len(dmps)},
            "conditions": [
                _condition("Ready", *ready, generation, previous),
                _condition(
                    "InUse",
                    in_use,
                    "InUse" if in_use else "Unused",
                    f"{len(pods)} pods and {len(claims)} claims use the class"
                    if in_use
                    else "no pod or claim uses the class",
                    generation,
                    previous,
                ),
                *extra,
            ],
        }
        if _without_times(obj.get("status") or {}) == _without_times(status):
            return
        patch = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": status}
        with contextlib.suppress(APINotFound):
            await self.client.patch(
                CLASSES, meta["name"], patch, subresource="status", field_manager=FIELD_MANAGER
            )

    async def _set_finalizers(self, obj: Mapping[str, Any], finalizers: list[str]) -> None:
        meta = obj["metadata"]
        patch = {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}}
        with contextlib.suppress(APINotFound):
            await self.client.patch(CLASSES, meta["name"], patch, field_manager=FIELD_MANAGER)

    # -- claims ------------------------------------------------------------------------

    def _class_model(self, name: str) -> StorageProviderClass | None:
        raw = self.classes.store.get(name)
        if raw is None:
            return None
        model: StorageProviderClass | None = self._class_models.get_or_none(raw)
        return model

    def _acceptance(self, claim: DynamicVolumeClaim) -> tuple[bool, str, str]:
        """Whether the claim's spec can be acted on: (ok, reason, message)."""
        if self.registry is not None:
            try:
                self.registry.get(claim.storage_provider)
            except DynvolError as exc:
                return False, "UnknownProvider", str(exc)
            params: Mapping[str, str] = {}
            # Unknown until a pod names the class, unless the claim pins one: then its
            # connection policy (spec.connection) is checked here too, not only in the DMP.
            connection: ConnectionPolicy | None = None
            if claim.storage_provider_class:
                pinned = self._class_model(claim.storage_provider_class)
                params = pinned.provider_parameters if pinned is not None else {}
                connection = pinned.connection if pinned is not None else None
            try:
                self.registry.parse_claim_config(
                    claim.provider_config,
                    parameters=params,
                    connection=connection,
                    class_name=claim.storage_provider_class,
                )
            except InvalidObject as exc:
                return False, "InvalidConfig", str(exc)
        if claim.storage_provider_class:
            spc = self._class_model(claim.storage_provider_class)
            if spc is None:
                return (
                    False,
                    "ClassNotFound",
                    f"StorageProviderClass {claim.storage_provider_class!r} does not exist",
                )
            if not spc.allows_namespace(claim.namespace):
                return (
                    False,
                    "NamespaceNotAllowed",
                    f"StorageProviderClass {spc.name!r} may not be used in namespace "
                    f"{claim.namespace!r}",
                )
        return True, "Accepted", "the claim is valid"

    async def reconcile_claim(self, key: str) -> Outcome | None:
        """Aggregate the claim's mounts into its status."""
        raw = self.claims.store.get(key)
        if raw is None:
            return None
        meta = raw["metadata"]
        generation = int(meta.get("generation") or 0)
        previous = list((raw.get("status") or {}).get("conditions") or [])
        try:
            claim = DynamicVolumeClaim.from_object(raw)
        except InvalidObject as exc:
            status = {
                "observedGeneration": generation,
                "matchedPods": 0,
                "mountedPods": 0,
                "failedPods": 0,
                "dmpCount": 0,
                "dmps": [],
                "conditions": [
                    _condition("Accepted", False, "InvalidSpec", str(exc), generation, previous),
                    _condition(
                        "Ready", False, "InvalidSpec", "nothing is mounted", generation, previous
                    ),
                ],
            }
            await self._write_claim_status(raw, status)
            return None
        ok, reason, message = self._acceptance(claim)
        ns = claim.namespace
        chosen = self._selected_pods(key, claim)
        if self._gone_nodes:
            # A pod bound to a Node seen deleted is not mounted by anyone (its node plugin
            # went with the node); it only waits for pod GC, which kube-controller-manager
            # runs 40 s after the node went at the earliest: it does not count.
            chosen = tuple(p for p in chosen if p.node_name not in self._gone_nodes)
        # Only claims whose mountpoints overlap can take a pod away from this one.
        rivals = [
            other
            for raw_claim in self.claims.store.by_index("namespace", ns)
            if (other := self._claim_models.get_or_none(raw_claim)) is not None
            and other.uid != claim.uid
            and mountpoints_overlap(other.mountpoint, claim.mountpoint)
        ]
        classes = {
            spc.name: spc
            for raw_class in self.classes.store
            if (spc := self._class_models.get_or_none(raw_class)) is not None
        }
        matches = [m for m in match([claim, *rivals], chosen, classes) if m.claim.uid == claim.uid]
        accepted = [m for m in matches if m.ok]
        rejected = [m for m in matches if not m.ok]
        dvms = self.mounts.store.by_index(INDEX_CLAIM, key)
        dvms = [d for d in dvms if (d.get("spec") or {}).get("claimUID") == meta.get("uid")]
        phases = [(d.get("status") or {}).get("phase") or "Pending" for d in dvms]
        mounted = phases.count("Mounted")
        failed = phases.count("Failed")
        dmp_nodes = {
            (d.get("spec") or {}).get("dmpName", ""): (d.get("spec") or {}).get("nodeName", "")
            for d in dvms
        }
        dmp_nodes.pop("", None)
        dmps = [{"name": name, "node": dmp_nodes[name]} for name in sorted(dmp_nodes)]
        matched = len(accepted)
        if not ok:
            ready = (False, reason, "nothing is mounted until the claim is fixed")
        elif matched == 0 and not rejected:
            ready = (
                False,
                "NoMatchingPods",
                "no running pod with the dynvol volume matches the selector",
            )
        elif failed:
            first = next(
                (d for d in dvms if (d.get("status") or {}).get("phase") == "Failed"), None
            )
            detail = ((first or {}).get("status") or {}).get("message", "")
            ready = (False, "MountFailed", f"{failed} of {matched} mounts failed: {detail}")
        elif rejected:
            first_rejected = rejected[0]
            more = f" (and {len(rejected) - 1} more pods)" if len(rejected) > 1 else ""
            ready = (False, str(first_rejected.reason), first_rejected.message + more)
        elif mounted < matched:
            ready = (False, "Mounting", f"{mounted} of {matched} mounts are ready")
        else:
            ready = (True, "Mounted", f"mounted in all {matched} matching pods")
        status = {
            "observedGeneration": generation,
            "matchedPods": matched,
            "mountedPods": mounted,
            "failedPods": failed,
            "dmpCount": len(dmps),
            "dmps": dmps[:MAX_DMPS_IN_STATUS],
            "conditions": [
                _condition("Accepted", ok, reason, message, generation, previous),
                _condition("Ready", ready[0], ready[1], ready[2], generation, previous),
            ],
        }
        await self._write_claim_status(raw, status)
        return None

    def _selected_pods(self, key: str, claim: DynamicVolumeClaim) -> tuple[PodInfo, ...]:
        """:func:`selected_pods` of the claim, kept while neither it nor its pods change."""
        version = (
            claim.uid,
            claim.generation,
            claim.deleting,
            self.pods_in.epoch(claim.namespace),
        )
        hit = self._selected.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        chosen = selected_pods(claim, self.pods_in(claim.namespace))
        self._selected[key] = (version, chosen)
        return chosen

    async def _write_claim_status(self, raw: Mapping[str, Any], status: dict[str, Any]) -> None:
        current = raw.get("status") or {}
        if _without_times(current) == _without_times(status):
            return
        meta = raw["metadata"]
        patch = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": status}
        try:
            await self.client.patch(
                CLAIMS,
                meta["name"],
                patch,
                namespace=meta["namespace"],
                subresource="status",
                field_manager=FIELD_MANAGER,
            )
        except APINotFound:
            return
        except APIConflict:
            raise
        self._report_transitions(raw, current, status)

    def _report_transitions(
        self, raw: Mapping[str, Any], old: Mapping[str, Any], new: Mapping[str, Any]
    ) -> None:
        before = {cond["type"]: cond for cond in old.get("conditions") or ()}
        for cond in new["conditions"]:
            prior = before.get(cond["type"])
            if prior and (prior.get("status"), prior.get("reason")) == (
                cond["status"],
                cond["reason"],
            ):
                continue
            if cond["status"] == "True":
                if cond["type"] == "Ready":
                    self.recorder.record(raw, NORMAL, cond["reason"], cond["message"])
            elif cond["reason"] not in ("Mounting", "NoMatchingPods"):
                self.recorder.record(raw, WARNING, cond["reason"], cond["message"])
            elif cond["type"] == "Ready" and prior is not None:
                self.recorder.record(raw, NORMAL, cond["reason"], cond["message"])

    # -- admission ------------------------------------------------------------------------

    async def mutate(self, request: Mapping[str, Any]) -> AdmissionDecision:
        """The mutating webhook: inject dynvol's volume into opted-in pods."""
        if request.get("operation") != "CREATE":
            return AdmissionDecision.allow()
        pod = request.get("object") or {}
        ns_name = request.get("namespace") or pod.get("metadata", {}).get("namespace")
        namespace = self.namespaces.store.get(ns_name) if ns_name else None
        if namespace is None and ns_name:
            try:
                namespace = await self.client.get(NAMESPACES, ns_name)
            except APIError:
                namespace = None
        pod = {**pod, "metadata": {**pod.get("metadata", {}), "namespace": ns_name}}
        return mutate_pod(pod, namespace, class_lookup=self.classes.store.get)

    def validate(self, request: Mapping[str, Any]) -> AdmissionDecision:
        """The validating webhook for classes and claims."""
        obj = request.get("object") or {}
        kind = (request.get("kind") or {}).get("kind") or obj.get("kind")
        if request.get("operation") not in ("CREATE", "UPDATE"):
            return AdmissionDecision.allow()
        if kind == c.KIND_CLASS:
            return self._validate_class(obj)
        if kind == c.KIND_CLAIM:
            ns = request.get("namespace") or obj.get("metadata", {}).get("namespace")
            obj = {**obj, "metadata": {**obj.get("metadata", {}), "namespace": ns}}
            return self._validate_claim(obj)
        return AdmissionDecision.allow()

    def _validate_class(self, obj: Mapping[str, Any]) -> AdmissionDecision:
        if obj.get("metadata", {}).get("deletionTimestamp"):
            return AdmissionDecision.allow()
        try:
            spc = StorageProviderClass.from_object(obj)
        except InvalidObject as exc:
            return AdmissionDecision.deny(str(exc))
        if self.registry is not None:
            try:
                provider = self.registry.get(spc.provider)
            except DynvolError as exc:
                return AdmissionDecision.deny(f"spec.provider: {exc}")
            # The provider owns the meaning of its parameters and pinned connection fields:
            # parse an empty claim and keep only what it says about the class.
            try:
                parse_provider_config(
                    provider, {}, parameters=spc.provider_parameters, connection=spc.connection
                )
            except InvalidObject as exc:
                bad = [e for e in exc.errors if e.path.startswith(("parameters.", "connection."))]
                if bad:
                    qualified = qualify_config_errors(
                        InvalidObject(bad), block="", class_name=spc.name
                    )
                    return AdmissionDecision.deny(str(qualified))
        return AdmissionDecision.allow()

    def _validate_claim(self, obj: Mapping[str, Any]) -> AdmissionDecision:
        if obj.get("metadata", {}).get("deletionTimestamp"):
            # Finalizer removal on a claim being deleted must always pass.
            return AdmissionDecision.allow()
        try:
            claim = DynamicVolumeClaim.from_object(obj)
        except InvalidObject as exc:
            return AdmissionDecision.deny(str(exc))
        ok, reason, message = self._acceptance(claim)
        if not ok:
            return AdmissionDecision.deny(
                message, reason="Forbidden" if reason == "NamespaceNotAllowed" else "Invalid"
            )
        # Mountpoint conflicts with other claims over pods that exist now.
        others = [
            other
            for raw in self.claims.store.by_index("namespace", claim.namespace)
            if (other := self._claim_models.get_or_none(raw)) is not None
            and other.name != claim.name
            and not other.deleting
            and mountpoints_overlap(other.mountpoint, claim.mountpoint)
        ]
        if others:
            for pod in self.pods.store.by_index("namespace", claim.namespace):
                labels = pod["metadata"].get("labels") or {}
                if objects.injected_class(pod) is None or not claim.selector.selects(labels):
                    continue
                for other in others:
                    if other.selector.selects(labels):
                        return AdmissionDecision.deny(
                            f"spec.mountpoint: {claim.mountpoint!r} overlaps the mountpoint "
                            f"{other.mountpoint!r} of claim {other.name!r}, which also selects "
                            f"pod {pod['metadata']['name']!r}; choose a mountpoint that neither "
                            "equals nor nests inside the other",
                            reason="Conflict",
                        )
        return AdmissionDecision.allow()


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta["name"]
