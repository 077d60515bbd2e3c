"""``dynvol node``: the per-node process (a privileged DaemonSet).

With ``--csi-only`` it runs the CSI node plugin alone (Identity + Node services and
kubelet registration); that is what csi-sanity and the CSI integration tests start. The
full process adds the node reconciler (DynamicVolumeMounts and DMPs for the pods on this
node), wired to the plugin in :mod:`dynvol.wiring`; its ``--dmp-*`` flags become one
:class:`~dynvol_controllers.DmpTemplate`, checked before anything starts.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import PurePosixPath
from typing import Any

from dynvol.status import add_status_flags
from dynvol.wiring import (
    GUARD_API,
    NodeSettings,
    parse_publish_guard,
    serve_node,
    serve_plugin_only,
)
from dynvol_controllers import DmpTemplate, NodeReconcilerSettings
from dynvol_core.constants import (
    DEFAULT_DMP_PRIORITY_CLASS,
    DEFAULT_ROOT,
    DEFAULT_SYSTEM_NAMESPACE,
)
from dynvol_core.errors import DynvolError
from dynvol_csi import NodePluginConfig, parse_endpoint

log = logging.getLogger(__name__)

DEFAULT_KUBELET_DIR = "/var/lib/kubelet"
DEFAULT_REGISTRATION_DIR = "/var/lib/kubelet/plugins_registry"


def _absolute(text: str) -> PurePosixPath:
    path = PurePosixPath(text)
    if not path.is_absolute() or ".." in path.parts:
        raise argparse.ArgumentTypeError(f"{text!r} must be an absolute path without '..'")
    return path


def register(subparsers: Any) -> None:
    """Add the ``node`` subcommand."""
    parser = subparsers.add_parser(
        "node",
        help="run the node plugin (CSI node service, registration, node reconcilers)",
        description="Run dynvol's per-node process.",
    )
    parser.add_argument(
        "--csi-only",
        action="store_true",
        help="run only the CSI node plugin and kubelet registration, no reconcilers",
    )
    parser.add_argument(
        "--publish-guard",
        default=None,
        metavar="api|objects:DIR|off",
        help="with --csi-only (where it is required): how NodePublishVolume checks the pod "
        "and its class before binding: 'api' reads them from the apiserver (--kubeconfig), "
        "'objects:/DIR' from DIR/pods/NS/NAME.json and DIR/storageproviderclasses/NAME.json "
        "(csi-sanity), 'off' checks nothing (tests, benchmarks). The full node process "
        "always uses 'api'.",
    )
    parser.add_argument(
        "--endpoint",
        required=True,
        help="CSI socket, unix:///ABSOLUTE/PATH (e.g. unix:///csi/csi.sock)",
    )
    parser.add_argument("--node-id", required=True, help="this node's name (spec.nodeName)")
    parser.add_argument(
        "--root",
        type=_absolute,
        default=PurePosixPath(DEFAULT_ROOT),
        help=f"node root holding xvols/ and state/ (default {DEFAULT_ROOT})",
    )
    parser.add_argument(
        "--kubelet-dir",
        type=_absolute,
        default=PurePosixPath(DEFAULT_KUBELET_DIR),
        help=f"kubelet's root directory (default {DEFAULT_KUBELET_DIR})",
    )
    parser.add_argument(
        "--registration-dir",
        default=DEFAULT_REGISTRATION_DIR,
        help="kubelet's plugin registry directory, where the registration socket is "
        f"created (default {DEFAULT_REGISTRATION_DIR}; an empty string disables "
        "registration)",
    )
    full = parser.add_argument_group("node reconciler (without --csi-only)")
    full.add_argument(
        "--kubeconfig",
        help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config or the in-cluster "
        "service account)",
    )
    full.add_argument(
        "--system-namespace",
        default=DEFAULT_SYSTEM_NAMESPACE,
        help=f"where DMPs and credential copies live (default {DEFAULT_SYSTEM_NAMESPACE})",
    )
    full.add_argument(
        "--dmp-image",
        default=None,
        help="the DMP image (default: $DYNVOL_IMAGE, else the image of this pod's own "
        "container, read through $POD_NAME and $POD_NAMESPACE)",
    )
    full.add_argument(
        "--dmp-image-pull-policy",
        default="IfNotPresent",
        choices=["Always", "IfNotPresent", "Never"],
    )
    full.add_argument(
        "--dmp-priority-class",
        default=DEFAULT_DMP_PRIORITY_CLASS,
        metavar="NAME",
        help="the PriorityClass of every DMP; it must exist (default "
        f"{DEFAULT_DMP_PRIORITY_CLASS}, shipped in the manifests: high, never preempts)",
    )
    full.add_argument(
        "--dmp-image-pull-secret",
        action="append",
        default=[],
        metavar="NAME",
        help="a Secret in the system namespace that kubelet pulls the DMP image with (repeatable)",
    )
    full.add_argument(
        "--dmp-host-network",
        action="store_true",
        help="run DMPs on the host network (clusters without a service network)",
    )
    full.add_argument(
        "--dmp-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for every DMP (repeatable)",
    )
    full.add_argument(
        "--dmp-crash-replacements",
        type=int,
        default=3,
        metavar="N",
        help="how many times in 10 minutes a DMP in CrashLoopBackOff is replaced by a new pod, "
        "which starts at once, before kubelet's back-off is left to restart it (default 3; "
        "0: never)",
    )
    full.add_argument(
        "--shared-idle-grace",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long an idle shared DMP is kept before it is deleted (default 60)",
    )
    full.add_argument(
        "--mounts-relist",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how often the node lists its DynamicVolumeMounts, which it does not watch: "
        "how soon a mount deleted by hand is made again (default 300)",
    )
    full.add_argument(
        "--block-plugin",
        action="append",
        default=[],
        metavar="NAME",
        help="do not load this provider plugin (repeatable)",
    )
    add_status_flags(parser)
    parser.set_defaults(func=run)


def _env_pairs(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"--dmp-env {item!r} must be NAME=VALUE")
        pairs[name] = value
    return pairs


def run(args: argparse.Namespace) -> int:
    """Run the node process; returns the exit status."""
    try:
        registration_dir = _absolute(args.registration_dir) if args.registration_dir else None
        config = NodePluginConfig(
            endpoint=parse_endpoint(args.endpoint),
            node_id=args.node_id,
            root=args.root,
            kubelet_dir=args.kubelet_dir,
            registration_dir=registration_dir,
        )
    except (DynvolError, argparse.ArgumentTypeError) as exc:
        print(f"dynvol node: {exc}", file=sys.stderr)
        return 2
    if args.csi_only:
        if args.publish_guard is None:
            print(
                "dynvol node: --csi-only needs --publish-guard (api, objects:DIR or off)",
                file=sys.stderr,
            )
            return 2
        try:
            publish_guard = parse_publish_guard(args.publish_guard)
        except ValueError as exc:
            print(f"dynvol node: {exc}", file=sys.stderr)
            return 2
        runner = serve_plugin_only(
            config,
            publish_guard=publish_guard,
            kubeconfig=args.kubeconfig,
            metrics_address=args.metrics_address,
        )
    else:
        if args.publish_guard not in (None, GUARD_API):
            print(
                "dynvol node: the node process always checks pods through the apiserver; "
                f"--publish-guard {args.publish_guard!r} is only for --csi-only",
                file=sys.stderr,
            )
            return 2
        try:
            dmp_env = _env_pairs(args.dmp_env)
        except argparse.ArgumentTypeError as exc:
            print(f"dynvol node: {exc}", file=sys.stderr)
            return 2
        image = args.dmp_image or os.environ.get("DYNVOL_IMAGE") or ""
        if not image and not (os.environ.get("POD_NAME") and os.environ.get("POD_NAMESPACE")):
            print(
                "dynvol node: --dmp-image (or $DYNVOL_IMAGE) is required outside a pod; in a "
                "pod ($POD_NAME and $POD_NAMESPACE set) DMPs run the node plugin's own image",
                file=sys.stderr,
            )
            return 2
        try:
            reconciler = NodeReconcilerSettings(
                system_namespace=args.system_namespace,
                dmp=DmpTemplate(
                    image=image,
                    priority_class=args.dmp_priority_class,
                    image_pull_policy=args.dmp_image_pull_policy,
                    image_pull_secrets=tuple(args.dmp_image_pull_secret),
                    host_network=args.dmp_host_network,
                    env=dmp_env,
                    crash_replacements=args.dmp_crash_replacements,
                ),
                shared_idle_grace=args.shared_idle_grace,
                mounts_relist=args.mounts_relist,
            )
        except ValueError as exc:
            print(f"dynvol node: {exc}", file=sys.stderr)
            return 2
        settings = NodeSettings(
            kubeconfig=args.kubeconfig,
            reconciler=reconciler,
            blocked_plugins=tuple(args.block_plugin),
        )
        runner = serve_node(config, settings, metrics_address=args.metrics_address)
    try:
        return asyncio.run(runner)
    except (DynvolError, OSError) as exc:
        log.error("dynvol node: %s", exc)
        return 1
