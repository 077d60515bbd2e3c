"""The lanes of ``make test`` (dynvol.testing.lanes): the plan keeps every tier, never
deadlocks, and the runner and the namespace init do what they say."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dynvol.testing.lanes import LANE_PORTS, Runner, Step, check, failures, only, plan

VERSIONS = ("v1.37.2", "v1.35.4")


def test_the_plan_runs_every_tier_make_test_promises() -> None:
    steps = plan("py", VERSIONS)
    by_name = {s.name: s for s in steps}
    # The README's test command: lint, unit + integration on each release, csi-sanity, the
    # single-node e2e tier, the three-node file and the upstream suite.
    assert {
        "lint", "integration-v1.37.2", "integration-v1.35.4", "csi-sanity",
        "e2e-single-node", "e2e-three-nodes", "e2e-upstream",
    } <= set(by_name)  # fmt: skip
    newest = by_name["integration-v1.37.2"]
    assert "tests/unit" in newest.argv
    assert "tests/integration" in newest.argv
    assert dict(newest.env)["DYNVOL_KUBERNETES_VERSION"] == "v1.37.2"
    assert dict(by_name["integration-v1.35.4"].env)["DYNVOL_KUBERNETES_VERSION"] == "v1.35.4"
    assert "build-oldest" in by_name["integration-v1.35.4"].needs
    assert dict(by_name["e2e-three-nodes"].env) == {"DYNVOL_MULTINODE_E2E": "1"}
    assert dict(by_name["e2e-upstream"].env) == {"DYNVOL_UPSTREAM_E2E": "1"}
    # The api lane runs in namespaces of its own, so that neither lane's leak check sees
    # the other's mounts; the nodes lane's clusters run in the machine's, as on a machine.
    for s in steps:
        if s.queue == "api":
            assert s.isolated, s.name
        if s.queue == "nodes":
            assert not s.isolated, s.name
            assert s.cluster, s.name
        if s.queue == "build":
            assert s.nice > 0, s.name


def test_tests_that_make_node_namespaces_run_once_in_the_machines_namespaces() -> None:
    """They fail inside the api lane's namespace once a cluster runs (EINVAL on binding a
    new mount namespace's file): every api step leaves them out, one nodes step runs them."""
    from dynvol.testing.lanes import MACHINE_NAMESPACE_TESTS

    steps = plan("py", VERSIONS)
    for path in MACHINE_NAMESPACE_TESTS:
        running = [s.name for s in steps if path in s.argv]
        assert running == ["e2e-three-nodes"]
        for s in steps:
            if s.queue == "api" and "pytest" in s.argv:
                assert f"--ignore={path}" in s.argv, s.name


def test_one_release_has_no_oldest_build() -> None:
    names = [s.name for s in plan("py", VERSIONS[:1])]
    assert "build-oldest" not in names
    assert "integration-v1.35.4" not in names
    with pytest.raises(ValueError, match="at least one"):
        plan("py", ())


def test_pytest_arguments_reach_every_pytest_step() -> None:
    for s in plan("py", VERSIONS, ["-k", "slow"]):
        if "pytest" in s.argv:
            assert s.argv[-2:] == ("-k", "slow"), s.name


def test_check_refuses_plans_that_would_deadlock_or_lose_a_step() -> None:
    a = Step(name="a", queue="api", argv=("true",), needs=("b",))
    b = Step(name="b", queue="api", argv=("true",))
    with pytest.raises(ValueError, match="queued after it"):
        check([a, b])
    check([b, a])
    with pytest.raises(ValueError, match="not a step"):
        check([Step(name="a", queue="api", argv=("true",), needs=("zz",))])
    with pytest.raises(ValueError, match="duplicate"):
        check([b, b])
    with pytest.raises(ValueError, match="unknown queue"):
        check([Step(name="a", queue="elsewhere", argv=("true",))])


