"""A local Kubernetes cluster of several real nodes on one machine.

``hack/local-cluster up --nodes N`` and the multi-node e2e tests use
:class:`MultiNodeCluster`. See docs/local-cluster.md ("Several nodes").
"""

from dynvol.testing.cluster.addressing import NodePlan, plan_nodes
from dynvol.testing.cluster.cluster import ClusterError, MultiNodeCluster
from dynvol.testing.cluster.pki import CertificateAuthority

__all__ = ["CertificateAuthority", "ClusterError", "MultiNodeCluster", "NodePlan", "plan_nodes"]
