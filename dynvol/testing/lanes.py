"""``make test`` as lanes that run side by side: the builds, and the test tiers as soon as
what each needs is built.

Run serially, the README's test command spends most of a cold run waiting: every Go build
first, then the tiers one after another. Here:

* one **build queue** runs the Go builds one at a time (a Go build already uses every
  core), at low priority, ordered so the longest lane can start first;
* the **image queue** builds the container images beside it (mostly downloads and
  unpacking);
* lane ``api`` runs the unit and integration tiers on the newest release, then the
  integration tier on the oldest, then csi-sanity;
* lane ``nodes`` runs the e2e tier on the single-node cluster, then the three-node file,
  then Kubernetes' own storage suite (one local cluster at a time, so these stay in order).

The steps of lane ``api`` run in a mount and PID namespace of their own (``unshare
--mount --pid --fork --mount-proc``) under a small init (:func:`init_main`) that reaps
orphans: their mounts and processes stay out of sight of the nodes lane, and their own
leak check (tests/conftest.py, strict under ``CI=true``) sees exactly what they started.
The nodes lane runs in the machine's namespaces, as its clusters do on a real machine (they
make network and mount namespaces of their own, find and clean up a previous run by its
processes and mounts); its leak check leaves out the processes of the other lane's PID
namespace, which it can see (:func:`foreign_lane_namespaces`).

A step runs when the steps it needs succeeded; a failed step fails the run but does not
stop the steps that do not need it, so one run reports every tier. Every step's output goes
to the terminal with its name in front and to ``_out/test/<step>.log``, and the run ends
with a table of when each step started and how long it took.

    .venv/bin/python -m dynvol.testing.lanes [--serial] [--only STEP ...] [-- PYTEST_ARGS]
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

from dynvol.testing.processes import PORTS_ENV

#: Tests that make node mount namespaces of their own (``unshare --mount=FILE``). Inside the
#: api lane's namespace, binding a new namespace's file fails with EINVAL (this kernel,
#: 6.18) whenever the machine had any nsfs mount (a network namespace's file, as a
#: running cluster's pods have) when the lane's namespace was made, so they run in the
#: nodes lane, in the machine's namespaces, as the clusters that use that code do.
MACHINE_NAMESPACE_TESTS = ("tests/integration/test_cluster_isolation.py",)

#: The queues a step can run in: builds are serialised with each other, images with each
#: other, and each test lane runs its steps in order.
QUEUES = ("build", "image", "api", "nodes", "lint")

#: The ports each test lane's ``free_port()`` hands out (``$DYNVOL_TEST_PORTS``): halves of
#: its default range, so that a port one lane picked is never picked by the other before
#: its server binds it (the lanes share the machine's network namespace).
LANE_PORTS = {"api": "20000-24999", "nodes": "25000-29999"}


@attrs.frozen(kw_only=True)
class Step:
    """One command of the run."""

    name: str
    queue: str
    argv: tuple[str, ...]
    needs: tuple[str, ...] = ()
    #: Run in a mount and PID namespace of its own (the api lane's test steps).
    isolated: bool = False
    env: tuple[tuple[str, str], ...] = ()
    #: Builds run at low priority, so that tests beside them keep the cores they need.
    nice: int = 0
    #: Starts a local cluster: runs under the machine's cluster lock when there is one.
    cluster: bool = False


@attrs.define
class Outcome:
    status: str = "waiting"  # waiting, running, passed, failed, skipped
    returncode: int | None = None
    started: float | None = None
    ended: float | None = None
    reason: str = ""
    log: Path | None = None


def plan(python: str, versions: Sequence[str], pytest_args: Sequence[str] = ()) -> list[Step]:
    """The steps of ``make test``, in the order each queue runs them.

    ``versions`` are the supported Kubernetes releases, newest first (the integration tier
    runs on each; everything else on the newest).
    """
    if not versions:
        raise ValueError("at least one Kubernetes release is needed")
    newest, others = versions[0], list(versions[1:])
    build = ("bash", "hack/tools/build.sh")
    pytest = (python, "-m", "pytest", "-p", "no:cacheprovider")
    ignore = tuple(f"--ignore={path}" for path in MACHINE_NAMESPACE_TESTS)
    args = tuple(pytest_args)
    api_needs = ("build-control-plane", "build-minio", "build-api-tools", "image-dynvol")
    node_needs = ("build-control-plane", "build-node", "build-minio", "build-api-tools",
                  "image-dynvol")  # fmt: skip
    steps: list[Step] = [
        Step(name="lint", queue="lint", argv=("make", "--no-print-directory", "lint")),
        # The lanes start once the control plane, the node binaries, CoreDNS, MinIO, Helm
        # and csi-sanity are there: those first. The oldest release and the upstream suite
        # are needed later in their lanes, so they are built while the lanes run.
        Step(
            name="build-control-plane", queue="build", argv=(*build, "etcd", "kubernetes"), nice=10
        ),
        Step(
            name="build-node", queue="build", argv=(*build, "kubernetes-node", "coredns"), nice=10
        ),
        Step(name="build-minio", queue="build", argv=(*build, "minio"), nice=10),
        Step(name="build-api-tools", queue="build", argv=(*build, "helm", "csi-sanity"), nice=10),
    ]
    if others:
        steps.append(Step(name="build-oldest", queue="build",
                          argv=(*build, "kubernetes-oldest"), nice=10))  # fmt: skip
    steps += [
        Step(name="build-e2e-suite", queue="build", argv=(*build, "kubernetes-e2e"), nice=10),
        Step(
            name="image-dynvol",
            queue="image",
            argv=(python, "hack/images/build.py", "build", "dynvol"),
            nice=5,
        ),
        Step(
            name=f"integration-{newest}",
            queue="api",
            argv=(
                *pytest,
                "tests/unit",
                "tests/integration",
                "examples/dynvol-provider-example/tests",
                *ignore,
                *args,
            ),
            needs=api_needs,
            isolated=True,
            env=(("DYNVOL_KUBERNETES_VERSION", newest),),
        ),
    ]
    for version in others:
        steps.append(
            Step(
                name=f"integration-{version}",
                queue="api",
                argv=(*pytest, "tests/integration", *ignore, *args),
                needs=(*api_needs, "build-oldest"),
                isolated=True,
                env=(("DYNVOL_KUBERNETES_VERSION", version),),
            )
        )
    steps += [
        Step(
            name="csi-sanity",
            queue="api",
            argv=("bash", "hack/sanity.sh"),
            needs=("build-api-tools",),
            isolated=True,
        ),
    ]
    # The nodes lane: each file on a local cluster of its own, one cluster at a time.
    for name, paths, extra, env in (
        ("e2e-single-node", ("tests/e2e",), (), ()),
        (
            "e2e-three-nodes",
            ("tests/e2e/test_multinode.py", *MACHINE_NAMESPACE_TESTS),
            (),
            ("DYNVOL_MULTINODE_E2E",),
        ),
        (
            "e2e-upstream",
            ("tests/e2e/test_upstream.py",),
            ("build-e2e-suite",),
            ("DYNVOL_UPSTREAM_E2E",),
        ),
    ):
        steps.append(
            Step(
                name=name,
                queue="nodes",
                argv=(*pytest, *paths, *args),
                needs=(*node_needs, *extra),
                cluster=True,
                env=tuple((key, "1") for key in env),
            )
        )
    check(steps)
    return steps


def check(steps: Sequence[Step]) -> None:
    """Refuse a plan that could deadlock or lose a step: unknown queues or needs, duplicate
    names, or a step that needs one queued after it in its own queue."""
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate step names in {names}")
    position = {s.name: i for i, s in enumerate(steps)}
    for s in steps:
        if s.queue not in QUEUES:
            raise ValueError(f"step {s.name}: unknown queue {s.queue!r}")
        for need in s.needs:
            if need not in position:
                raise ValueError(f"step {s.name} needs {need!r}, which is not a step")
            other = steps[position[need]]
            if other.queue == s.queue and position[need] > position[s.name]:
                raise ValueError(f"step {s.name} needs {need}, queued after it in {s.queue}")


class Runner:
    """Runs a plan: one thread per queue, each running its steps in order once their needs
    have passed."""

    def __init__(
        self,
        steps: Sequence[Step],
        *,
        top: Path,
        logs: Path,
        serial: bool,
        cluster_lock: Path | None = None,
    ) -> None:
        self.steps = list(steps)
        self.cluster_lock = cluster_lock
        self.top = top
        self.logs = logs
        self.serial = serial
        self.outcomes = {s.name: Outcome() for s in self.steps}
        self._changed = threading.Condition()
        self._print = threading.RLock()  # stop() may print from a signal handler
        self.began = time.monotonic()
        #: The signal :meth:`stop` passed on, once it was called.
        self.stopped: int | None = None
        self._running: dict[str, tuple[Step, subprocess.Popen[str]]] = {}

    def run(self) -> bool:
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.serial:
            for step in self.steps:
                self._run_step(step)
        else:
            threads = [
                threading.Thread(target=self._queue, args=(q,), name=q, daemon=True)
                for q in QUEUES
                if any(s.queue == q for s in self.steps)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        self._summary()
        return all(o.status == "passed" for o in self.outcomes.values())

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop every step under way and start no other.

        A test step (isolated, or one that starts a cluster) gets SIGINT at its command,
        past the ``flock``, ``nice`` and ``unshare`` around it, which would not pass a
        signal on (and ``unshare --kill-child`` kills the init outright when it dies): at
        an isolated step's namespace init, which hands it to pytest, or at pytest itself.
        pytest takes SIGINT as a KeyboardInterrupt and runs the fixtures' finalisers
        (clusters stopped, mounts undone), where SIGTERM would kill it on the spot. Any
        other step (a build) gets ``signum`` in its whole process group (its own session).
        """
        with self._changed:
            self.stopped = signum
            running = list(self._running.items())
            self._changed.notify_all()
        for name, (step, proc) in running:
            graceful = step.isolated or step.cluster
            target = _command_below(proc.pid) if graceful else None
            try:
                if target is not None:
                    os.kill(target, signal.SIGINT)
                else:
                    os.killpg(proc.pid, signal.SIGINT if graceful else signum)
            except ProcessLookupError:
                continue
            self._say(name, f"stopping: signal {signum} passed on")

    def _queue(self, queue: str) -> None:
        for step in self.steps:
            if step.queue == queue:
                self._run_step(step)

    def _wait_needs(self, step: Step) -> str | None:
        """Block until every need has finished; the name of one that did not pass, if any."""
        with self._changed:
            while True:
                states = {n: self.outcomes[n].status for n in step.needs}
                bad = [n for n, st in states.items() if st in ("failed", "skipped")]
                if bad:
                    return bad[0]
                if all(st == "passed" for st in states.values()) or self.stopped is not None:
                    return None
                self._changed.wait()

    def _set(self, name: str, **changes: object) -> None:
        with self._changed:
            for key, value in changes.items():
                setattr(self.outcomes[name], key, value)
            self._changed.notify_all()

    def _say(self, name: str, line: str) -> None:
        with self._print:
            sys.stdout.write(f"[{name}] {line}")
            if not line.endswith("\n"):
                sys.stdout.write("\n")
            sys.stdout.flush()

    def _run_step(self, step: Step) -> None:
        missing = self._wait_needs(step)
        if self.stopped is not None:
            self._set(step.name, status="skipped", reason=f"stopped by signal {self.stopped}")
            self._say(step.name, "not run: the run was stopped")
            return
        if missing is not None:
            self._set(step.name, status="skipped", reason=f"{missing} did not pass")
            self._say(step.name, f"not run: {missing} did not pass")
            return
        argv = list(step.argv)
        if step.isolated:
            argv = [
                "unshare", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child",
                sys.executable, "-m", INIT_MODULE, INIT_FLAG, "--", *argv,
            ]  # fmt: skip
        if step.cluster and self.cluster_lock is not None:
            # One local cluster at a time on a machine (the Makefile's CLUSTER_LOCK).
            argv = ["flock", str(self.cluster_lock), *argv]
        if step.nice:
            argv = ["nice", "-n", str(step.nice), *argv]
        env = dict(os.environ)
        if step.queue in LANE_PORTS:
            env[PORTS_ENV] = LANE_PORTS[step.queue]
        env.update(dict(step.env))
        log = self.logs / f"{step.name}.log"
        started = time.monotonic()
        self._set(step.name, status="running", started=started, log=log)
        shown = " ".join(f"{k}={v}" for k, v in step.env)
        self._say(step.name, f"$ {shown + ' ' if shown else ''}{shlex.join(step.argv)}")
        with log.open("w") as out:
            with self._changed:
                if self.stopped is not None:  # stopped while this step got ready
                    self._set(step.name, status="skipped", reason="stopped")
                    return
                proc = subprocess.Popen(
                    argv, cwd=self.top, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1,
                    start_new_session=True,
                )  # fmt: skip
                self._running[step.name] = (step, proc)
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                self._say(step.name, line)
            code = proc.wait()
            with self._changed:
                self._running.pop(step.name, None)
        ended = time.monotonic()
        status = "passed" if code == 0 else "failed"
        self._set(step.name, status=status, returncode=code, ended=ended)
        self._say(step.name, f"{status} (exit {code}) after {ended - started:.0f}s")

    def _summary(self) -> None:
        total = time.monotonic() - self.began
        lines = [f"{'step':<24}{'queue':<7}{'start s':>9}{'took s':>8}  result"]
        for step in self.steps:
            o = self.outcomes[step.name]
            start = f"{o.started - self.began:.0f}" if o.started is not None else "-"
            took = f"{o.ended - o.started:.0f}" if o.started and o.ended else "-"
            result = o.status if o.returncode in (None, 0) else f"{o.status} (exit {o.returncode})"
            if o.reason:
                result += f": {o.reason}"
            lines.append(f"{step.name:<24}{step.queue:<7}{start:>9}{took:>8}  {result}")
        lines.append(f"wall time {total:.0f}s; logs in {self.logs}")
        for step in self.steps:
            o = self.outcomes[step.name]
            if o.status == "failed" and o.log is not None:
                lines.extend(f"{step.name}: {line}" for line in failures(o.log))
        with self._print:
            print("\n".join(lines), flush=True)


