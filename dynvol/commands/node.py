"""``dynvol node``: the per-node process (a privileged DaemonSet).

With ``--csi-only`` it runs the CSI node plugin alone (Identity + Node services and
kubelet registration); that is what csi-sanity and the CSI integration tests start. The
full process adds the node-local reconcilers, which are not wired yet.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import PurePosixPath
from typing import Any

from dynvol_core.constants import DEFAULT_ROOT
from dynvol_core.errors import DynvolError
from dynvol_csi import NodePluginConfig, parse_endpoint, serve

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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the node process; returns the exit status."""
    if not args.csi_only:
        print(
            "dynvol node: the node reconcilers are not wired yet; run with --csi-only",
            file=sys.stderr,
        )
        return 2
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
    try:
        return asyncio.run(serve(config))
    except (DynvolError, OSError) as exc:
        log.error("dynvol node: %s", exc)
        return 1
