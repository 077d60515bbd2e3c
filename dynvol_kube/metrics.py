"""The runtime's metrics, on one process's own registry (prometheus-client).

Every process makes one :class:`Metrics` and hands it to its :class:`~.client.Client`
(``metrics=``); the runtime's parts find it there, or take it explicitly
(:class:`~.processing.Controller`), and record what every service has in common: apiserver
requests (from the client), work queues and reconciles (from the controllers), informer
relists, Events and leader status. The services register their own families on the same
:attr:`Metrics.registry` (``dynvol_csi``, ``dynvol_dmp``), and :class:`~.health.StatusServer`
serves it. A registry per process, never the library's global one, so that several
components can run in one test process without mixing their figures.

Names start with ``dynvol_``; labels are bounded: controller and resource names, verbs,
status codes and CamelCase reasons, never a pod or object name. docs/metrics.md lists every
family (a unit test keeps the two in step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .health import Health

__all__ = ["DURATION_BUCKETS", "Metrics", "request_labels"]

#: Seconds; from a fast API call to a slow FUSE mount.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def request_labels(method: str, path: str) -> tuple[str, str]:
    """The (verb, resource) labels of a request to the apiserver at ``path``.

    Verbs are the apiserver's (get, list, watch, create, update, patch, delete); the
    resource is the plural, with its subresource (``pods/status``). Names and namespaces
    are left out, so the labels stay bounded.
    """
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    if parts[:1] == ["api"]:
        rest = parts[2:]
    elif parts[:1] == ["apis"]:
        rest = parts[3:]
    else:
        return (_verb(method, named=False), "other")
    if len(rest) >= 3 and rest[0] == "namespaces":
        rest = rest[2:]
    resource = rest[0] if rest else "other"
    named = len(rest) >= 2
    if len(rest) >= 3:
        resource = f"{resource}/{rest[2]}"
    return (_verb(method, named=named), resource)


def _verb(method: str, *, named: bool) -> str:
    if method == "WATCH":
        return "watch"
    if method == "GET":
        return "get" if named else "list"
    return _VERBS.get(method, method.lower())


@attrs.define(eq=False)
class Metrics:
    """One process's registry, the runtime's metric families, and its health checks."""

    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)
    health: Health = attrs.field(factory=Health)
    api_requests: Counter = attrs.field(init=False)
    api_duration: Histogram = attrs.field(init=False)
    queue_depth: Gauge = attrs.field(init=False)
    queue_adds: Counter = attrs.field(init=False)
    queue_retries: Counter = attrs.field(init=False)
    reconciles: Counter = attrs.field(init=False)
    reconcile_duration: Histogram = attrs.field(init=False)
    relists: Counter = attrs.field(init=False)
    informer_synced: Gauge = attrs.field(init=False)
    events: Counter = attrs.field(init=False)
    leader: Gauge = attrs.field(init=False)
    webhook_cert_expiry: Gauge = attrs.field(init=False)
    webhook_cert_renewals: Counter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.api_requests = Counter(
            "dynvol_apiserver_requests", "Requests to the kube-apiserver, by verb, resource "
            "and HTTP status code (\"error\" when no answer came).",
            ["verb", "resource", "code"], registry=r,
        )  # fmt: skip
        self.api_duration = Histogram(
            "dynvol_apiserver_request_duration_seconds",
            "How long requests to the kube-apiserver took (watches: until the first byte).",
            ["verb", "resource"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "dynvol_workqueue_depth", "Keys waiting in a controller's work queue.",
            ["controller"], registry=r,
        )  # fmt: skip
        self.queue_adds = Counter(
            "dynvol_workqueue_adds", "Keys added to a controller's work queue (not counting "
            "keys already queued).", ["controller"], registry=r,
        )  # fmt: skip
        self.queue_retries = Counter(
            "dynvol_workqueue_retries", "Keys queued again after a failed reconcile.",
            ["controller"], registry=r,
        )  # fmt: skip
        self.reconciles = Counter(
            "dynvol_reconciles", "Reconciles by controller and result (Done, RequeueAfter, "
            "Retry).", ["controller", "result"], registry=r,
        )  # fmt: skip
        self.reconcile_duration = Histogram(
            "dynvol_reconcile_duration_seconds", "How long reconciles took.",
            ["controller"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.relists = Counter(
            "dynvol_informer_relists", "Informer lists after the first (410 Gone, or repeated "
            "watch failures).", ["resource"], registry=r,
        )  # fmt: skip
        self.informer_synced = Gauge(
            "dynvol_informer_synced", "1 once an informer's first list is cached.",
            ["resource"], registry=r,
        )  # fmt: skip
        self.events = Counter(
            "dynvol_events", "Kubernetes Events written (new or aggregated), by type and "
            "reason.", ["type", "reason"], registry=r,
        )  # fmt: skip
        self.leader = Gauge(
            "dynvol_leader", "1 while this process holds the Lease, else 0.", ["lease"],
            registry=r,
        )  # fmt: skip
        self.webhook_cert_expiry = Gauge(
            "dynvol_webhook_certificate_expiry_timestamp_seconds", "When the webhook serving "
            "certificate this process serves expires (Unix time; 0 until one is served).",
            registry=r,
        )  # fmt: skip
        self.webhook_cert_renewals = Counter(
            "dynvol_webhook_certificate_renewals", "Webhook certificates this process wrote "
            "to the Secret (created or renewed), by certificate (ca, serving).",
            ["certificate"], registry=r,
        )  # fmt: skip

    def observe_request(self, method: str, path: str, code: int | None, seconds: float) -> None:
        """Count one apiserver request (``code`` None: no answer)."""
        verb, resource = request_labels(method, path)
        self.api_requests.labels(verb, resource, str(code) if code else "error").inc()
        self.api_duration.labels(verb, resource).observe(seconds)

    def track_depth(self, controller: str, depth: Callable[[], int]) -> Callable[[], None]:
        """Report ``depth()`` as the queue depth of ``controller`` at each scrape; returns
        the function that stops it."""
        self.queue_depth.labels(controller).set_function(lambda: float(depth()))

        def stop() -> None:
            with contextlib.suppress(KeyError):
                self.queue_depth.remove(controller)

        return stop
