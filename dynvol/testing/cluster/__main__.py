"""``python -m dynvol.testing.cluster up|down|status`` (``hack/local-cluster --nodes N``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from dynvol.testing.cluster.addressing import plan_nodes
from dynvol.testing.cluster.cluster import DEFAULT_APISERVER_PORT, ClusterError, MultiNodeCluster
from dynvol.testing.cluster.configs import control_plane_specs, node_specs
from dynvol.testing.cluster.layout import Layout, default_dir
from dynvol.testing.cluster.supervisor import Supervisor


def say(msg: str) -> None:
    print(f"local-cluster: {msg}", flush=True)


def _supervise(directory: Path) -> int:
    layout = Layout(directory)
    state = layout.read_state()
    bin_dir = Path(state["bin_dir"])
    specs = control_plane_specs(layout, state["ports"], bin_dir)
    for plan in plan_nodes(int(state["nodes"])):
        specs += node_specs(layout, plan, bin_dir)
    return Supervisor(layout, specs).serve()


def _print_status(report: dict[str, object]) -> None:
    print(f"dir:        {report['dir']}")
    print(f"phase:      {report['phase']}")
    print(f"supervisor: {report['supervisor']}")
    procs = report["processes"]
    assert isinstance(procs, dict)
    for name, p in procs.items():
        print(f"  {name:28} {p['pid']!s:>8} {'running' if p['running'] else 'STOPPED'}")
    print(f"network:    {', '.join(report['network']) or 'none'}")  # type: ignore[arg-type]
    nodes = report.get("nodes")
    if isinstance(nodes, list):
        print(f"kubeconfig: {report['kubeconfig']}")
        for node in nodes:
            ready = "Ready" if node["ready"] else "NotReady"
            print(f"  node {node['name']:10} {node['address'] or '-':14} {ready}")
    dns = report.get("dns")
    if isinstance(dns, dict):
        state = "ready" if dns["ready"] else "NOT READY"
        where = ", ".join(
            f"{r['name']} on {r['node'] or '-'} {'ready' if r['ready'] else 'not ready'}"
            for r in dns["replicas"]
        )
        print(f"dns:        kube-dns {dns['address']} {state}, {dns['endpoints']} endpoint(s)")
        print(f"  {where or 'no CoreDNS pod'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hack/local-cluster --nodes N", description="A local cluster of N real nodes."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("up", "down", "status", "_supervise"):
        p = sub.add_parser(name)
        p.add_argument("--dir", type=Path, default=default_dir(), help="state directory")
        p.add_argument("--nodes", type=int, default=3, help="how many nodes (up only)")
        if name == "up":
            p.add_argument("--apiserver-port", type=int, default=DEFAULT_APISERVER_PORT)
            p.add_argument("--images", default="pause,busybox,dynvol")
        if name == "down":
            p.add_argument("--purge", action="store_true")
            p.add_argument("--grace", type=int, default=10)
        if name == "status":
            p.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "_supervise":
        return _supervise(args.dir.resolve())
    try:
        if args.cmd == "up":
            images = tuple(["pause", *(i for i in args.images.split(",") if i and i != "pause")])
            cluster = MultiNodeCluster(
                dir=args.dir, nodes=args.nodes, apiserver_port=args.apiserver_port, progress=say
            )
            cluster.up(images=images)
            say(f"export KUBECONFIG={cluster.kubeconfig}")
            return 0
        nodes = int(Layout(args.dir.resolve()).read_state().get("nodes", args.nodes))
        cluster = MultiNodeCluster(dir=args.dir, nodes=nodes, progress=say)
        if args.cmd == "down":
            problems = cluster.down(grace=args.grace, purge=args.purge)
            for problem in problems:
                say(f"PROBLEM: {problem}")
            return 1 if problems else 0
        report = cluster.status()
        if args.json:
            print(json.dumps(report, indent=1))
        else:
            _print_status(report)
        dns_ready = report.get("dns", {}).get("ready", True) if report["running"] else True
        return 0 if report["running"] and dns_ready else 3
    except (ClusterError, ValueError) as exc:
        say(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
