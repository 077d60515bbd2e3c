"""dynvol's controllers: the node reconciler, the cluster controller and the webhooks.

Built on :mod:`dynvol_kube` (client, informers, work queue, controllers, Events, manager,
leader election); this package holds only the reconcilers and the admission webhooks.
The public names are exported here; the modules behind them are internal.
"""

from .app import ControllerApp, register_webhooks
from .certificates import DevCerts, ensure_dev_certs
from .certkeeping import CertificateKeeper, CertificateSettings
from .cluster import ClusterController
from .nodes import NodeReconciler, SlotLookup
from .settings import DmpTemplate, NodeReconcilerSettings
from .slicing import ClaimSlicer, standalone_slicer
from .webhooks import WebhookServer, webhook_configurations

__all__ = [
    "CertificateKeeper",
    "CertificateSettings",
    "ClaimSlicer",
    "ClusterController",
    "ControllerApp",
    "DevCerts",
    "DmpTemplate",
    "NodeReconciler",
    "NodeReconcilerSettings",
    "SlotLookup",
    "WebhookServer",
    "ensure_dev_certs",
    "register_webhooks",
    "standalone_slicer",
    "webhook_configurations",
]