def test_only_keeps_what_the_named_steps_need() -> None:
    names = [s.name for s in only(plan("py", VERSIONS), ["e2e-upstream"])]
    assert names == [
        "build-control-plane", "build-node", "build-minio", "build-api-tools",
        "build-e2e-suite", "image-dynvol", "e2e-upstream",
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="unknown step"):
        only(plan("py", VERSIONS), ["nope"])


def _run(steps: list[Step], tmp_path: Path, *, serial: bool = False) -> Runner:
    runner = Runner(steps, top=tmp_path, logs=tmp_path / "logs", serial=serial)
    runner.run()
    return runner


def test_steps_wait_for_their_needs_and_a_failure_skips_only_its_dependants(
    tmp_path: Path,
) -> None:
    steps = [
        Step(name="slow-build", queue="build", argv=("sh", "-c", "sleep 0.3; date +%s.%N > built")),
        Step(name="bad-build", queue="image", argv=("sh", "-c", "echo broken; exit 3")),
        Step(
            name="uses-build",
            queue="api",
            argv=("sh", "-c", "test -f built && echo saw it"),
            needs=("slow-build",),
        ),
        Step(name="uses-bad", queue="nodes", argv=("true",), needs=("bad-build",)),
        Step(name="after-bad", queue="nodes", argv=("sh", "-c", "echo still ran")),
    ]
    runner = _run(steps, tmp_path)
    got = {name: o.status for name, o in runner.outcomes.items()}
    assert got == {
        "slow-build": "passed", "bad-build": "failed", "uses-build": "passed",
        "uses-bad": "skipped", "after-bad": "passed",
    }  # fmt: skip
    assert runner.outcomes["bad-build"].returncode == 3
    assert "bad-build did not pass" in runner.outcomes["uses-bad"].reason
    assert (tmp_path / "logs" / "uses-build.log").read_text() == "saw it\n"
    assert (tmp_path / "logs" / "bad-build.log").read_text() == "broken\n"
    # The step that needed the build started after the build had finished.
    built = runner.outcomes["slow-build"]
    used = runner.outcomes["uses-build"]
    assert built.ended is not None
    assert used.started is not None
    assert used.started >= built.ended


def test_the_summary_names_the_failed_tests_of_a_failed_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = (
        "tests/x.py .F\n"
        "=== short test summary info ===\n"
        "FAILED tests/x.py::test_b - AssertionError: 1 != 2\n"
        "ERROR tests/x.py::test_c - RuntimeError: fixture\n"
        "=== 1 failed, 1 passed, 1 error ===\n"
        "=== dynvol leak check ===\n"
        "leak check failed:\n"
        "  mount left behind: /tmp/m (ext4)\n"
        "  process still running: pid 7 sleep 9\n"
        "\n"
        "  an indented line after the findings\n"
    )
    (tmp_path / "report").write_text(report)
    steps = [
        Step(name="red", queue="api", argv=("sh", "-c", "cat report; exit 1")),
        Step(name="green", queue="nodes", argv=("sh", "-c", "echo FAILED nothing; true")),
    ]
    _run(steps, tmp_path)
    tail = capsys.readouterr().out.split("wall time", 1)[1]
    assert "red: FAILED tests/x.py::test_b - AssertionError: 1 != 2" in tail
    assert "red: ERROR tests/x.py::test_c - RuntimeError: fixture" in tail
    # A step whose tests passed fails on its leak check: what was left behind is named.
    assert "red: leak check failed:" in tail
    assert "red:   mount left behind: /tmp/m (ext4)" in tail
    assert "red:   process still running: pid 7 sleep 9" in tail
    assert "an indented line after" not in tail
    # A step that passed is not summarised, whatever its log says.
    assert "green:" not in tail
    many = tmp_path / "many.log"
    many.write_text("".join(f"FAILED t::{i}\n" for i in range(40)))
    listed = failures(many, limit=5)
    assert listed[:5] == [f"FAILED t::{i}" for i in range(5)]
    assert listed[5] == f"... and 35 more (see {many})"


