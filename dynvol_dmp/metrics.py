"""The mount pod's metrics: mounts by phase, mount and repair durations, failures by reason.

The agent calls the one-line hooks of :class:`DmpMetrics` where things happen (a mount
attempt ended, a mount went stale, a repair ended, a mount failed or was unmounted); the
mounts by phase are counted from the agent's informer cache at each scrape, so the figure is
what the API says, never a second bookkeeping that could drift. Labels are bounded: the
provider name, the phase, and CamelCase reasons, the same words as the ``Ready`` condition
and the Events (``MountFailed``, ``InvalidConfig``, ``UnsafeMountTarget``...). No pod or object
name appears.

Families live on the process's registry (:class:`dynvol_kube.Metrics`); without one
(tests that run an agent in-process for other reasons) they go to a private registry
nobody serves.

Neighbours: ``agent`` (the hooks), ``dynvol_kube.metrics`` (the generic families).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dynvol_core.models import MountPhase
from dynvol_kube import DURATION_BUCKETS, Metrics

__all__ = [
    "CAUSE_HEALTH_CHECK",
    "CAUSE_MOUNTER_EXITED",
    "CAUSE_MOUNT_GONE",
    "STAGES",
    "DmpMetrics",
]

#: Why a mount went stale (the ``cause`` label of ``dynvol_dmp_stale_mounts_total``).
CAUSE_MOUNTER_EXITED = "MounterExited"
CAUSE_MOUNT_GONE = "MountDisappeared"
CAUSE_HEALTH_CHECK = "HealthCheckFailed"

#: The stages of a new mount (the ``stage`` label of ``dynvol_dmp_mount_stage_seconds``).
STAGE_VERIFY = "Verify"
STAGE_RESOLVE = "Resolve"
STAGE_PREPARE = "Prepare"
STAGE_MOUNTER = "Mounter"
STAGE_ATTACH = "Attach"
STAGES = (STAGE_VERIFY, STAGE_RESOLVE, STAGE_PREPARE, STAGE_MOUNTER, STAGE_ATTACH)
#: Milliseconds matter here: a whole warm mount is meant to take about 0.1 s.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

_PHASES = tuple(str(p) for p in MountPhase)

Objects = Callable[[], Iterable[Mapping[str, Any]]]


class _ByPhase(Collector):
    """``dynvol_dmp_mounts{phase}``: the assigned DynamicVolumeMounts by status phase."""

    def __init__(self, objects: Objects) -> None:
        self._objects = objects

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = dict.fromkeys(_PHASES, 0)
        for obj in self._objects():
            phase = str((obj.get("status") or {}).get("phase") or MountPhase.PENDING)
            if phase in counts:
                counts[phase] += 1
        family = GaugeMetricFamily(
            "dynvol_dmp_mounts",
            "DynamicVolumeMounts assigned to this mount pod, by status phase.",
            labels=["phase"],
        )
        for phase, count in counts.items():
            family.add_metric([phase], count)
        yield family


@attrs.define(eq=False)
class DmpMetrics:
    """The mount pod's families and the agent's hooks."""

    registry: CollectorRegistry
    mount_duration: Histogram = attrs.field(init=False)
    repair_duration: Histogram = attrs.field(init=False)
    stage_duration: Histogram = attrs.field(init=False)
    repairs: Counter = attrs.field(init=False)
    stale: Counter = attrs.field(init=False)
    failures: Counter = attrs.field(init=False)
    unmounts: Counter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.mount_duration = Histogram(
            "dynvol_dmp_mount_duration_seconds", "How long mount attempts took, from the "
            "mounter's start to the mount checked at its target, by provider and result "
            "(Mounted or Failed).", ["provider", "result"], buckets=DURATION_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.stage_duration = Histogram(
            "dynvol_dmp_mount_stage_seconds", "Where a new mount's time goes, by stage: "
            "Verify (reading the pod, claim and class a mount names, once per generation), "
            "Resolve (class, config and credentials), Prepare (the target opened without "
            "following links, the staging directory), Mounter (the mounter's start until "
            "its mount is up) and Attach (the bind onto the target and the check of where "
            "it landed).", ["stage"], buckets=STAGE_BUCKETS, registry=r,
        )  # fmt: skip
        self.repair_duration = Histogram(
            "dynvol_dmp_repair_duration_seconds", "How long repairs of stale mounts took "
            "(lazy unmount, mount again), by provider and result (Remounted or Failed).",
            ["provider", "result"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.repairs = Counter(
            "dynvol_dmp_repairs", "Repairs of stale mounts, by provider and result "
            "(Remounted or Failed).", ["provider", "result"], registry=r,
        )  # fmt: skip
        self.stale = Counter(
            "dynvol_dmp_stale_mounts", "Mounts found stale, by cause (MounterExited, "
            "MountDisappeared, HealthCheckFailed).", ["cause"], registry=r,
        )  # fmt: skip
        self.failures = Counter(
            "dynvol_dmp_mount_failures", "Failed mounts, by the reason of their Ready "
            "condition (MountFailed, InvalidConfig, UnsafeTarget, ...).", ["reason"],
            registry=r,
        )  # fmt: skip
        self.unmounts = Counter(
            "dynvol_dmp_unmounts", "Mounts this mount pod unmounted, by provider.",
            ["provider"], registry=r,
        )  # fmt: skip

    @classmethod
    def of(cls, metrics: Metrics | None, objects: Objects) -> DmpMetrics:
        """The families on ``metrics``' registry (a private one without), with the mounts by
        phase counted from ``objects()`` (the agent's cached DynamicVolumeMounts)."""
        registry = metrics.registry if metrics is not None else CollectorRegistry()
        registry.register(_ByPhase(objects))
        return cls(registry)

    # -- hooks: one call each, where the agent learns the outcome --------------------------

    def mounted(self, provider: str, ok: bool, seconds: float) -> None:
        """A mount attempt ended."""
        self.mount_duration.labels(provider, "Mounted" if ok else "Failed").observe(seconds)

    def stage(self, stage: str, seconds: float) -> None:
        """A stage of a new mount took ``seconds`` (one of :data:`STAGES`)."""
        self.stage_duration.labels(stage).observe(seconds)

    def went_stale(self, cause: str) -> None:
        """A mount was found stale (one of the ``CAUSE_*`` words)."""
        self.stale.labels(cause).inc()

    def repaired(self, provider: str, ok: bool, seconds: float) -> None:
        """A repair ended."""
        result = "Remounted" if ok else "Failed"
        self.repairs.labels(provider, result).inc()
        self.repair_duration.labels(provider, result).observe(seconds)

    def failed(self, reason: str) -> None:
        """A mount was reported Failed with ``reason`` (its Ready condition's reason)."""
        self.failures.labels(reason).inc()

    def unmounted(self, provider: str) -> None:
        """A mount this agent owned was unmounted."""
        self.unmounts.labels(provider).inc()
