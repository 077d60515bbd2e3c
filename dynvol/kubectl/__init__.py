"""``kubectl dynvol``: a kubectl plugin that shows what dynvol mounted where, and checks it.

Installed as the console script ``kubectl-dynvol``, so kubectl finds it on ``PATH``:

- ``kubectl dynvol status``: each claim, and per node and pod the phase of its mount.
- ``kubectl dynvol pod NAME``: what is mounted where in one pod, its health and its DMP.
- ``kubectl dynvol doctor``: the CSIDriver, the node plugin on each node (ready, registered
  with kubelet), the controller, the webhooks (reachable, certificate expiry), versions.

Layout: :mod:`.cli` parses the command line like kubectl (``--kubeconfig``, ``--context``,
``-n``, ``-A``, ``-o``) and prints; :mod:`.status`, :mod:`.pods` and :mod:`.doctor` each read
what they need through :class:`dynvol_kube.Client` and build a plain report (a dict, which
``-o json|yaml`` prints as it is) and its table; :mod:`.tables` renders tables and ages like
kubectl does. docs/kubectl-plugin.md shows each command's output.
"""

from .cli import main

__all__ = ["main"]