def test_each_test_lane_hands_out_ports_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Run inside a lane of make test, this process has its lane's range already.
    monkeypatch.delenv("DYNVOL_TEST_PORTS", raising=False)
    show = ("sh", "-c", "echo ${DYNVOL_TEST_PORTS:-none}")
    steps = [
        Step(name=queue, queue=queue, argv=show) for queue in ("api", "nodes", "build", "lint")
    ]
    _run(steps, tmp_path)
    seen = {q: (tmp_path / "logs" / f"{q}.log").read_text().strip() for q in LANE_PORTS}
    assert seen == LANE_PORTS
    assert (tmp_path / "logs" / "build.log").read_text().strip() == "none"


def test_cluster_steps_take_the_cluster_lock(tmp_path: Path) -> None:
    lock = tmp_path / "cluster.lock"
    steps = [
        Step(
            name="c",
            queue="nodes",
            cluster=True,
            argv=("sh", "-c", f"flock -n {lock} true || echo held"),
        ),
        Step(name="free", queue="api", argv=("sh", "-c", f"flock -n {lock} true && echo free")),
    ]
    runner = Runner(steps, top=tmp_path, logs=tmp_path / "logs", serial=True, cluster_lock=lock)
    runner.run()
    # Under the runner's flock the step cannot take the lock again; the other step can.
    assert (tmp_path / "logs" / "c.log").read_text() == "held\n"
    assert (tmp_path / "logs" / "free.log").read_text() == "free\n"


def test_queues_run_side_by_side(tmp_path: Path) -> None:
    # Two 1 s steps in different queues overlap; in one queue they would take 2 s. The
    # overlap is read from the steps' own start and end times, not from a timed assertion.
    steps = [
        Step(name="one", queue="api", argv=("sleep", "1")),
        Step(name="two", queue="nodes", argv=("sleep", "1")),
    ]
    runner = _run(steps, tmp_path)
    one, two = runner.outcomes["one"], runner.outcomes["two"]
    assert one.started is not None
    assert two.started is not None
    assert one.ended is not None
    assert two.ended is not None
    assert two.started < one.ended
    assert one.started < two.ended
    serial = _run(steps, tmp_path, serial=True)
    a, b = serial.outcomes["one"], serial.outcomes["two"]
    assert a.ended is not None
    assert b.started is not None
    assert b.started >= a.ended


