"""``dynvol dev``: tools for developing dynvol and controllers that build on it.

``dynvol dev control-plane up --dir DIR`` starts a real etcd and kube-apiserver on
127.0.0.1 with dynvol's CRDs applied and writes ``DIR/kubeconfig``; ``down`` stops them and
removes what they left. ``up`` returns once the API answers: the servers keep running
under a small supervisor process that stays their parent, so they are always reaped.
``--crds PATH`` (repeatable) applies a project's own CRDs after dynvol's.

``dynvol dev tools install [--dir DIR]`` builds the pinned etcd, kube-apiserver and kubectl
with Go into a cache keyed by version (:mod:`dynvol.testing.tools`), where the control plane
finds them outside a checkout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from dynvol.testing import tools
from dynvol.testing.controlplane import ControlPlane, ToolsMissing, wait_for_exit

_STATE = "supervisor.json"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = sub.add_parser("dev", help="development tools (a local control plane, its binaries)")
    dev_sub = dev.add_subparsers(dest="dev_command", metavar="COMMAND", required=True)
    tl = dev_sub.add_parser("tools", help="the control plane's binaries")
    tl_sub = tl.add_subparsers(dest="tools_command", metavar="ACTION", required=True)
    inst = tl_sub.add_parser(
        "install", help="build the pinned etcd, kube-apiserver and kubectl with Go"
    )
    inst.add_argument(
        "--dir",
        type=Path,
        help="the cache to build into (default $XDG_CACHE_HOME/dynvol/tools); "
        "the binaries land in DIR/<Kubernetes version>/bin",
    )
    inst.set_defaults(func=_tools_install)
    where = tl_sub.add_parser("path", help="print where the installed binaries are")
    where.add_argument("--dir", type=Path, help="the cache (as for install)")
    where.set_defaults(func=_tools_path)

    cp = dev_sub.add_parser("control-plane", help="a real etcd + kube-apiserver on loopback")
    cp_sub = cp.add_subparsers(dest="cp_command", metavar="ACTION", required=True)

    up = cp_sub.add_parser("up", help="start it and return when the API answers")
    up.add_argument("--dir", required=True, type=Path, help="where state, logs and kubeconfig go")
    up.add_argument("--bin-dir", type=Path, help="where etcd/kube-apiserver/kubectl are")
    up.add_argument("--no-crds", action="store_true", help="do not apply dynvol's CRDs")
    up.add_argument(
        "--crds",
        action="append",
        type=Path,
        default=[],
        metavar="PATH",
        help="also apply these CRDs (a file, a directory of YAML or a kustomization); repeatable",
    )
    up.add_argument("--timeout", type=float, default=120.0)
    up.set_defaults(func=_up)

    down = cp_sub.add_parser("down", help="stop it and remove its data")
    down.add_argument("--dir", required=True, type=Path)
    down.add_argument("--keep-data", action="store_true", help="keep DIR's contents")
    down.set_defaults(func=_down)

    status = cp_sub.add_parser("status", help="say whether it runs")
    status.add_argument("--dir", required=True, type=Path)
    status.set_defaults(func=_status)

    sup = cp_sub.add_parser("supervise", help=argparse.SUPPRESS)
    sup.add_argument("--dir", required=True, type=Path)
    sup.add_argument("--bin-dir", type=Path)
    sup.add_argument("--no-crds", action="store_true")
    sup.add_argument("--crds", action="append", type=Path, default=[])
    sup.set_defaults(func=_supervise)


def _read_state(directory: Path) -> dict[str, object] | None:
    try:
        data: dict[str, object] = json.loads((directory / _STATE).read_text())
        return data
    except (FileNotFoundError, ValueError):
        return None


def _up(args: argparse.Namespace) -> int:
    directory: Path = args.dir.resolve()
    for crd in args.crds:
        if not crd.exists():
            print(f"--crds: {crd} does not exist", file=sys.stderr)
            return 2
    state = _read_state(directory)
    if state and not wait_for_exit(int(str(state["pid"])), 0):
        print(f"a control plane already runs for {directory} (pid {state['pid']})", file=sys.stderr)
        return 1
    directory.mkdir(parents=True, exist_ok=True)
    for stale in ("ready", "failed"):
        (directory / stale).unlink(missing_ok=True)
    argv = [
        sys.executable,
        "-m",
        "dynvol",
        "dev",
        "control-plane",
        "supervise",
        "--dir",
        str(directory),
    ]
    if args.bin_dir:
        argv += ["--bin-dir", str(args.bin_dir.resolve())]
    if args.no_crds:
        argv.append("--no-crds")
    for crd in args.crds:
        argv += ["--crds", str(crd.resolve())]
    with open(directory / "supervisor.log", "ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if (directory / "ready").exists():
            info = json.loads((directory / "control-plane.json").read_text())
            print(f"control plane up: {info['server']}")
            print(
                f"  kube-apiserver {info['versions']['kube-apiserver']}, "
                f"etcd {info['versions']['etcd']}"
            )
            print(f"  export KUBECONFIG={directory / 'kubeconfig'}")
            return 0
        if (directory / "failed").exists() or proc.poll() is not None:
            print(
                f"control plane failed to start: "
                f"{(directory / 'failed').read_text() if (directory / 'failed').exists() else ''}"
                f"\nsee {directory / 'supervisor.log'} and {directory / 'logs'}",
                file=sys.stderr,
            )
            proc.wait(5)
            return 1
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)
    print(f"control plane did not come up within {args.timeout:.0f}s", file=sys.stderr)
    return 1


def _supervise(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    kwargs: dict[str, object] = {"dir": directory}
    if args.bin_dir:
        kwargs["bin_dir"] = args.bin_dir
    if args.no_crds:
        kwargs["crd_paths"] = ()
    if args.crds:
        kwargs["extra_crd_paths"] = tuple(args.crds)
    plane = ControlPlane(**kwargs)  # type: ignore[arg-type]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    (directory / _STATE).write_text(json.dumps({"pid": os.getpid()}))
    try:
        plane.start()
    except (ToolsMissing, RuntimeError, TimeoutError, OSError) as exc:
        (directory / "failed").write_text(str(exc))
        return 1
    (directory / "ready").write_text("")
    while not stop.wait(1.0):
        for proc in (plane.etcd, plane.apiserver):
            if proc is not None and proc.poll() is not None:
                print(f"{proc.name} exited with {proc.returncode}", flush=True)
                stop.set()
    plane.stop()
    (directory / "ready").unlink(missing_ok=True)
    return 0


def _down(args: argparse.Namespace) -> int:
    directory: Path = args.dir.resolve()
    state = _read_state(directory)
    if state is not None:
        pid = int(str(state["pid"]))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not wait_for_exit(pid, 60):
            print(f"supervisor {pid} did not stop; killing its process group", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            wait_for_exit(pid, 10)
    if not args.keep_data:
        for name in (
            "etcd",
            "pki",
            "logs",
            "kubeconfig",
            "control-plane.json",
            "ready",
            "failed",
            "supervisor.log",
            _STATE,
        ):
            path = directory / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            directory.rmdir()
    print(f"control plane down: {directory}")
    return 0


def _status(args: argparse.Namespace) -> int:
    state = _read_state(args.dir.resolve())
    if state is None or wait_for_exit(int(str(state["pid"])), 0):
        print("not running")
        return 3
    info = json.loads((args.dir / "control-plane.json").read_text())
    print(f"running: {info['server']} (supervisor pid {state['pid']})")
    return 0


def _tools_install(args: argparse.Namespace) -> int:
    try:
        result = tools.install(args.dir)
    except tools.ToolsBuildFailed as exc:
        print(f"tools: {exc}", file=sys.stderr)
        return 1
    if result.cached:
        print(f"tools: already built: {', '.join(result.cached)}")
    print(f"tools: etcd, kube-apiserver and kubectl in {result.bin_dir} ({result.seconds:.0f}s)")
    if args.dir is not None:
        # Outside the default cache the control plane needs to be told.
        print(f"  export DYNVOL_TOOLS_BIN={result.bin_dir}")
    return 0


def _tools_path(args: argparse.Namespace) -> int:
    print(tools.installed_bin_dir(args.dir))
    return 0
