"""Suite-wide checks: nothing a test starts or mounts may outlive the session.

At session start we note the mount points and the stack processes already there; at the
end, any new mount, any new stack process and any :class:`dynvol.testing.Process` still
running fails the run, even when every test passed.

Under ``CI=true`` every new mount and stack process counts, except the processes of the other
lane of ``make test`` (dynvol.testing.lanes), which runs in a PID namespace of its own beside
this session: they are that lane's to check. On a developer machine, where other sessions
may run beside this one, only processes carrying this session's marker in their
environment (inherited by everything the suite starts, orphans included) and mounts below
this session's temporary directory count.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dynvol.testing import processes
from dynvol.testing.controlplane import (
    KUBERNETES_VERSION_ENV,
    kubernetes_bin_dir,
    requested_kubernetes_version,
)
from dynvol.testing.lanes import foreign_lane_namespaces
from dynvol_core.mountinfo import parse_mountinfo

_STACK = (
    "etcd",
    "kube-apiserver",
    "kubelet",
    "containerd",
    "minio",
    "s3fs",
    "rclone",
    "dynvol",
    "csi-sanity",
)


def _mounts() -> set[tuple[str, str]]:
    text = Path("/proc/self/mountinfo").read_text()
    return {(e.mount_point, e.fs_type) for e in parse_mountinfo(text)}


def _stack_processes() -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        state = stat.rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            continue
        argv = [a.decode(errors="replace") for a in cmdline if a]
        if not argv:
            continue
        names = {Path(argv[0]).name}
        # Python entry points show up as "python ... dynvol" or "-m dynvol".
        names.update(Path(a).name for a in argv[1:3])
        if names & set(_STACK):
            found[int(entry.name)] = " ".join(argv)[:160]
    return found


#: The Kubernetes binaries the header names besides kube-apiserver (which the dynvol pytest
#: plugin names), those of the release under test that are built: kubectl for every tier,
#: the node's for the e2e tier's local cluster.
_KUBE_HEADER = ("kubectl", "kube-controller-manager", "kube-scheduler", "kubelet")


def _kube_version(path: Path) -> str:
    args = ["version", "--client"] if path.name == "kubectl" else ["--version"]
    try:
        out = processes.run([str(path), *args], timeout=20)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"unusable: {exc}"
    # "Kubernetes v1.37.2" / "Client Version: v1.37.2\nKustomize Version: ..."
    first = out.strip().splitlines()[0] if out.strip() else "no version printed"
    return first.split()[-1]


def pytest_report_header(config: pytest.Config) -> list[str]:
    """The Kubernetes release this run is against, and where its binaries come from.

    The integration tier runs against ``DYNVOL_KUBERNETES_VERSION`` when it is set (``make
    test`` runs it once per supported release); the e2e tier's local cluster always runs
    the default release in ``.tools/bin``.
    """
    try:
        wanted = requested_kubernetes_version()
        kube_dir = kubernetes_bin_dir()
    except ValueError as exc:
        return [f"dynvol: {exc}"]
    which = f"{wanted} ({KUBERNETES_VERSION_ENV})" if wanted else "the release make tools built"
    lines = [f"dynvol: kubernetes: {which}, binaries from {kube_dir}"]
    for name in _KUBE_HEADER:
        path = kube_dir / name
        if os.access(path, os.X_OK):
            lines.append(f"dynvol: {name}: {_kube_version(path)}")
    return lines


_BEFORE: dict[str, object] = {}
_MARKER = "DYNVOL_TEST_SESSION"
_CI = os.environ.get("CI", "").lower() == "true"


def _ours(pid: int, foreign: set[str]) -> bool:
    if _CI:
        try:
            return os.readlink(f"/proc/{pid}/ns/pid") not in foreign
        except OSError:
            return False
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"{_MARKER}={os.environ[_MARKER]}".encode() in environ


def pytest_sessionstart(session: pytest.Session) -> None:
    os.environ[_MARKER] = secrets.token_hex(8)
    _BEFORE["mounts"] = _mounts()
    _BEFORE["procs"] = set(_stack_processes())


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> Iterator[None]:
    # After the other implementations: pytest's own tears down the session's fixtures
    # there when a run was interrupted (a stopped `make test`: Ctrl-C, or the lanes
    # runner's SIGINT), and the check must see what their finalisers left, not the
    # clusters they were about to stop.
    yield
    if "mounts" not in _BEFORE or hasattr(session.config, "workerinput"):
        return
    problems = []
    for proc in processes.live_processes():
        problems.append(f"process still running: pid {proc.pid} {' '.join(proc.argv)[:120]}")
    processes.stop_all()
    before_procs = _BEFORE["procs"]
    assert isinstance(before_procs, set)
    foreign = foreign_lane_namespaces()
    for pid, argv in sorted(_stack_processes().items()):
        if pid not in before_procs and pid != os.getpid() and _ours(pid, foreign):
            problems.append(f"stack process left behind: pid {pid} {argv}")
    before_mounts = _BEFORE["mounts"]
    assert isinstance(before_mounts, set)
    basetemp = str(session.config._tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
    for point, fstype in sorted(_mounts() - before_mounts):
        if _CI or point == basetemp or point.startswith(basetemp + "/"):
            problems.append(f"mount left behind: {point} ({fstype})")
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = "leak check failed:\n  " + "\n  ".join(problems)
        if reporter is not None:
            reporter.write_sep("=", "dynvol leak check", red=True)
            reporter.write_line(text)
        else:
            print(text)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
async def _no_pending_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks running behind it."""
    yield
    current = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    if pending:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        pytest.fail(f"test left {len(pending)} asyncio task(s) pending: {pending[:3]}")
