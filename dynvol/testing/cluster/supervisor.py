"""The process that owns every process of a multi-node cluster until told to stop.

``up`` starts it in its own session (``python -m dynvol.testing.cluster _supervise``). It
is a child subreaper: the containerd shims daemonise, and without it they (and anything
whose parent dies) would be re-parented to PID 1, which does not reap on this machine. It
starts the control plane, then each node's containerd, kubelet and kube-proxy, each only
once the one before is ready, and records PIDs and the phase in the state file. On SIGTERM
it stops them in reverse order, removes what each containerd still runs, and kills what
is left of its descendants.

Neighbours: :mod:`dynvol.testing.cluster.configs` (the specs),
:mod:`dynvol.testing.cluster.cluster` (which starts and signals it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import attrs

from dynvol.testing.cluster.configs import Spec
from dynvol.testing.cluster.layout import Layout
from dynvol.testing.processes import Process

__all__ = ["Supervisor", "descendants", "remove_containers"]

_PR_SET_CHILD_SUBREAPER = 36


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(Path(entry, "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def descendants(pid: int) -> list[int]:
    kids, found, todo = _children_map(), [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def remove_containers(sock: Path) -> None:
    """Kill and delete every task and container of the containerd at ``sock``."""

    def ctr(*args: str) -> list[str]:
        proc = subprocess.run(
            ["ctr", "--address", str(sock), "-n", "k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return proc.stdout.split() if proc.returncode == 0 else []

    tasks = ctr("tasks", "ls", "-q")
    for cid in tasks:
        ctr("tasks", "kill", "-s", "SIGKILL", cid)
    for cid in tasks:
        ctr("tasks", "delete", "-f", cid)
    for cid in ctr("containers", "ls", "-q"):
        ctr("containers", "rm", cid)


#: What nsenter prints when it cannot join a namespace (the process never started).
_NSENTER_FAILED = "nsenter: reassociate to namespace"
_NSENTER_ATTEMPTS = 3


class _NsenterFailed(RuntimeError):
    pass


@attrs.define
class Supervisor:
    layout: Layout
    specs: list[Spec]
    state: dict[str, Any] = attrs.field(factory=dict)
    procs: dict[str, Process] = attrs.field(factory=dict)
    stopping: bool = False
    #: Set to the cluster's directory in every process's environment.
    env_name: str = "DYNVOL_MULTINODE"

    def log(self, msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} supervisor: {msg}", flush=True)

    def save(self, **changes: Any) -> None:
        self.state.update(changes)
        self.layout.write_state(self.state)

    def reap(self) -> None:
        """Reap orphans re-parented to us; our own children are reaped by their Popen."""
        ours = {p.pid: p for p in self.procs.values()}
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            pid = info.si_pid
            if pid in ours:
                proc = ours.pop(pid)
                proc.poll()
                if not self.stopping:
                    self.log(f"{proc.name} ({pid}) exited with {proc.returncode}")
                    self.state["procs"][proc.name]["exit"] = proc.returncode
                    self.layout.write_state(self.state)
            else:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)

    def start(self, spec: Spec) -> None:
        for attempt in range(1, _NSENTER_ATTEMPTS + 1):
            try:
                self._start(spec)
                return
            except _NsenterFailed as exc:
                if attempt == _NSENTER_ATTEMPTS:
                    raise RuntimeError(str(exc)) from None
                self.log(f"{exc}; starting it again ({attempt}/{_NSENTER_ATTEMPTS})")
                time.sleep(0.5)

    def _start(self, spec: Spec) -> None:
        env = {**os.environ, **dict(spec.env), self.env_name: str(self.layout.dir)}
        log = self.layout.logs / f"{spec.name.replace('/', '.')}.log"
        proc = Process.start(spec.argv, name=spec.name, env=env, log=log, cwd=Path("/"))
        self.procs[spec.name] = proc
        self.state.setdefault("procs", {})[spec.name] = {"pid": proc.pid, "started": time.time()}
        self.save(phase=f"starting {spec.name}")
        began = time.monotonic()
        while not spec.ready():
            self.reap()
            if proc.poll() is not None and not self.stopping:
                tail = proc.log_tail(40)
                if _NSENTER_FAILED in tail:
                    # nsenter could not join the node's namespace, and the process never
                    # ran: seen now and then on this shared machine just after the node's
                    # containerd joined the same namespace file. Another try is safe.
                    raise _NsenterFailed(f"{spec.name} could not enter its namespaces{tail}")
            if proc.poll() is not None or self.stopping:
                raise RuntimeError(
                    f"{spec.name} exited with {proc.returncode} before it was ready"
                    f"{proc.log_tail(40)}"
                )
            if time.monotonic() - began > spec.timeout:
                raise RuntimeError(
                    f"{spec.name} was not ready after {spec.timeout:.0f}s; see {log}"
                )
            time.sleep(0.2)
        took = round(time.monotonic() - began, 2)
        self.state["procs"][spec.name]["ready_after"] = took
        self.log(f"{spec.name} ({proc.pid}) ready in {took:.1f}s")

    def stop_all(self) -> None:
        self.stopping = True
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if name.endswith("/containerd") and proc.poll() is None:
                node = name.split("/", 1)[0]
                remove_containers(self.layout.node(node).containerd_sock)
            if proc.poll() is None:
                self.log(f"stopping {name} ({proc.pid})")
                proc.stop(timeout=20)
            self.reap()
        left = descendants(os.getpid())
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while descendants(os.getpid()) and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.1)
        self.reap()

    def serve(self) -> int:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

        def on_term(_sig: int, _frame: object) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        self.state = self.layout.read_state()
        self.save(supervisor=os.getpid(), phase="starting", error=None, procs={})
        try:
            for spec in self.specs:
                self.start(spec)
        except Exception as exc:  # every failure reaches ``up`` through the state file
            self.log(f"failed: {exc}")
            self.save(phase="failed", error=str(exc))
            self.stop_all()
            return 1
        self.save(phase="running")
        while not self.stopping:
            self.reap()
            time.sleep(0.5)
        self.log("stopping")
        self.stop_all()
        self.save(phase="stopped")
        return 0
