"""dynvol's CSI node plugin: Identity and Node services for ephemeral inline volumes.

It gives every opted-in pod a private slot under ``<root>/xvols`` (an rshared tree) and
binds it onto kubelet's target path, so that mounts a Dynamic Mount Pod later makes in the
slot propagate into the pod's containers. See docs/design.md §1.

Public surface: :class:`NodePlugin` (lifecycle), :class:`NodePluginConfig`, :func:`serve`
(run until signalled) and :func:`parse_endpoint`. Everything else is internal.
"""

from dynvol_csi.server import NodePlugin, NodePluginConfig, parse_endpoint, serve

__all__ = ["NodePlugin", "NodePluginConfig", "parse_endpoint", "serve"]
