"""``dynvol dmp``: the Dynamic Mount Pod agent."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from dynvol.status import add_status_flags, status_server, until_started
from dynvol_dmp import Settings, run
from dynvol_kube import Metrics
from dynvol_providers import load_registry


def register(subparsers: Any) -> None:
    """Add the ``dmp`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "dmp",
        help="run the Dynamic Mount Pod agent",
        description="Mount the DynamicVolumeMounts assigned to this Dynamic Mount Pod under "
        "--xvols, supervise their mounters and report their status.",
    )
    parser.add_argument("--name", required=True, help="this mount pod's name")
    parser.add_argument("--namespace", required=True, help="this mount pod's namespace")
    parser.add_argument("--xvols", required=True, type=Path,
                        help="the directory (bound Bidirectional) to mount under")  # fmt: skip
    parser.add_argument("--secrets-dir", required=True, type=Path,
                        help="the class's credentials, one file per key")  # fmt: skip
    parser.add_argument("--kubeconfig", default=None,
                        help="kubeconfig file (default: in-cluster service account)")  # fmt: skip
    parser.add_argument("--work-dir", type=Path, default=Path("/run/dynvol/dmp"),
                        help="private per-mount files (password files, caches)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--health-interval", type=float, default=10.0,
                        help="seconds between mount health probes")  # fmt: skip
    parser.add_argument("--stop-timeout", type=float, default=25.0, metavar="SECONDS",
                        help="after SIGTERM, how long to keep serving pods that are "
                        "terminating too (default 25, within the DMP's 30 s grace)")  # fmt: skip
    parser.add_argument("--mounts-namespace", default=None, metavar="NAMESPACE",
                        help="watch the DynamicVolumeMounts of this namespace only (an "
                        "independent DMP's, whose pod's they all are; default: every "
                        "namespace)")  # fmt: skip
    parser.add_argument("--block-plugin", action="append", default=[], metavar="NAME",
                        help="do not load this provider plugin (repeatable)")  # fmt: skip
    add_status_flags(parser)
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    try:
        settings = Settings(
            name=args.name,
            namespace=args.namespace,
            xvols=args.xvols.absolute(),
            secrets_dir=args.secrets_dir,
            work_dir=args.work_dir.absolute(),
            workers=args.workers,
            health_interval=args.health_interval,
            stop_timeout=args.stop_timeout,
            mounts_namespace=args.mounts_namespace,
        )
    except ValueError as exc:
        print(f"dynvol dmp: {exc}", file=sys.stderr)
        return 2
    registry = load_registry(blocked=args.block_plugin)
    return asyncio.run(_serve(settings, args, registry))


async def _serve(settings: Settings, args: argparse.Namespace, registry: Any) -> int:
    """The agent, with its status server around it (up before it starts, down after)."""
    metrics = Metrics()
    started = until_started(metrics)
    async with status_server(args.metrics_address, metrics):
        return await run(
            settings, kubeconfig=args.kubeconfig, registry=registry, metrics=metrics,
            on_started=started,
        )  # fmt: skip
