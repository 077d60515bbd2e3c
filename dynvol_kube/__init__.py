"""dynvol's Kubernetes runtime, shared by every service (DESIGN.md §4).

The only importer of kubernetes_asyncio (in :mod:`.client`, and only for what its own
transport does not do: kubeconfig credential plugins, wrapping an ``ApiClient``). The
pipeline is split by stage: observe (:class:`Informer` lists and watches into a
:class:`Store`, relisting on 410 Gone) -> queue (:class:`WorkQueue`: deduplicated keys, one
worker per key) -> process (:class:`Controller` runs a reconcile that returns an
:data:`Outcome`) -> act (:class:`Client`, :class:`EventRecorder`). :class:`Manager` starts
and stops them in order, behind a :class:`LeaderElector` where asked;
:func:`run_until_signalled` is the process lifecycle. Beside the pipeline, :class:`Metrics`
(one registry per process, handed to the client) and :class:`Health` are served by a
:class:`StatusServer` (``/metrics``, ``/healthz``, ``/readyz``). These names are the public
surface; the modules behind them are internal.
"""

from .caching import Obj, Store, object_key, split_key
from .client import Client
from .electing import LeaderElector
from .errors import (
    APIConflict,
    APIError,
    APIForbidden,
    APIGone,
    APIInvalid,
    APINotFound,
    TemporaryError,
)
from .health import Health, Progress, StatusServer, parse_address
from .kubeconfig import KubeconfigError
from .lifecycle import Supervisor, run_until_signalled, stop_task
from .managing import Component, Manager
from .metrics import DURATION_BUCKETS, Metrics
from .outcomes import DONE, Done, Outcome, RequeueAfter
from .processing import Controller
from .queueing import ExponentialBackoff, RateLimiter, WorkQueue
from .recording import NORMAL, WARNING, EventRecorder
from .resources import Resource
from .watching import ChangePredicate, Event, Informer

__all__ = [
    "DONE",
    "DURATION_BUCKETS",
    "NORMAL",
    "WARNING",
    "APIConflict",
    "APIError",
    "APIForbidden",
    "APIGone",
    "APIInvalid",
    "APINotFound",
    "ChangePredicate",
    "Client",
    "Component",
    "Controller",
    "Done",
    "Event",
    "EventRecorder",
    "ExponentialBackoff",
    "Health",
    "Informer",
    "KubeconfigError",
    "LeaderElector",
    "Manager",
    "Metrics",
    "Obj",
    "Outcome",
    "Progress",
    "RateLimiter",
    "RequeueAfter",
    "Resource",
    "StatusServer",
    "Store",
    "Supervisor",
    "TemporaryError",
    "WorkQueue",
    "object_key",
    "parse_address",
    "run_until_signalled",
    "split_key",
    "stop_task",
]
