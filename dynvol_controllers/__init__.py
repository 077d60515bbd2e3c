"""dynvol's controllers: the node reconciler, the cluster controller and the webhooks.

Built on a small controller toolkit over kubernetes_asyncio (imported only in
:mod:`dynvol_controllers.k8s.client`): informers (observe) -> work queue (queue) ->
controllers (process) -> client, Events (act), a manager, and Lease leader election.
The public names are exported here; the modules behind them are internal.
"""

from .app import ControllerApp, register_webhooks
from .certificates import DevCerts, ensure_dev_certs
from .cluster import ClusterController
from .electing import LeaderElector
from .errors import PermanentError, TemporaryError
from .k8s import APIConflict, APIError, APIGone, APINotFound, Client
from .managing import Manager
from .nodes import NodeReconciler, SlotLookup
from .outcomes import Done, Outcome, RequeueAfter, Retry, Terminal
from .processing import Controller
from .queueing import WorkQueue
from .recording import EventRecorder
from .watching import Informer
from .webhooks import WebhookServer, webhook_configurations

__all__ = [
    "APIConflict",
    "APIError",
    "APIGone",
    "APINotFound",
    "Client",
    "ClusterController",
    "Controller",
    "ControllerApp",
    "DevCerts",
    "Done",
    "EventRecorder",
    "Informer",
    "LeaderElector",
    "Manager",
    "NodeReconciler",
    "Outcome",
    "PermanentError",
    "RequeueAfter",
    "Retry",
    "SlotLookup",
    "TemporaryError",
    "Terminal",
    "WebhookServer",
    "WorkQueue",
    "ensure_dev_certs",
    "register_webhooks",
    "webhook_configurations",
]