def failures(log: Path, limit: int = 30) -> list[str]:
    """The lines of pytest's short summary (``FAILED``/``ERROR`` with the test's id and the
    first line of its error) in a step's log, and the session leak check's findings
    (``leak check failed:`` and the indented lines under it), at most ``limit``: the run's
    last lines then say which tests failed, or what was left behind, not only which step."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    found, in_leaks = [], False
    for line in text.splitlines():
        # The leak check's heading, then its findings: the indented lines right under it.
        finding = in_leaks and line.startswith("  ") and bool(line.strip())
        in_leaks = finding or line.startswith("leak check failed:")
        if in_leaks or line.startswith(("FAILED ", "ERROR ")):
            found.append(line.rstrip())
    if len(found) > limit:
        found = [*found[:limit], f"... and {len(found) - limit} more (see {log})"]
    return found


#: What the init of an isolated step runs as (its command line holds both words).
INIT_MODULE, INIT_FLAG = "dynvol.testing.lanes", "--init"


#: Commands that run another without passing signals on to it.
_WRAPPERS = frozenset({b"flock", b"nice", b"unshare"})


def _command_below(pid: int) -> int | None:
    """The process that runs a step's own command under ``pid``: the first one, from
    ``pid`` down, that is none of :data:`_WRAPPERS` (an isolated step's namespace init,
    :func:`init_main`, or the command itself); None if there is none yet."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields follow the last ")".
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    todo = [pid]
    while todo:
        here = todo.pop(0)
        try:
            with open(f"/proc/{here}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0] and os.path.basename(argv[0]) not in _WRAPPERS:
            return here
        todo.extend(children.get(here, ()))
    return None


def foreign_lane_namespaces(proc: Path = Path("/proc")) -> set[str]:
    """The PID namespaces (``pid:[inode]``) of isolated lane steps other than the caller's:
    each such step's init is PID 1 of one. A process in one of them belongs to that step."""
    own = os.readlink(proc / "self" / "ns" / "pid")
    found = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if INIT_MODULE.encode() not in argv or INIT_FLAG.encode() not in argv:
                continue
            ns = os.readlink(entry / "ns" / "pid")
        except OSError:
            continue
        if ns != own:
            found.add(ns)
    return found


def init_main(argv: Sequence[str]) -> int:
    """PID 1 of a step's PID namespace: run ``argv``, reap every orphan, return its status.

    Orphans (daemonised shims, killed mounters' children) are reparented to PID 1, and PID
    1 must wait for them or they stay zombies. When this returns, the kernel kills whatever
    is left in the namespace (the leak check has reported it by then).
    """
    if not argv:
        raise SystemExit("--init needs a command")
    started: list[subprocess.Popen[bytes]] = []
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if started:
            started[0].send_signal(signum)
        else:
            pending.append(signum)

    # Before the child starts, so that no signal finds this process without a handler.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    child = subprocess.Popen(list(argv))
    started.append(child)
    for signum in pending:
        child.send_signal(signum)
    status = 0
    while True:
        try:
            pid, wstatus = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == child.pid:
            status = os.waitstatus_to_exitcode(wstatus)
            child.returncode = status
            break
    # Reap what is already dead; the rest is killed with the namespace.
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    return status if status >= 0 else 128 - status


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--init"]:
        rest = args[1:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        return init_main(rest)
    if "--" in args:
        cut = args.index("--")
        args, pytest_args = args[:cut], args[cut + 1 :]
    else:
        pytest_args = []
    parser = argparse.ArgumentParser(
        prog="dynvol.testing.lanes", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--serial", action="store_true", help="one step at a time, in plan order")
    parser.add_argument("--only", action="append", default=[], metavar="STEP",
                        help="run these steps and what they need (repeatable)")  # fmt: skip
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    parser.add_argument("--logs", default="_out/test", help="directory for the step logs")
    parser.add_argument(
        "--cluster-lock", type=Path, metavar="FILE",
        help="run the steps that start a local cluster under flock(1) of FILE",
    )  # fmt: skip
    opts = parser.parse_args(args)
    top = Path.cwd()
    versions = subprocess.run(
        ["bash", "hack/tools/build.sh", "--versions"], check=True, capture_output=True, text=True
    ).stdout.split()
    python = str(Path(".venv/bin/python")) if Path(".venv/bin/python").exists() else sys.executable
    steps = plan(python, versions, pytest_args)
    if opts.only:
        steps = only(steps, opts.only)
    if opts.list:
        for s in steps:
            env = " ".join(f"{k}={v}" for k, v in s.env)
            needs = ",".join(s.needs) or "-"
            print(f"{s.name:<24}{s.queue:<7}needs {needs:<40} {env} {shlex.join(s.argv)}")
        return 0
    runner = Runner(
        steps, top=top, logs=top / opts.logs, serial=opts.serial, cluster_lock=opts.cluster_lock
    )
    # A stopped run stops its steps the way each can clean up after itself (Runner.stop),
    # then ends as they do.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: runner.stop(signum))
    ok = runner.run()
    if runner.stopped is not None:
        return 128 + runner.stopped
    return 0 if ok else 1


def only(steps: Sequence[Step], wanted: Sequence[str]) -> list[Step]:
    """The steps named and, transitively, the steps they need, in plan order."""
    by_name = {s.name: s for s in steps}
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        raise SystemExit(f"unknown step(s) {', '.join(unknown)}; see --list")
    keep: set[str] = set()
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo.extend(by_name[name].needs)
    return [s for s in steps if s.name in keep]


if __name__ == "__main__":
    sys.exit(main())
