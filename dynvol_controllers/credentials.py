"""Credential copies: one copy of each StorageProviderClass's Secret in the system namespace.

Part of the leader-elected cluster controller (:mod:`.cluster` owns the class informer and
starts this with the other reconcilers). Observe: the classes (shared informer), the copies
in the system namespace (by label, without their data) and one small informer per Secret a
class references (``fieldSelector metadata.name``), so no process caches the Secrets of the
whole cluster. Queue: the class name. Process: render the copy the class wants
(:func:`dynvol_core.dispatch.credential_secret_manifest`) and compare digests. Act: create,
replace or delete the copy.

Why a copy at all (docs/design.md §2, §6.5): the Dynamic Mount Pods mount the copy as a Secret
volume, so the node plugin needs no access to any Secret, and one compromised node cannot
read the Secrets of the cluster. The copy is owned by its class (it goes with it) and
carries the digest of the source data; kubelet refreshes the DMPs' volumes when the copy
changes, and the DMP agent then mounts again with the new credentials.

A missing or unreadable source Secret leaves the last good copy in place (mounts that work
keep working) and is reported on the class: the ``CredentialsReady`` condition, which the
class status writer in :mod:`.cluster` includes through :meth:`CredentialCopier.condition`,
and a Warning Event when the state changes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from dynvol_core import constants as c
from dynvol_core.dispatch import (
    ANNOTATION_DATA_DIGEST,
    ANNOTATION_SOURCE_SECRET,
    credential_secret_manifest,
    credentials_secret_name,
)
from dynvol_core.models import ObjectRef, StorageProviderClass
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
from dynvol_kube.resources import SECRETS

from . import objects

__all__ = ["CONDITION_CREDENTIALS", "CredentialCopier", "CredentialState"]

log = logging.getLogger(__name__)

FIELD_MANAGER = "dynvol-controller"
CONDITION_CREDENTIALS = "CredentialsReady"
#: How often to look again at a source Secret that could not be read (403 and the like);
#: a missing one needs no retry: its informer reports when it is created.
_UNREADABLE_RETRY = 30.0


@attrs.frozen
class CredentialState:
    """The ``CredentialsReady`` condition of one class: (status, reason, message)."""

    ok: bool
    reason: str
    message: str


def _slim_copy(secret: dict[str, Any]) -> dict[str, Any]:
    """A copy without its data: the digest annotation says what it holds."""
    meta = secret.get("metadata") or {}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": objects.slim_metadata(
            meta, annotations=(ANNOTATION_DATA_DIGEST, ANNOTATION_SOURCE_SECRET)
        ),
    }


def _owner_class(copy: Mapping[str, Any]) -> str | None:
    for owner in (copy.get("metadata") or {}).get("ownerReferences") or ():
        if owner.get("kind") == c.KIND_CLASS and owner.get("apiVersion") == c.API_VERSION:
            name = owner.get("name")
            return name if isinstance(name, str) else None
    return None


@attrs.define(eq=False)
class CredentialCopier:
    """Keep ``dynvol-credentials-<class>`` in the system namespace equal to each class's Secret.

    ``classes`` is the cluster controller's class informer; ``on_state`` is called with a
    class name whenever its :class:`CredentialState` changed (the class status is rewritten).
    Lifecycle: the :attr:`copies` informer runs on every replica; :meth:`start` and
    :meth:`close` bracket the leader-only reconciling.
    """

    client: Client
    classes: Informer
    recorder: EventRecorder
    system_namespace: str = attrs.field(default=c.DEFAULT_SYSTEM_NAMESPACE, kw_only=True)
    on_state: Callable[[str], None] | None = attrs.field(default=None, kw_only=True)
    workers: int = attrs.field(default=2, kw_only=True)
    copies: Informer = attrs.field(init=False)
    controller: Controller = attrs.field(init=False)
    _sources: dict[ObjectRef, Informer] = attrs.field(factory=dict, init=False)
    _states: dict[str, CredentialState] = attrs.field(factory=dict, init=False)
    _models: objects.ModelCache = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._models = objects.ModelCache(StorageProviderClass.from_object)
        self.copies = Informer(
            self.client,
            SECRETS,
            namespace=self.system_namespace,
            # Only per-class copies carry the class label (older per-DMP copies do not).
            label_selector=f"{c.LABEL_COMPONENT}={c.COMPONENT_CREDENTIALS},{c.LABEL_CLASS}",
            transform=_slim_copy,
        )
        self.controller = Controller(
            "credentials", self.reconcile, workers=self.workers, metrics=self.client.metrics
        )
        self.copies.add_handler(self._on_copy)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start reconciling every class and every copy (called once leading)."""
        await self.controller.start()
        for obj in self.classes.store:
            self.controller.enqueue(obj["metadata"]["name"])
        for copy in self.copies.store:
            owner = _owner_class(copy)
            if owner:
                self.controller.enqueue(owner)

    async def close(self) -> None:
        """Stop reconciling and the source informers."""
        await self.controller.close()
        for informer in self._sources.values():
            await informer.close()
        self._sources.clear()

    # -- observe -> queue ----------------------------------------------------------------

    def on_class(self, event: Event) -> None:
        """Queue a class whose spec (the Secret it references) or existence changed."""
        old = event.old
        if (
            event.type == "MODIFIED"
            and old is not None
            and old.get("spec") == event.obj.get("spec")
            and old["metadata"].get("uid") == event.obj["metadata"].get("uid")
        ):
            return  # a status or finalizer write
        self.controller.enqueue(event.obj["metadata"]["name"])

    def _on_copy(self, event: Event) -> None:
        owner = _owner_class(event.obj)
        if owner:
            self.controller.enqueue(owner)

    def _on_source(self, event: Event) -> None:
        meta = event.obj.get("metadata") or {}
        ref = ObjectRef(namespace=meta.get("namespace", ""), name=meta.get("name", ""))
        for name in self._classes_using(ref):
            self.controller.enqueue(name)

    def _classes_using(self, ref: ObjectRef) -> list[str]:
        return [
            spc.name
            for raw in self.classes.store
            if (spc := self._model(raw)) is not None and spc.secret_ref == ref
        ]

    def _model(self, raw: Mapping[str, Any]) -> StorageProviderClass | None:
        model: StorageProviderClass | None = self._models.get_or_none(raw)
        return model

    # -- status --------------------------------------------------------------------------

    def condition(self, class_name: str) -> CredentialState | None:
        """The class's ``CredentialsReady`` state, or None before it was reconciled."""
        return self._states.get(class_name)

    def _set_state(self, raw: Mapping[str, Any], state: CredentialState | None) -> None:
        name = raw["metadata"]["name"]
        old = self._states.get(name)
        if state == old:
            return
        if state is None:
            self._states.pop(name, None)
        else:
            self._states[name] = state
            if not state.ok:
                self.recorder.record(raw, WARNING, state.reason, state.message)
            elif old is not None and not old.ok:
                self.recorder.record(raw, NORMAL, state.reason, state.message)
        if self.on_state is not None:
            self.on_state(name)

    # -- process -> act ------------------------------------------------------------------

    async def reconcile(self, key: str) -> Outcome | None:
        """Make the copy of class ``key`` match its source Secret (or remove it)."""
        raw = self.classes.store.get(key)
        copy_name = credentials_secret_name(key)
        existing = self.copies.store.get(f"{self.system_namespace}/{copy_name}")
        if raw is None:
            if existing is not None:
                await self._delete(copy_name, existing["metadata"].get("uid"))
            self._states.pop(key, None)
            await self._track_sources()
            return None
        spc = self._model(raw)
        if spc is None:
            # An invalid class (the webhook normally refuses it) changes nothing that works.
            return None
        if spc.secret_ref is None:
            if existing is not None:
                await self._delete(copy_name, existing["metadata"].get("uid"))
            self._set_state(raw, None)
            await self._track_sources()
            return None
        ref = spc.secret_ref
        await self._track_sources()
        source, problem = await self._read_source(ref)
        if source is None:
            assert problem is not None
            self._set_state(raw, problem)
            return RequeueAfter(_UNREADABLE_RETRY) if problem.reason == "SecretUnreadable" else None
        body = credential_secret_manifest(spc, namespace=self.system_namespace, source=source)
        ready = CredentialState(
            True, "Copied", f"Secret {ref} is copied to {self.system_namespace}/{copy_name}"
        )
        if existing is not None:
            have = existing["metadata"]
            want = body["metadata"]
            if (
                (have.get("annotations") or {}).get(ANNOTATION_DATA_DIGEST)
                == want["annotations"][ANNOTATION_DATA_DIGEST]
                and (have.get("annotations") or {}).get(ANNOTATION_SOURCE_SECRET) == str(ref)
                and [o.get("uid") for o in have.get("ownerReferences") or ()] == [spc.uid]
            ):
                self._set_state(raw, ready)
                return None
            want["resourceVersion"] = have["resourceVersion"]
            await self.client.replace(SECRETS, body, field_manager=FIELD_MANAGER)
            log.info("class %s: updated its credentials copy %s", key, copy_name)
        else:
            try:
                await self.client.create(
                    SECRETS, body, namespace=self.system_namespace, field_manager=FIELD_MANAGER
                )
            except APIConflict as exc:
                if not exc.already_exists:
                    raise
                # Made by an earlier leader and not in the cache yet: take it over.
                current = await self.client.get(SECRETS, copy_name, namespace=self.system_namespace)
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                await self.client.replace(SECRETS, body, field_manager=FIELD_MANAGER)
            log.info("class %s: copied Secret %s to %s", key, ref, copy_name)
        self._set_state(raw, ready)
        return None

    async def _read_source(
        self, ref: ObjectRef
    ) -> tuple[Mapping[str, Any] | None, CredentialState | None]:
        informer = self._sources.get(ref)
        if informer is not None and informer.synced:
            source = informer.store.get(f"{ref.namespace}/{ref.name}")
            if source is not None:
                return source, None
            return None, _missing(ref)
        # Its informer has not listed yet (or cannot: no permission); ask once directly.
        try:
            return await self.client.get(SECRETS, ref.name, namespace=ref.namespace), None
        except APINotFound:
            return None, _missing(ref)
        except APIError as exc:
            return None, CredentialState(
                False,
                "SecretUnreadable",
                f"Secret {ref} named by spec.parameters[{c.PARAM_SECRET_NAME}] cannot be "
                f"read by dynvol's controller ({exc}); check that it exists and that the "
                "dynvol-controller ServiceAccount may read Secrets there",
            )

    async def _delete(self, name: str, uid: str | None) -> None:
        with contextlib.suppress(APINotFound, APIConflict):
            await self.client.delete(SECRETS, name, namespace=self.system_namespace, uid=uid)
        log.info("deleted credentials copy %s (its class is gone or has no Secret)", name)

    async def _track_sources(self) -> None:
        """One informer per Secret some class references; none for the others."""
        wanted = {
            spc.secret_ref
            for raw in self.classes.store
            if (spc := self._model(raw)) is not None and spc.secret_ref is not None
        }
        for ref in wanted - set(self._sources):
            informer = Informer(
                self.client,
                SECRETS,
                namespace=ref.namespace,
                field_selector=f"metadata.name={ref.name}",
            )
            informer.add_handler(self._on_source)
            self._sources[ref] = informer
            await informer.start()
        for ref in set(self._sources) - wanted:
            await self._sources.pop(ref).close()


def _missing(ref: ObjectRef) -> CredentialState:
    return CredentialState(
        False,
        "SecretNotFound",
        f"Secret {ref} named by spec.parameters[{c.PARAM_SECRET_NAME}] does not exist; create "
        "it (DMPs of this class keep the last copy until then)",
    )