def test_the_init_returns_the_status_and_reaps_orphans(tmp_path: Path) -> None:
    """Run as a child subreaper, the init inherits the orphans of the command, as PID 1 of
    a namespace would, and must wait for them: none is left a zombie."""
    script = textwrap.dedent(
        f"""
        import ctypes, os
        ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphans come to us
        from dynvol.testing import lanes
        # The subshell exits at once, so its sleep is an orphan; it ends before the command.
        cmd = "(sleep 0.1 & echo $! > {tmp_path}/orphan); sleep 0.8; exit 7"
        code = lanes.init_main(["sh", "-c", cmd])
        def ppid_state(pid):
            fields = open(f"/proc/{{pid}}/stat").read().rsplit(")", 1)[1].split()
            return int(fields[1]), fields[0]
        zombies = []
        for p in os.listdir("/proc"):
            try:
                if p.isdigit() and ppid_state(p) == (os.getpid(), "Z"):
                    zombies.append(p)
            except OSError:
                pass
        print(code, len(zombies))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    assert out == ["7", "0"]
    assert int((tmp_path / "orphan").read_text()) > 0


def test_the_init_passes_a_signal_on_and_reports_it(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynvol.testing.lanes", "--init", "--", "sleep", "30"],
        stdout=subprocess.PIPE,
    )
    try:
        # Once the init has started its command (a child of the init running sleep).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not _children(proc.pid, "sleep"):
            time.sleep(0.05)
        assert _children(proc.pid, "sleep"), "the init started its command"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _children(pid: int, name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            comm = (entry / "comm").read_text().strip()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and comm == name:
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare of mount and PID namespaces needs root")
def test_an_isolated_step_sees_only_its_own_processes(tmp_path: Path) -> None:
    steps = [
        Step(
            name="look",
            queue="api",
            isolated=True,
            argv=("sh", "-c", "ls /proc | grep -c '^[0-9]'; echo $$"),
        ),
    ]
    runner = _run(steps, tmp_path)
    assert runner.outcomes["look"].status == "passed"
    count, pid = (tmp_path / "logs" / "look.log").read_text().split()
    # PID 1 (the init) and the shell and its ls/grep: a handful, not the host's hundreds.
    assert int(count) <= 6
    assert int(pid) <= 6


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare of mount and PID namespaces needs root")
def test_the_other_lanes_namespace_is_found_and_not_our_own(tmp_path: Path) -> None:
    """The nodes lane's leak check leaves out the processes of an isolated step's PID
    namespace: that namespace is found from its init, and the caller's own is not."""
    from dynvol.testing.lanes import foreign_lane_namespaces

    own = os.readlink("/proc/self/ns/pid")
    assert own not in foreign_lane_namespaces()
    proc = subprocess.Popen(
        ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child",
         sys.executable, "-m", "dynvol.testing.lanes", "--init", "--", "sleep", "30"],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        init = []
        while time.monotonic() < deadline and not init:
            init = [
                int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()
                and b"--init" in _cmdline(e) and b"dynvol.testing.lanes" in _cmdline(e)
                and _ppid(e) == proc.pid
            ]  # fmt: skip
            time.sleep(0.05)
        assert init, "the isolated step's init started"
        ns = os.readlink(f"/proc/{init[0]}/ns/pid")
        assert ns != own
        assert ns in foreign_lane_namespaces()
    finally:
        # --kill-child: the namespace's init, and with it the namespace, go with unshare.
        proc.kill()
        proc.wait(timeout=20)


def _cmdline(entry: Path) -> bytes:
    try:
        return entry.joinpath("cmdline").read_bytes()
    except OSError:
        return b""


def _ppid(entry: Path) -> int:
    try:
        return int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare of mount and PID namespaces needs root")
def test_a_stopped_run_lets_its_steps_clean_up_and_starts_no_other(tmp_path: Path) -> None:
    """A test step gets SIGINT (pytest's KeyboardInterrupt, which runs the finalisers) at
    its command, through an isolated step's init, past the ``flock``, ``nice`` and
    ``unshare --kill-child`` around it; a build gets the signal itself in its process
    group; a step not started yet is not started."""
    handler = textwrap.dedent(
        f"""
        import pathlib, sys, time
        pathlib.Path("{tmp_path}/ready").touch()
        try:
            time.sleep(60)
        except KeyboardInterrupt:  # what pytest gets: its finalisers run from here
            pathlib.Path("{tmp_path}/cleaned").write_text("interrupted")
            sys.exit(3)
        """
    )
    shell = f"trap 'echo $? > {tmp_path}/shell-stopped; exit 4' TERM; touch {tmp_path}/ready2; "
    steps = [
        Step(
            name="held",
            queue="nodes",
            isolated=True,
            cluster=True,
            nice=1,
            argv=(sys.executable, "-c", handler),
        ),
        Step(name="next", queue="nodes", argv=("sh", "-c", f"touch {tmp_path}/next-ran")),
        Step(name="plain", queue="api", argv=("sh", "-c", shell + "sleep 60 & wait")),
    ]
    lock = tmp_path / "cluster.lock"
    runner = Runner(steps, top=tmp_path, logs=tmp_path / "logs", serial=False, cluster_lock=lock)
    import threading

    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not ((tmp_path / "ready").exists() and (tmp_path / "ready2").exists()):
            assert time.monotonic() < deadline, "the steps did not start"
            time.sleep(0.05)
        runner.stop(signal.SIGTERM)
    finally:
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert (tmp_path / "cleaned").read_text() == "interrupted"
    assert runner.outcomes["held"].returncode == 3
    assert (tmp_path / "shell-stopped").exists()
    assert runner.outcomes["plain"].returncode == 4
    assert runner.outcomes["next"].status == "skipped"
    assert not (tmp_path / "next-ran").exists()
    assert runner.stopped == signal.SIGTERM
