"""Assembling ``dynvol controller``: manager, cluster controller, webhook server, election.

The shell (``dynvol.commands.controller``) parses flags and calls :class:`ControllerApp`;
everything else is wired here, in start order: informer caches, the Event recorder and the
webhook server (every replica serves admission), then -- on the replica holding the Lease
-- the class and claim reconcilers.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import attrs

from dynvol_core import constants as c
from dynvol_kube import APIConflict, APINotFound, Client, EventRecorder, LeaderElector, Manager
from dynvol_kube.resources import MUTATING_WEBHOOKS, VALIDATING_WEBHOOKS, Resource

from .certkeeping import CertificateKeeper, CertificateSettings
from .cluster import ClusterController
from .webhooks import (
    MUTATE_PODS_PATH,
    VALIDATE_PATH,
    Decide,
    WebhookServer,
    webhook_configurations,
)

__all__ = ["ControllerApp", "register_webhooks"]

log = logging.getLogger(__name__)


def default_identity() -> str:
    """A Lease holder identity: the pod name (hostname) plus the process id."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{os.getpid()}"


async def register_webhooks(client: Client, *, ca_bundle: str, url: str, **kw: Any) -> None:
    """Create or replace dynvol's webhook configurations pointing at ``url`` (local use)."""
    mutating, validating = webhook_configurations(ca_bundle=ca_bundle, url=url, **kw)
    for resource, body in ((MUTATING_WEBHOOKS, mutating), (VALIDATING_WEBHOOKS, validating)):
        await _upsert(client, resource, body)


async def _upsert(client: Client, resource: Resource, body: dict[str, Any]) -> None:
    name = body["metadata"]["name"]
    for _ in range(5):
        try:
            current = await client.get(resource, name)
        except APINotFound:
            try:
                await client.create(resource, body)
                return
            except APIConflict:
                continue
        replacement = {
            **body,
            "metadata": {
                **body["metadata"],
                "resourceVersion": current["metadata"]["resourceVersion"],
            },
        }
        try:
            await client.replace(resource, replacement)
            return
        except APIConflict:
            continue
    raise RuntimeError(f"could not write {resource.kind} {name}")


@attrs.define(kw_only=True, eq=False)
class ControllerApp:
    """Everything ``dynvol controller`` runs, with an explicit start/close lifecycle.

    The webhook server's certificate comes from ``tls_cert``/``tls_key`` (files someone
    else keeps, such as cert-manager) or, with ``serving_cert``, from the Secret a
    :class:`~.certkeeping.CertificateKeeper` keeps (and, while leading, writes); with
    neither, no webhook server runs (reconcilers only).
    """

    client: Client
    tls_cert: str | None = None
    tls_key: str | None = None
    serving_cert: CertificateSettings | None = None
    webhook_host: str = "127.0.0.1"
    webhook_port: int = 9443
    leader_elect: bool = True
    lease_name: str = "dynvol-controller"
    lease_namespace: str = c.DEFAULT_SYSTEM_NAMESPACE
    identity: str = attrs.field(factory=default_identity)
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    registry: Any = None
    workers: int = 4
    manager: Manager = attrs.field(init=False)
    controller: ClusterController = attrs.field(init=False)
    webhook: WebhookServer | None = attrs.field(default=None, init=False)
    keeper: CertificateKeeper | None = attrs.field(default=None, init=False)
    elector: LeaderElector | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        recorder = EventRecorder(self.client, "dynvol-controller", host=self.identity)
        self.controller = ClusterController(
            self.client,
            recorder=recorder,
            registry=self.registry,
            workers=self.workers,
            # The Lease lives in the system namespace, and so do the credential copies.
            system_namespace=self.lease_namespace,
        )
        if self.leader_elect:
            self.elector = LeaderElector(
                self.client,
                name=self.lease_name,
                namespace=self.lease_namespace,
                identity=self.identity,
                lease_duration=self.lease_duration,
                renew_deadline=self.renew_deadline,
                retry_period=self.retry_period,
            )
        # It lists every pod and mount of the cluster from etcd; on a big cluster whose
        # nodes all relist at once (after an apiserver restart) that takes minutes, and
        # giving up only restarts the process to list from the start again.
        self.manager = Manager(self.client, elector=self.elector, sync_timeout=600)
        for informer in self.controller.informers:
            self.manager.add_informer(informer)
        self.manager.add(recorder)
        if self.tls_cert and self.tls_key and self.serving_cert:
            raise ValueError("tls_cert/tls_key and serving_cert exclude each other")
        handlers: dict[str, Decide] = {
            MUTATE_PODS_PATH: self.controller.mutate,
            VALIDATE_PATH: self.controller.validate,
        }
        if self.tls_cert and self.tls_key:
            self.webhook = WebhookServer(
                host=self.webhook_host,
                port=self.webhook_port,
                cert_file=self.tls_cert,
                key_file=self.tls_key,
                handlers=handlers,
            )
            self.manager.add(self.webhook)
        elif self.serving_cert is not None:
            # The pair is copied from the Secret into a private directory (the key never
            # lands anywhere shared); the keeper starts the server once it is there.
            directory = Path(tempfile.mkdtemp(prefix="dynvol-webhook-"))
            self.webhook = WebhookServer(
                host=self.webhook_host,
                port=self.webhook_port,
                cert_file=str(directory / "tls.crt"),
                key_file=str(directory / "tls.key"),
                handlers=handlers,
            )
            self.keeper = CertificateKeeper(
                client=self.client,
                settings=self.serving_cert,
                webhook=self.webhook,
                directory=directory,
                elector=self.elector,
            )
            # Not leader-gated: every replica serves; only the leader writes.
            self.manager.add(self.keeper)
        self.manager.add(self.controller, leader_gated=True)

    async def start(self) -> None:
        """Start everything (see :class:`~.managing.Manager` for the order)."""
        await self.manager.start()

    async def close(self) -> None:
        """Stop in reverse order, releasing the Lease."""
        await self.manager.close()

    async def wait_closed(self) -> None:
        """Until closed, or stopped by losing the Lease."""
        await self.manager.wait_closed()

    async def __aenter__(self) -> ControllerApp:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
