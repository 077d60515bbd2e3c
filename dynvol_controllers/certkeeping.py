"""Keeping the webhook's serving certificate (``--webhook-cert-management=self``).

:class:`CertificateKeeper` runs on every replica. Every ``interval`` seconds it reads
Secret ``dynvol-webhook-tls`` from the API (not from a Secret volume, which kubelet
refreshes only after up to a minute or more, so replicas would serve a renewed
certificate late) and serves what it holds: it writes the certificate and key into a
private directory, where the webhook server's :class:`~.webhooks.ServingCertificate`
picks them up for the next handshake, and starts the server once the first usable pair
is there. On the replica holding the Lease (or on every replica without leader election)
it also writes: a missing or unusable Secret, or one :func:`~.servingcert.examine`
faults, is replaced with a conditional create or update (on a conflict it reads again
and starts over), and the ``caBundle`` of every webhook in the Mutating- and
ValidatingWebhookConfiguration is set to the Secret's ``ca.crt`` -- before a new CA signs
anything that is served, and again whenever someone changed it.

Neighbours: :mod:`.servingcert` (the pure decisions), :mod:`.webhooks` (the server),
:mod:`.app` (wiring).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from dynvol_core import constants as c
from dynvol_kube import APIConflict, APIError, APINotFound, Client, LeaderElector, stop_task
from dynvol_kube.resources import MUTATING_WEBHOOKS, SECRETS, VALIDATING_WEBHOOKS

from .servingcert import (
    SECRET_TYPE,
    CertificatePolicy,
    Examination,
    Material,
    UnusableSecret,
    certificate_pem,
    examine,
    read_bundle,
    read_secret,
    renew,
    service_names,
)
from .webhooks import WEBHOOK_CONFIG_NAME, WebhookServer

__all__ = ["CertificateKeeper", "CertificateSettings"]

log = logging.getLogger(__name__)

JSON_PATCH = "application/json-patch+json"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
_WRITE_ATTEMPTS = 5


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@attrs.frozen(kw_only=True)
class CertificateSettings:
    """Where the certificate lives and what it is for."""

    namespace: str = c.DEFAULT_SYSTEM_NAMESPACE
    secret_name: str = "dynvol-webhook-tls"
    service_name: str = "dynvol-webhook"
    #: The Mutating- and ValidatingWebhookConfiguration whose caBundle is kept.
    configuration_name: str = WEBHOOK_CONFIG_NAME
    #: Names beyond the Service's (DNS names or IP addresses), for an apiserver that
    #: calls the webhook by URL.
    extra_names: tuple[str, ...] = ()
    policy: CertificatePolicy = attrs.field(factory=CertificatePolicy)
    #: Seconds between checks of the Secret and the caBundle.
    interval: float = attrs.field(default=15.0)

    @interval.validator
    def _check_interval(self, _: object, value: float) -> None:
        if not value > 0:
            raise ValueError(f"interval must be positive, not {value}")

    @property
    def names(self) -> tuple[str, ...]:
        """The names the serving certificate must carry."""
        return service_names(self.service_name, self.namespace) + self.extra_names


@attrs.define(kw_only=True, eq=False)
class CertificateKeeper:
    """Keep, serve and (while leading) write the serving certificate; see the module."""

    client: Client
    settings: CertificateSettings
    webhook: WebhookServer
    #: The directory the webhook server reads its pair from (made private here).
    directory: Path
    elector: LeaderElector | None = None
    clock: Callable[[], dt.datetime] = _utcnow
    #: Set once a certificate is served (the webhook server listens).
    serving: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _served: tuple[bytes, bytes] | None = attrs.field(default=None, init=False)
    _task: asyncio.Task[None] | None = attrs.field(default=None, init=False)
    _unready: Callable[[], None] | None = attrs.field(default=None, init=False)
    _webhook_started: bool = attrs.field(default=False, init=False)

    @property
    def leading(self) -> bool:
        """Whether this replica may write."""
        return self.elector is None or self.elector.leading.is_set()

    async def start(self) -> None:
        """Start keeping in the background; the webhook server starts once served."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        metrics = self.client.metrics
        if metrics is not None:
            self._unready = metrics.health.add_readiness(
                "webhook serving certificate", self._readiness
            )
        self._task = asyncio.create_task(self._run(), name="webhook certificate")

    async def close(self) -> None:
        """Stop checking, stop the webhook server, remove the private copy of the key."""
        await stop_task(self._task)
        self._task = None
        if self._webhook_started:
            await self.webhook.close()
            self._webhook_started = False
        if self._unready is not None:
            self._unready()
            self._unready = None
        shutil.rmtree(self.directory, ignore_errors=True)

    async def _readiness(self) -> str | None:
        return None if self.serving.is_set() else "no webhook serving certificate yet"

    async def _run(self) -> None:
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except APIError as exc:
                log.warning("webhook certificate: %s", exc)
            except Exception:
                log.exception("webhook certificate check failed")
            # Until something is served, look again soon (a follower waits for the leader).
            wait = (
                self.settings.interval
                if self.serving.is_set()
                else min(1.0, self.settings.interval)
            )
            await asyncio.sleep(wait)

    async def sync(self) -> None:
        """One pass: read the Secret; while leading, repair it and the caBundle; serve."""
        secret = await self._read()
        material: Material | None
        if self.leading:
            material = await self._ensure_secret(secret)
            await self.ensure_ca_bundle(material)
        else:
            material = self._usable(secret)
        if material is not None:
            await self._serve(material)

    async def _read(self) -> dict[str, Any] | None:
        try:
            secret: dict[str, Any] = await self.client.get(
                SECRETS, self.settings.secret_name, namespace=self.settings.namespace
            )
        except APINotFound:
            return None
        return secret

    def _usable(self, secret: dict[str, Any] | None) -> Material | None:
        """What a follower serves: any pair that parses (the leader judges the rest)."""
        if secret is None:
            return None
        try:
            material = read_secret(secret.get("data"))
        except UnusableSecret as exc:
            log.debug("webhook certificate Secret not usable yet: %s", exc)
            return None
        return material if material.cert.public_key() == material.key.public_key() else None

    def _examined(
        self, secret: dict[str, Any] | None
    ) -> tuple[Material | None, Examination | None, tuple[str, ...]]:
        if secret is None:
            return None, None, (f"Secret {self.settings.secret_name} is missing",)
        if secret.get("type") != SECRET_TYPE:
            return None, None, (f"type: {secret.get('type')!r}, not {SECRET_TYPE}",)
        try:
            material = read_secret(secret.get("data"))
        except UnusableSecret as exc:
            return None, None, (str(exc),)
        found = examine(material, self.settings.names, self.clock(), self.settings.policy)
        return material, found, found.reasons

    async def _ensure_secret(self, secret: dict[str, Any] | None) -> Material:
        for _ in range(_WRITE_ATTEMPTS):
            material, found, reasons = self._examined(secret)
            if material is not None and found is not None and found.ok:
                return material
            foreign = read_bundle((secret or {}).get("data")) if material is None else ()
            fresh = renew(
                material, found, self.settings.names, self.clock(), self.settings.policy,
                trusted_before=foreign,
            )  # fmt: skip
            log.info(
                "webhook certificate in Secret %s/%s: %s; writing a new one",
                self.settings.namespace, self.settings.secret_name, "; ".join(reasons),
            )  # fmt: skip
            # Trust before serving: the apiserver learns a new CA before anything it
            # signed is served, and keeps the CA that is served now.
            trusted = fresh.bundle + tuple(
                cert for cert in (material.bundle if material else ()) if cert not in fresh.bundle
            )
            await self._set_ca_bundle(b"".join(certificate_pem(cert) for cert in trusted))
            try:
                await self._write(secret, fresh)
            except APIConflict:
                log.info("webhook certificate Secret changed meanwhile; reading it again")
                secret = await self._read()
                continue
            self._count(material, fresh)
            return fresh
        raise RuntimeError(
            f"could not write Secret {self.settings.namespace}/{self.settings.secret_name}: "
            f"{_WRITE_ATTEMPTS} conflicts in a row"
        )

    async def _write(self, secret: dict[str, Any] | None, fresh: Material) -> None:
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": SECRET_TYPE,
            "metadata": {
                "name": self.settings.secret_name,
                "namespace": self.settings.namespace,
                "labels": {c.LABEL_MANAGED_BY: c.LABEL_MANAGED_BY_VALUE},
            },
            "data": fresh.secret_data(),
        }
        if secret is None:
            await self.client.create(SECRETS, body, namespace=self.settings.namespace)
            return
        if secret.get("type") != SECRET_TYPE:
            # The type cannot be changed in place: delete exactly this object, then create.
            meta = secret["metadata"]
            with contextlib.suppress(APINotFound):
                await self.client.delete(
                    SECRETS, self.settings.secret_name, namespace=self.settings.namespace,
                    uid=meta.get("uid"), resource_version=meta.get("resourceVersion"),
                )  # fmt: skip
            await self.client.create(SECRETS, body, namespace=self.settings.namespace)
            return
        meta = secret["metadata"]
        body["metadata"]["resourceVersion"] = meta["resourceVersion"]
        labels = {**(meta.get("labels") or {}), **body["metadata"]["labels"]}
        body["metadata"]["labels"] = labels
        if meta.get("annotations"):
            body["metadata"]["annotations"] = meta["annotations"]
        await self.client.replace(SECRETS, body)

    def _count(self, old: Material | None, fresh: Material) -> None:
        metrics = self.client.metrics
        if metrics is None:
            return
        if old is None or old.ca_cert != fresh.ca_cert:
            metrics.webhook_cert_renewals.labels("ca").inc()
        if old is None or old.cert != fresh.cert:
            metrics.webhook_cert_renewals.labels("serving").inc()

    async def ensure_ca_bundle(self, material: Material) -> None:
        """Set every webhook's caBundle to the material's bundle where it differs."""
        await self._set_ca_bundle(material.bundle_pem())

    async def _set_ca_bundle(self, bundle_pem: bytes) -> None:
        bundle = base64.b64encode(bundle_pem).decode()
        for resource in (MUTATING_WEBHOOKS, VALIDATING_WEBHOOKS):
            name = self.settings.configuration_name
            try:
                config = await self.client.get(resource, name)
            except APINotFound:
                log.warning("%s %s not found: its caBundle cannot be set", resource.kind, name)
                continue
            ops: list[dict[str, Any]] = []
            for i, hook in enumerate(config.get("webhooks") or ()):
                if (hook.get("clientConfig") or {}).get("caBundle") == bundle:
                    continue
                # The test keeps the patch from landing on another webhook if the list
                # was reordered since the read; the patch then fails and the next pass
                # tries again.
                ops.append({"op": "test", "path": f"/webhooks/{i}/name", "value": hook["name"]})
                ops.append(
                    {"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": bundle}
                )
            if ops:
                await self.client.patch(resource, name, ops, content_type=JSON_PATCH)
                log.info("set the caBundle of %s %s", resource.kind, name)

    async def _serve(self, material: Material) -> None:
        pair = (material.cert_pem(), material.key_pem())
        if pair != self._served:
            # Key first: a handshake between the two renames finds a pair that does not
            # match, and the server keeps the previous one until the next handshake.
            _replace(self.directory / KEY_FILE, pair[1])
            _replace(self.directory / CERT_FILE, pair[0])
            self._served = pair
            metrics = self.client.metrics
            if metrics is not None:
                metrics.webhook_cert_expiry.set(material.cert.not_valid_after_utc.timestamp())
            log.info(
                "serving webhook certificate %x (expires %s)",
                material.cert.serial_number, material.cert.not_valid_after_utc.isoformat(),
            )  # fmt: skip
        if not self._webhook_started:
            await self.webhook.start()
            self._webhook_started = True
        self.serving.set()


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by this user only."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
