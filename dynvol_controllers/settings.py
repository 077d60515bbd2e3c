"""The node reconciler's settings: one value instead of a long list of parameters.

:class:`DmpTemplate` is what every Dynamic Mount Pod of a node gets from the operator (the
``--dmp-*`` flags of ``dynvol node``); :class:`NodeReconcilerSettings` adds the reconciler's
own pacing. Both are frozen and checked when built, so a bad flag is refused at start-up
with the flag named, never when the first DMP is created.
Neighbours: :mod:`.nodes` (the reconciler), :mod:`.syncing` (renders DMPs from the template).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from dynvol_core import constants as c
from dynvol_core.errors import FieldError
from dynvol_core.validation import check_dns1123_label, check_dns1123_subdomain

__all__ = ["PULL_POLICIES", "DmpTemplate", "NodeReconcilerSettings"]

PULL_POLICIES = ("Always", "IfNotPresent", "Never")


def _names(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise TypeError(f"image pull secrets must be names, not {type(value).__name__}")


def _refuse(errors: list[FieldError]) -> None:
    if errors:
        raise ValueError("; ".join(str(e) for e in errors))


def _check_subdomain(flag: str) -> Any:
    def check(_: object, attribute: attrs.Attribute[Any], value: str) -> None:
        _refuse(check_dns1123_subdomain(value, flag))

    return check


def _check_pull_secrets(_: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for name in value:
        _refuse(check_dns1123_subdomain(name, "--dmp-image-pull-secret"))


def _check_pull_policy(_: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value not in PULL_POLICIES:
        raise ValueError(
            f"--dmp-image-pull-policy {value!r}: use one of {', '.join(PULL_POLICIES)}"
        )


def _check_grace(_: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"dmp delete grace {value}: must be 0 or more seconds")


def _check_replacements(_: object, __: object, value: int) -> None:
    if not 0 <= value <= 100:
        raise ValueError(f"--dmp-crash-replacements {value}: must be 0 to 100")


@attrs.frozen(kw_only=True)
class DmpTemplate:
    """What the operator sets for every DMP of a node (``dynvol node --dmp-*``)."""

    image: str = "dynvol:latest"
    service_account: str = attrs.field(
        default=c.DEFAULT_DMP_SERVICE_ACCOUNT, validator=_check_subdomain("--dmp-service-account")
    )
    #: A PriorityClass that must exist; dynvol ships ``dynvol-mount`` (never preempts).
    priority_class: str = attrs.field(
        default=c.DEFAULT_DMP_PRIORITY_CLASS, validator=_check_subdomain("--dmp-priority-class")
    )
    image_pull_policy: str = attrs.field(default="IfNotPresent", validator=_check_pull_policy)
    #: Secrets (in the system namespace) kubelet pulls the DMP image with.
    image_pull_secrets: tuple[str, ...] = attrs.field(
        default=(), converter=_names, validator=_check_pull_secrets
    )
    #: For clusters whose pods reach the apiserver only on the host network.
    host_network: bool = False
    env: Mapping[str, str] = attrs.field(factory=dict)
    #: gracePeriodSeconds when deleting DMPs (None: the pod's own, so it can unmount).
    delete_grace: int | None = attrs.field(default=None, validator=_check_grace)
    #: How many times within ``crash_window`` seconds a DMP in CrashLoopBackOff is replaced
    #: by a new pod (which starts at once) before kubelet's back-off is left to run.
    crash_replacements: int = attrs.field(default=3, validator=_check_replacements)
    crash_window: float = 600.0


@attrs.frozen(kw_only=True)
class NodeReconcilerSettings:
    """Everything the node reconciler is configured with, besides its collaborators."""

    system_namespace: str = attrs.field(
        default=c.DEFAULT_SYSTEM_NAMESPACE, validator=lambda _, __, v: _check_namespace(v)
    )
    dmp: DmpTemplate = attrs.field(factory=DmpTemplate)
    #: Seconds a shared DMP may serve nothing before it is deleted.
    shared_idle_grace: float = 60.0
    #: Requests in flight at once per pass; small, because every node runs one and
    #: together they share the apiserver (whose default mutating in-flight limit is 200).
    concurrency: int = 4
    #: Seconds between full resyncs of the pod informer (None: never).
    resync: float | None = 600.0
    #: Seconds between lists of the node's DynamicVolumeMounts, which the node does not
    #: watch (:mod:`.observing`): how soon a mount deleted by hand is made again. Each list
    #: costs the apiserver a pass over every mount it caches (about 30 ms of its CPU per
    #: list at 20,000 mounts, docs/benchmarks.md): 1,000 nodes every 300 s, 0.1 core.
    mounts_relist: float = attrs.field(default=300.0, validator=lambda _, __, v: _check_relist(v))
    #: Seconds before looking again at pods whose volume is not published yet.
    unpublished_recheck: float = 5.0
    #: Seconds to gather events before a pass, so a burst costs one pass, not hundreds;
    #: the first event after as long a quiet spell is acted on at once.
    coalesce: float = 0.05
    #: Seconds of the first wait after a pass failed because the apiserver was
    #: overloaded (timeouts, 429, 5xx); doubled per such failure in a row, jittered.
    overload_backoff: float = 1.0
    #: Seconds the informers may take to list at start.
    sync_timeout: float = 120.0

    @classmethod
    def of(cls, **flat: Any) -> NodeReconcilerSettings:
        """Settings from flat keyword names: ``dmp_<field>`` for :class:`DmpTemplate`
        fields (``dmp_delete_grace=0``), the others as they are (``shared_idle_grace=1``).

        :raises TypeError: for a name that is neither.
        """
        dmp_fields = {a.name for a in attrs.fields(DmpTemplate)}
        own = {a.name for a in attrs.fields(cls)} - {"dmp"}
        dmp: dict[str, Any] = {}
        rest: dict[str, Any] = {}
        for name, value in flat.items():
            if name.startswith("dmp_") and name[4:] in dmp_fields:
                dmp[name[4:]] = value
            elif name in own:
                rest[name] = value
            else:
                raise TypeError(f"unknown node reconciler setting {name!r}")
        return cls(dmp=DmpTemplate(**dmp), **rest)


def _check_relist(value: float) -> None:
    if not value > 0:
        raise ValueError(f"--mounts-relist: must be a positive number of seconds, not {value!r}")


def _check_namespace(value: str) -> None:
    _refuse(check_dns1123_label(value, "--system-namespace"))
