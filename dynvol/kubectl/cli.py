"""The command line of ``kubectl dynvol`` (console script ``kubectl-dynvol``).

Options follow kubectl: ``--kubeconfig``, ``--context``, ``-n/--namespace``,
``-A/--all-namespaces`` and ``-o/--output table|json|yaml``, before or after the
subcommand. Exit status: 0 when the command worked (``doctor``: and found no error), 1 when
``doctor`` found an error or a DMP that ``upgrade-dmps`` moved did not come back, 2 for a
usage or connection problem, which is printed on stderr as ``error: ...`` like kubectl
does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import yaml

from dynvol_core import constants as c
from dynvol_kube import APIError, Client
from dynvol_kube import KubeconfigError as KubeconfigUnusable

from . import doctor, pods, status, upgrade
from .kubeconfig import KubeconfigError, resolve

__all__ = ["build_parser", "main"]

_USER_AGENT = "kubectl-dynvol"


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # On the top parser the defaults apply; on the subcommands SUPPRESS keeps an option
    # given before the subcommand from being reset by the subcommand's own default.
    default: Any = None if top else argparse.SUPPRESS
    parser.add_argument("--kubeconfig", default=default, help="the kubeconfig file")
    parser.add_argument("--context", default=default, help="the kubeconfig context")
    parser.add_argument("-n", "--namespace", default=default, help="the namespace")
    parser.add_argument(
        "-A", "--all-namespaces", action="store_true",
        default=False if top else argparse.SUPPRESS, help="every namespace (status)",
    )  # fmt: skip
    parser.add_argument(
        "-o", "--output", choices=("table", "json", "yaml"),
        default="table" if top else argparse.SUPPRESS, help="output format",
    )  # fmt: skip
    parser.add_argument(
        "--system-namespace", default=c.DEFAULT_SYSTEM_NAMESPACE if top else argparse.SUPPRESS,
        help=f"where dynvol runs (default {c.DEFAULT_SYSTEM_NAMESPACE})",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kubectl dynvol``."""
    parser = argparse.ArgumentParser(
        prog="kubectl dynvol",
        description="What dynvol mounted where, and whether dynvol is healthy.",
    )
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _common(
        sub.add_parser("status", help="claims, and per node and pod their mount phase"), top=False
    )
    pod = sub.add_parser("pod", help="what is mounted where in one pod, its health and DMP")
    pod.add_argument("name", metavar="NAME", help="the pod")
    _common(pod, top=False)
    _common(sub.add_parser("doctor", help="check the installation on this cluster"), top=False)
    move = sub.add_parser(
        "upgrade-dmps",
        help="move mounts onto the node plugin's current image, one DMP at a time",
        description=(upgrade.__doc__ or "").split("\n\n")[1].replace("\n", " "),
    )
    move.add_argument("--node", help="only the DMPs of this node")
    move.add_argument("--dry-run", action="store_true", help="list the DMPs; move nothing")
    move.add_argument(
        "--timeout", type=float, default=120.0, metavar="SECONDS",
        help="how long each DMP may take to be back with its mounts (default %(default)s)",
    )  # fmt: skip
    _common(move, top=False)
    return parser


def _print(report: dict[str, Any], output: str, table: str) -> None:
    if output == "json":
        sys.stdout.write(json.dumps(report, indent=2, sort_keys=False) + "\n")
    elif output == "yaml":
        sys.stdout.write(yaml.safe_dump(report, sort_keys=False))
    else:
        sys.stdout.write(table)


async def _run(args: argparse.Namespace) -> int:
    target = resolve(args.kubeconfig, args.context, args.namespace)
    client = await Client.from_kubeconfig(
        target.kubeconfig, context=target.context, user_agent=_USER_AGENT, max_connections=4
    )
    async with client:
        if args.command == "status":
            namespace = None if args.all_namespaces else target.namespace
            report = await status.gather(client, namespace)
            table = status.table(report, all_namespaces=args.all_namespaces)
            if not report["claims"] and args.output == "table":
                where = "any namespace" if namespace is None else f"{namespace} namespace"
                table = f"No DynamicVolumeClaims found in {where}.\n"
            _print(report, args.output, table)
            return 0
        if args.command == "pod":
            report = await pods.gather(client, target.namespace, args.name, args.system_namespace)
            _print(report, args.output, pods.table(report))
            return 0
        if args.command == "upgrade-dmps":
            report = await upgrade.run(
                client, args.system_namespace, node=args.node, dry_run=args.dry_run,
                wait_s=args.timeout,
            )  # fmt: skip
            _print(report, args.output, upgrade.table(report))
            return 0
        report = await doctor.gather(client, args.system_namespace)
        _print(report, args.output, doctor.table(report))
        return 0 if report["healthy"] else 1


def main(argv: list[str] | None = None) -> int:
    """Run ``kubectl dynvol``; returns the exit status."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.all_namespaces and args.command != "status":
        print(f"error: -A/--all-namespaces applies to status, not {args.command}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args))
    except (KubeconfigError, KubeconfigUnusable, pods.PodNotFound) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except upgrade.UpgradeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except APIError as exc:
        print(f"error: the apiserver refused or could not be reached: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the kubeconfig loader's own errors (bad file, no context)
        if type(exc).__module__.startswith("kubernetes_asyncio"):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
