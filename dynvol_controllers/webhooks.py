"""The admission webhook server (HTTP/1.1 over TLS) and its webhook configurations.

Receives AdmissionReviews from the kube-apiserver, hands the request to a decision
function (pure ones live in :mod:`.admission`; the validating ones read informer caches),
and answers. The HTTP side is dynvol_kube's own small server (``dynvol_kube.serving``:
keep-alive, bounded and timed requests), not aiohttp, which the services no longer
install. :func:`webhook_configurations` builds the MutatingWebhookConfiguration and
ValidatingWebhookConfiguration objects that point the apiserver at it.

Failure policy, chosen deliberately:

* ``pods.<group>`` (annotation opt-in) sees every pod outside kube-system and the dynvol
  namespace, so it is ``Ignore``: a webhook outage must never block pods that did not opt
  in. The price -- an annotated pod created during an outage runs without the volume -- is
  made visible by the cluster controller (a Warning Event ``InjectionMissing`` on the pod).
* ``namespace-pods.<group>`` covers namespaces labelled ``<group>/inject=enabled``: every
  pod there asked for the volume, so it is ``Fail``.
* the validating webhook for classes and claims is ``Fail``: it only sees dynvol's own
  objects, and letting an unchecked claim through is worse than a retry.

The webhooks' selectors (the DMP component label, the ``inject=disabled`` opt-out) decide
only what gets mutated. What may carry dynvol's volume, look like a DMP or write a
DynamicVolumeMount is decided by ValidatingAdmissionPolicies inside the apiserver
(``manifests/base/admission-policies.yaml``), which see every pod after this webhook and
refuse even when it is down.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from dynvol_core import constants as c
from dynvol_kube.serving import Bounds, Handler, Reply, Request, Server

from .admission import INJECT_ENABLED, LABEL_INJECT, AdmissionDecision, review_response

__all__ = [
    "MUTATE_PODS_PATH",
    "VALIDATE_PATH",
    "ServingCertificate",
    "WebhookServer",
    "webhook_configurations",
]

log = logging.getLogger(__name__)

MUTATE_PODS_PATH = "/mutate-pods"
VALIDATE_PATH = "/validate"
WEBHOOK_CONFIG_NAME = "dynvol"

#: The largest AdmissionReview taken (a pod with its managed fields is far below it; the
#: apiserver itself refuses requests above 3 MiB).
MAX_REVIEW_BYTES = 8 * 1024 * 1024

Decide = Callable[[Mapping[str, Any]], AdmissionDecision | Awaitable[AdmissionDecision]]


class ServingCertificate:
    """The serving certificate and key, reloaded when either file changes on disk.

    cert-manager (or kubelet updating a Secret volume, which swaps a symlink) replaces the
    files while the server runs. Every new TLS handshake asks :meth:`context`, which
    compares the files' identity (device, inode, size, mtime) with what it loaded last and
    loads them again when they differ; connections already open keep the context they
    were made with, so no request in flight is dropped. A pair that does not load (the
    certificate written but not yet its key) keeps the previous one in service until the
    next handshake tries again.
    """

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.reloads = 0
        self._identity: tuple[tuple[int, int, int, int], ...] | None = None
        self._current: ssl.SSLContext | None = None

    def _file_identity(self) -> tuple[tuple[int, int, int, int], ...]:
        identity = []
        for path in (self.cert_file, self.key_file):
            st = os.stat(path)
            identity.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(identity)

    def _load(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def context(self) -> ssl.SSLContext:
        """The context for a new connection: the current files, or the last good pair.

        :raises OSError, ssl.SSLError: only when no pair has ever loaded.
        """
        try:
            identity = self._file_identity()
            if identity != self._identity or self._current is None:
                fresh = self._load()
                if self._current is not None:
                    self.reloads += 1
                    log.info("reloaded the serving certificate from %s", self.cert_file)
                self._current, self._identity = fresh, identity
        except (OSError, ssl.SSLError) as exc:
            if self._current is None:
                raise
            log.warning("keeping the serving certificate in use: cannot load the new one: %s", exc)
        return self._current

    def server_context(self) -> ssl.SSLContext:
        """The context to listen with: it hands each handshake to :meth:`context`."""
        listening = self._load()

        def on_client_hello(
            connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
        ) -> None:
            # Called for every ClientHello, with or without SNI (IP URLs send none).
            try:
                connection.context = self.context()
            except (OSError, ssl.SSLError):
                log.exception("no usable serving certificate")

        listening.sni_callback = on_client_hello
        self.context()
        return listening


class WebhookServer:
    """Serve admission endpoints over TLS on ``host:port`` (``port=0`` picks one).

    The certificate and key are reloaded when they change on disk (:class:`ServingCertificate`).
    Each path of ``handlers`` takes ``POST`` of an AdmissionReview (a JSON body of at most
    :data:`MAX_REVIEW_BYTES`); ``GET /healthz`` answers ``ok``. What the HTTP side allows
    (``bounds``) is :class:`~dynvol_kube.serving.Bounds`'s defaults unless given.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 9443,
        cert_file: str,
        key_file: str,
        handlers: Mapping[str, Decide],
        bounds: Bounds | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.cert_file = cert_file
        self.key_file = key_file
        self.certificate = ServingCertificate(cert_file, key_file)
        self.bounds = bounds or Bounds(body=MAX_REVIEW_BYTES)
        self._handlers = dict(handlers)
        self._server: Server | None = None
        self.reviews = 0

    @property
    def url(self) -> str:
        """The base URL (after :meth:`start`, with the actual port)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    @property
    def evicted(self) -> int:
        """Waiting connections ended to make room for new ones (:class:`Bounds` ``connections``)."""
        return self._server.evicted if self._server is not None else 0

    @property
    def refused(self) -> int:
        """New connections answered 503: every one of the bound had a review under way."""
        return self._server.refused if self._server is not None else 0

    def _ssl_context(self) -> ssl.SSLContext:
        return self.certificate.server_context()

    async def start(self) -> None:
        """Bind and serve."""
        if self._server is not None:
            return
        routes: dict[str, dict[str, Handler]] = {
            path: {"POST": self._endpoint(decide)} for path, decide in self._handlers.items()
        }
        routes["/healthz"] = {"GET": _healthz}
        server = Server(
            routes, host=self.host, port=self.port, ssl_context=self._ssl_context(),
            bounds=self.bounds,
        )  # fmt: skip
        await server.start()
        self._server = server
        self.port = server.port
        log.info("webhook server listening on %s", self.url)

    async def close(self) -> None:
        """Stop accepting, let in-flight reviews finish (within the bounds' grace)."""
        if self._server is not None:
            server, self._server = self._server, None
            await server.close()

    def _endpoint(self, decide: Decide) -> Handler:
        async def handle(request: Request) -> Reply:
            try:
                review = json.loads(request.body)
                admission_request = review["request"]
                if not isinstance(admission_request, dict):
                    raise TypeError("request is not an object")
            except (ValueError, KeyError, TypeError):
                return Reply.text(400, "expected an AdmissionReview")
            self.reviews += 1
            try:
                result = decide(admission_request)
                decision = await result if inspect.isawaitable(result) else result
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("admission of %s failed", _describe(admission_request))
                decision = AdmissionDecision.deny(
                    f"dynvol webhook error: {exc}", reason="InternalError"
                )
            if not decision.allowed:
                log.info("denied %s: %s", _describe(admission_request), decision.message)
            return Reply.json(review_response(admission_request, decision))

        return handle


async def _healthz(_: Request) -> Reply:
    return Reply(200, b"ok", "text/plain; charset=utf-8")


def _describe(request: Mapping[str, Any]) -> str:
    kind = (request.get("kind") or {}).get("kind", "?")
    ns = request.get("namespace") or ""
    name = request.get("name") or (request.get("object") or {}).get("metadata", {}).get(
        "generateName", ""
    )
    return f"{request.get('operation', '?')} {kind} {ns}/{name}"


def _client_config(
    ca_bundle: str, path: str, url: str | None, service: Mapping[str, Any] | None
) -> dict[str, Any]:
    config: dict[str, Any] = {"caBundle": ca_bundle}
    if url is not None:
        config["url"] = url.rstrip("/") + path
    elif service is not None:
        config["service"] = {**service, "path": path}
    else:
        raise ValueError("need a url or a service")
    return config


def webhook_configurations(
    *,
    ca_bundle: str,
    url: str | None = None,
    service: Mapping[str, Any] | None = None,
    system_namespace: str = c.DEFAULT_SYSTEM_NAMESPACE,
    name: str = WEBHOOK_CONFIG_NAME,
    timeout_seconds: int = 5,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (mutating, validating) webhook configurations for a server at ``url`` or behind
    ``service`` (``{"namespace": ..., "name": ..., "port": ...}``)."""
    excluded = sorted({"kube-system", system_namespace})
    not_dynvol_pods = {
        "matchExpressions": [
            # Pods dynvol makes (DMPs) never get the volume, and a pod can opt out.
            {"key": c.LABEL_COMPONENT, "operator": "NotIn", "values": [c.COMPONENT_DMP]},
            {"key": LABEL_INJECT, "operator": "NotIn", "values": ["disabled"]},
        ]
    }
    pod_rule = [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "operations": ["CREATE"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    common = {
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "timeoutSeconds": timeout_seconds,
        "matchPolicy": "Equivalent",
    }
    mutating = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {c.LABEL_MANAGED_BY: c.LABEL_MANAGED_BY_VALUE}},
        "webhooks": [
            {
                "name": f"pods.{c.GROUP}",
                "clientConfig": _client_config(ca_bundle, MUTATE_PODS_PATH, url, service),
                "rules": pod_rule,
                "failurePolicy": "Ignore",
                # Mounts added by later webhooks must not be missed by our conflict check.
                "reinvocationPolicy": "IfNeeded",
                "namespaceSelector": {
                    "matchExpressions": [
                        {
                            "key": "kubernetes.io/metadata.name",
                            "operator": "NotIn",
                            "values": excluded,
                        },
                        {"key": LABEL_INJECT, "operator": "NotIn", "values": [INJECT_ENABLED]},
                    ]
                },
                "objectSelector": not_dynvol_pods,
                **common,
            },
            {
                "name": f"namespace-pods.{c.GROUP}",
                "clientConfig": _client_config(ca_bundle, MUTATE_PODS_PATH, url, service),
                "rules": pod_rule,
                "failurePolicy": "Fail",
                "reinvocationPolicy": "IfNeeded",
                "namespaceSelector": {
                    "matchExpressions": [
                        {
                            "key": "kubernetes.io/metadata.name",
                            "operator": "NotIn",
                            "values": excluded,
                        },
                        {"key": LABEL_INJECT, "operator": "In", "values": [INJECT_ENABLED]},
                    ]
                },
                "objectSelector": not_dynvol_pods,
                **common,
            },
        ],
    }
    validating = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {c.LABEL_MANAGED_BY: c.LABEL_MANAGED_BY_VALUE}},
        "webhooks": [
            {
                "name": f"claims-classes.{c.GROUP}",
                "clientConfig": _client_config(ca_bundle, VALIDATE_PATH, url, service),
                "rules": [
                    {
                        "apiGroups": [c.GROUP],
                        "apiVersions": [c.VERSION],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": [c.PLURAL_CLAIM, c.PLURAL_CLASS],
                        "scope": "*",
                    }
                ],
                "failurePolicy": "Fail",
                **common,
            },
        ],
    }
    return mutating, validating
