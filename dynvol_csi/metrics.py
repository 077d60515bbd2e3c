"""The node plugin's metrics and health checks, recorded in one place.

Every CSI call is counted and timed by a grpclib ``RecvRequest`` listener that wraps the
handler (:func:`instrument`), so no handler records anything itself: the method label is
the RPC's name (``NodePublishVolume``), the code the gRPC status it ended with (the one
table of ``errors`` decides it). The published volumes are read from the volume manager at
each scrape. Families live on the process's registry (:class:`dynvol_kube.Metrics`).

:func:`probe_socket` is the plugin's liveness check: it dials the plugin's own CSI socket
and asks Identity.Probe, as kubelet's livenessprobe sidecar would, so a server that no
longer answers on its socket fails it.

Neighbours: ``server`` (installs both), ``volumes`` (the records counted).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import PurePosixPath

import attrs
from grpclib import Status
from grpclib.client import Channel
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError
from grpclib.server import Server, Stream
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dynvol_csi._proto.csi import v1 as csi
from dynvol_csi.volumes import VolumeManager
from dynvol_kube import DURATION_BUCKETS

__all__ = ["CsiMetrics", "instrument", "method_label", "probe_socket"]


def method_label(path: str) -> str:
    """``/csi.v1.Node/NodePublishVolume`` -> ``NodePublishVolume``."""
    return path.rsplit("/", 1)[-1] or "unknown"


@attrs.define(eq=False)
class CsiMetrics:
    """The CSI families of one process."""

    registry: CollectorRegistry
    operations: Counter = attrs.field(init=False)
    duration: Histogram = attrs.field(init=False)
    published: Gauge = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.operations = Counter(
            "dynvol_csi_operations", "CSI calls by method and the gRPC status code they "
            "ended with (OK, INVALID_ARGUMENT, FAILED_PRECONDITION, ...).",
            ["method", "code"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "dynvol_csi_operation_duration_seconds", "How long CSI calls took, by method.",
            ["method"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.published = Gauge(
            "dynvol_csi_published_volumes", "Volumes this node plugin has published "
            "(slots bound onto kubelet's target paths).", registry=r,
        )  # fmt: skip

    def count_published(self, volumes: VolumeManager) -> None:
        """Report ``volumes``' published records at each scrape."""

        def published() -> float:
            return float(sum(1 for r in volumes.records().values() if r.phase == "published"))

        self.published.set_function(published)

    def observe(self, method: str, code: Status, seconds: float) -> None:
        """Count one finished call."""
        self.operations.labels(method, code.name).inc()
        self.duration.labels(method).observe(seconds)


Handler = Callable[[Stream[object, object]], object]


def instrument(server: Server, metrics: CsiMetrics) -> None:
    """Count and time every call ``server`` handles."""

    async def on_request(event: RecvRequest) -> None:
        handler = event.method_func
        method = method_label(event.method_name)

        async def timed(stream: Stream[object, object]) -> None:
            started = time.monotonic()
            code = Status.OK
            try:
                await handler(stream)
            except GRPCError as exc:
                code = exc.status
                raise
            except asyncio.CancelledError:
                code = Status.CANCELLED
                raise
            except Exception:
                code = Status.UNKNOWN
                raise
            finally:
                metrics.observe(method, code, time.monotonic() - started)

        event.method_func = timed

    listen(server, RecvRequest, on_request)


#: Seconds the plugin's own Probe may take.
PROBE_TIMEOUT = 3.0


async def probe_socket(path: PurePosixPath, *, need_ready: bool) -> str | None:
    """A health check: None if the plugin answers Identity.Probe on ``path`` (with ready,
    when ``need_ready``: the readiness check; any answer will do for liveness)."""
    channel = Channel(path=str(path))
    try:
        response = await csi.IdentityStub(channel).probe(csi.ProbeRequest(), timeout=PROBE_TIMEOUT)
    except (GRPCError, OSError, TimeoutError) as exc:
        return f"CSI Probe on {path} failed: {exc or type(exc).__name__}"
    finally:
        channel.close()
    if need_ready and not response.ready:
        return f"CSI Probe on {path} answered not ready"
    return None
