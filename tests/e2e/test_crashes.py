"""Crashes on the single-node cluster: the parts die the way they die on a real node.

- The Dynamic Mount Pod's agent is killed with SIGKILL from the host (its PID from the
  node's containerd): its container restarts (or the node plugin replaces the DMP), every
  mount is back, and the user pods were never restarted.
- The DMP container is killed by its memory limit (the kernel's OOM killer, cgroup v1 on
  this machine): the same, and its status says ``OOMKilled``.
- The node plugin (``dynvol node``) is killed with SIGKILL in the middle of a
  NodePublishVolume and in the middle of a claim's rollout to many pods: once kubelet has
  restarted it, there is one DynamicVolumeMount and one DMP per pod and claim, every pod
  has its mount, and no slot or mount is left over (the host mount table under
  /var/lib/kubelet and /var/lib/dynamic is as it was before).

Each test prints what it measured (times) for the closing notes.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from dynvol_core.quantities import parse_quantity
from tests.e2e.conftest import SYSTEM_NAMESPACE, XVOLS, host_mounts_under, wait_for

if TYPE_CHECKING:
    from tests.e2e.conftest import Storage

pytestmark = pytest.mark.e2e

KUBELET_DIR = Path("/var/lib/kubelet")
DYNAMIC_DIR = Path("/var/lib/dynamic")
MEMORY_CGROUP = Path("/sys/fs/cgroup/memory")


# -- finding processes -------------------------------------------------------------------


def _container_id(pod: dict[str, Any], name: str | None = None) -> str:
    statuses = pod["status"]["containerStatuses"]
    (status,) = [s for s in statuses if name is None or s["name"] == name]
    return str(status["containerID"]).removeprefix("containerd://")


def _task_pid(storage: Storage, container_id: str) -> int:
    """The host PID of a container's first process, as the node's containerd lists it."""
    socket = storage.cluster.dir / "containerd" / "containerd.sock"
    out = subprocess.run(
        ["ctr", "--address", str(socket), "-n", "k8s.io", "task", "ls"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip
    for line in out.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == container_id and fields[2] == "RUNNING":
            return int(fields[1])
    raise AssertionError(f"containerd runs no task {container_id}: {out}")


def _sigkill(pid: int, *, expect: str) -> None:
    """SIGKILL ``pid`` from the host, after checking that it is ``dynvol <expect>``."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"dynvol" in argv[0], argv
    assert expect.encode() in argv, argv
    os.kill(pid, signal.SIGKILL)


def _container_status(pod: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
    found = [s for s in statuses if name is None or s.get("name") == name]
    return found[0] if found else {}


# -- what the node holds -----------------------------------------------------------------


def _host_mounts() -> collections.Counter[str]:
    """The host's mount points below /var/lib/kubelet and /var/lib/dynamic, with counts
    (propagation shows one mount at peers of a mount point; a leak adds one)."""
    return collections.Counter(host_mounts_under(KUBELET_DIR) + host_mounts_under(DYNAMIC_DIR))


def _fuse_under(path: Path) -> list[str]:
    """The FUSE mount points below ``path`` on the host, each as often as it is listed."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].replace("\\040", " ")
        if fields[fields.index("-") + 1].startswith("fuse") and point.startswith(f"{path}/"):
            points.append(point)
    return sorted(points)


def _slots(storage: Storage) -> list[Path]:
    return sorted(p for p in (XVOLS / storage.class_name).glob("*/*") if p.is_dir())


def _user_pods(storage: Storage, selector: str) -> dict[str, tuple[str, int]]:
    """name -> (UID, restartCount) of the pods matching ``selector``."""
    return {
        p["metadata"]["name"]: (p["metadata"]["uid"], int(_container_status(p)["restartCount"]))
        for p in storage.pods(selector)
    }


def _converged(storage: Storage, claims: list[str], pods: dict[str, tuple[str, int]]) -> None:
    """One DynamicVolumeMount per claim and pod, Mounted; one DMP per pod (independent)."""
    dvms = storage.dvms()
    pairs = collections.Counter((d["spec"]["claimName"], d["spec"]["podUID"]) for d in dvms)
    expected = {(c, uid) for c in claims for uid, _ in pods.values()}
    assert set(pairs) == expected, pairs
    assert all(n == 1 for n in pairs.values()), f"duplicate DynamicVolumeMounts: {pairs}"
    phases = {d["metadata"]["name"]: (d.get("status") or {}).get("phase") for d in dvms}
    assert set(phases.values()) == {"Mounted"}, phases
    dmps = [p for p in storage.dmps() if not p["metadata"].get("deletionTimestamp")]
    assert len(dmps) == len(pods), [p["metadata"]["name"] for p in dmps]
    served = {d["spec"]["dmpName"] for d in dvms}
    assert served == {p["metadata"]["name"] for p in dmps}, served


def _reads(storage: Storage, pods: list[str], paths: dict[str, str]) -> bool:
    return all(
        storage.exec(pod, f'test "$(cat {path})" = "{body.rstrip()}"').returncode == 0
        for pod in pods
        for path, body in paths.items()
    )


def _node_plugin(storage: Storage) -> dict[str, Any]:
    pods = storage.cluster.items(
        "pods", "-n", SYSTEM_NAMESPACE, "-l", "app.kubernetes.io/component=node"
    )
    (pod,) = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    return pod


def _node_plugin_ready(storage: Storage, restarts: int) -> bool:
    status = _container_status(_node_plugin(storage), "node")
    return bool(status.get("restartCount", 0) > restarts and status.get("ready"))


def _kill_node_plugin(storage: Storage) -> tuple[int, float]:
    """SIGKILL ``dynvol node``; its restart count before, and when (monotonic)."""
    pod = _node_plugin(storage)
    restarts = int(_container_status(pod, "node").get("restartCount", 0))
    _sigkill(_task_pid(storage, _container_id(pod, "node")), expect="node")
    return restarts, time.monotonic()


# -- the Dynamic Mount Pod ---------------------------------------------------------------


def _two_claims_in_two_pods(storage: Storage) -> tuple[list[str], dict[str, str]]:
    storage.cluster.apply(storage.workload("Deployment", "app", {"app": "app"}))
    storage.cluster.kubectl("-n", storage.namespace, "scale", "deployment", "app", "--replicas=2")
    pods = storage.wait_ready("app=app", 2)
    storage.put("a.txt", "claim a\n")
    storage.put("b.txt", "claim b\n")
    storage.claim("a", mountpoint="/a", selector={"app": "app"})
    storage.claim("b", mountpoint="/b", selector={"app": "app"})
    paths = {"/dynamic/a/a.txt": "claim a\n", "/dynamic/b/b.txt": "claim b\n"}
    wait_for(lambda: _reads(storage, pods, paths), 120, "both claims are mounted in both pods")
    return pods, paths


def test_a_dmp_agent_killed_from_the_host_comes_back_with_every_mount(storage: Storage) -> None:
    pods, paths = _two_claims_in_two_pods(storage)
    users = _user_pods(storage, "app=app")
    wait_for(lambda: _converged(storage, ["a", "b"], users) or True, 60, "converged")
    fuse_before = collections.Counter(_fuse_under(XVOLS / storage.class_name))
    assert len(fuse_before) == 4, fuse_before
    dmps = {p["metadata"]["name"]: p for p in storage.dmps()}
    killed = time.monotonic()
    for dmp in dmps.values():
        _sigkill(_task_pid(storage, _container_id(dmp)), expect="dmp")

    def back() -> bool:
        return _reads(storage, pods, paths)

    wait_for(back, 180, "every mount is back in every pod", interval=0.5)
    took = time.monotonic() - killed
    current = {p["metadata"]["name"]: p for p in storage.dmps()}
    how = []
    for name, dmp in dmps.items():
        now = current.get(name)
        if now is not None and now["metadata"]["uid"] == dmp["metadata"]["uid"]:
            assert _container_status(now).get("restartCount", 0) >= 1, now["status"]
            how.append("restarted")
        else:
            how.append("replaced")  # the node plugin deleted it and made it again
    # The user pods were never restarted, and nothing is mounted twice.
    assert _user_pods(storage, "app=app") == users
    assert all(restarts == 0 for _, restarts in users.values()), users
    wait_for(lambda: _converged(storage, ["a", "b"], users) or True, 60, "converged again")
    wait_for(
        lambda: collections.Counter(_fuse_under(XVOLS / storage.class_name)) == fuse_before,
        30, "the host mount table of the slots is as before the kill",
    )  # fmt: skip
    print(f"SIGKILL of 2 DMP agents (4 mounts): every mount back in {took:.1f} s ({how})")


def test_a_dmp_killed_by_its_memory_limit_comes_back(storage: Storage) -> None:
    storage.cluster.apply(storage.workload("Pod", "app", {"app": "app"}))
    (pod,) = storage.wait_ready("app=app", 1)
    storage.put("hello.txt", "hello\n")
    storage.claim("c", mountpoint="/data", selector={"app": "app"})
    paths = {"/dynamic/data/hello.txt": "hello\n"}
    wait_for(lambda: _reads(storage, [pod], paths), 120, "the claim is mounted")
    users = _user_pods(storage, "app=app")
    (dmp,) = storage.dmps()
    container_id = _container_id(dmp)
    limits = list(MEMORY_CGROUP.glob(f"**/{container_id}/memory.limit_in_bytes"))
    if not limits:
        unified = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        pytest.skip(
            f"no cgroup v1 memory controller holds the DMP container under {MEMORY_CGROUP}"
            f" ({'cgroup v2 is mounted' if unified else 'no memory controller is mounted'}):"
            " no memory limit of the container's can be enforced here"
        )
    limit = int(limits[0].read_text())
    # The class's mount-memory-limit and the agent's own share (dmp_container_resources).
    spec = dmp["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert limit == parse_quantity(spec).value, (limit, spec)
    # Processes in the DMP container take more than the limit between them. The kernel's
    # OOM killer picks the process of the cgroup with the highest score: its resident
    # memory plus its oom_score_adj in thousandths of the limit. Every process of the
    # container has the adjustment kubelet gave it (Burstable: close to 1000; lowering one
    # is refused), so the agent volunteers (1000) and each hog stays well below the agent's
    # own resident memory (a bare interpreter holding 8 MiB: about 17 MiB, against the
    # agent's 35 or so), and there are enough of them to pass the limit: the container's
    # own process is the one that dies, as when the agent itself outgrows the limit, and
    # the container is OOMKilled.
    hogs = limit // (8 << 20) + 8
    hog = (
        f"echo 1000 > /proc/1/oom_score_adj && for i in $(seq {hogs}); do "
        '/opt/dynvol/bin/python -c \'import time; x = b"\\x01" * (8 << 20); '
        "time.sleep(90)' & done; wait"
    )
    restarts = int(_container_status(dmp)["restartCount"])
    killed = time.monotonic()
    result = storage.cluster.kubectl(
        "-n", SYSTEM_NAMESPACE, "exec", dmp["metadata"]["name"], "--", "sh", "-c", hog,
        check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0, result
    seen: list[dict[str, Any]] = []

    def ended() -> dict[str, Any] | None:
        current = storage.cluster.get("pod", dmp["metadata"]["name"], SYSTEM_NAMESPACE)
        seen[:] = [_container_status(current)]
        terminated = (seen[0].get("lastState") or {}).get("terminated")
        return seen[0] if terminated and seen[0].get("restartCount", 0) > restarts else None

    try:
        status = wait_for(ended, 60, "the DMP container ended")
    except AssertionError:
        raise AssertionError(
            f"the DMP container did not end: {seen}; exec: {result.returncode} "
            f"{result.stdout[-500:]!r} {result.stderr[-500:]!r}"
        ) from None
    terminated = status["lastState"]["terminated"]
    assert terminated["reason"] == "OOMKilled", (terminated, result.stderr[-500:])
    assert terminated["exitCode"] == 137, terminated
    wait_for(lambda: _reads(storage, [pod], paths), 180, "the mount is back", interval=0.5)
    took = time.monotonic() - killed
    assert _user_pods(storage, "app=app") == users
    assert all(restarts == 0 for _, restarts in users.values()), users
    wait_for(lambda: _converged(storage, ["c"], users) or True, 60, "converged again")
    assert len(set(_fuse_under(XVOLS / storage.class_name))) == 1
    print(
        f"OOM kill of the DMP container (limit {limit >> 20} MiB, restartCount "
        f"{status['restartCount']}): the mount back in {took:.1f} s"
    )


# -- the node plugin -----------------------------------------------------------------------


def test_a_node_plugin_killed_during_node_publish_converges(storage: Storage) -> None:
    storage.put("hello.txt", "hello\n")
    before = _host_mounts()
    slots_before = _slots(storage)
    storage.claim("c", mountpoint="/data", selector={"app": "app"})
    storage.cluster.apply(storage.workload("Pod", "app", {"app": "app"}))
    # NodePublishVolume makes the pod's slot first and binds it onto kubelet's target path
    # next: the kill lands once the slot is there, before the pod runs.
    plugin = _node_plugin(storage)
    restarts = int(_container_status(plugin, "node")["restartCount"])
    pid = _task_pid(storage, _container_id(plugin, "node"))
    wait_for(lambda: len(_slots(storage)) > len(slots_before), 60, "the slot is made",
             interval=0.002)  # fmt: skip
    # Frozen where it is, looked at, then killed: whether the bind onto kubelet's target
    # path was made yet says where in NodePublishVolume the kill landed.
    os.kill(pid, signal.SIGSTOP)
    uids = {p.name for p in _slots(storage)} - {p.name for p in slots_before}
    targets_at_kill = [
        p for p in _host_mounts() if "kubernetes.io~csi" in p and any(u in p for u in uids)
    ]
    _sigkill(pid, expect="node")
    killed = time.monotonic()
    wait_for(lambda: _node_plugin_ready(storage, restarts), 120, "the node plugin runs again")
    restarted = time.monotonic() - killed
    (pod,) = storage.wait_ready("app=app", 1, timeout=180)
    paths = {"/dynamic/data/hello.txt": "hello\n"}
    wait_for(lambda: _reads(storage, [pod], paths), 120, "the claim is mounted", interval=0.5)
    took = time.monotonic() - killed
    users = _user_pods(storage, "app=app")
    wait_for(lambda: _converged(storage, ["c"], users) or True, 60, "one DVM and one DMP")
    ((uid, _),) = users.values()
    assert [p.name for p in _slots(storage)] == [uid]  # one slot, the pod's
    assert len(set(_fuse_under(XVOLS / storage.class_name))) == 1
    # Gone again: nothing is left that was not there before.
    storage.cluster.kubectl("-n", storage.namespace, "delete", "dynamicvolumeclaim", "c")
    storage.cluster.kubectl("-n", storage.namespace, "delete", "pod", pod, "--wait=true")
    wait_for(lambda: not storage.dmps(), 120, "the DMP is gone")
    wait_for(lambda: _host_mounts() == before, 60, "the host mount table is as before")
    wait_for(lambda: _slots(storage) == slots_before, 60, "no slot is left")
    print(
        f"SIGKILL of the node plugin mid-publish (kubelet target mounted at the kill: "
        f"{bool(targets_at_kill)}): plugin ready after {restarted:.1f} s, pod mounted after "
        f"{took:.1f} s"
    )


def test_a_node_plugin_killed_during_a_claims_rollout_converges(storage: Storage) -> None:
    replicas = 4
    storage.cluster.apply(storage.workload("Deployment", "roll", {"app": "roll"}))
    storage.cluster.kubectl(
        "-n", storage.namespace, "scale", "deployment", "roll", f"--replicas={replicas}"
    )
    pods = storage.wait_ready("app=roll", replicas, timeout=180)
    users = _user_pods(storage, "app=roll")
    storage.put("roll.txt", "rolled out\n")
    before = _host_mounts()
    # The claim reaches the node plugin's reconcilers at once: the kill lands while it
    # creates the DynamicVolumeMounts and DMPs for the pods.
    storage.claim("c", mountpoint="/data", selector={"app": "roll"})
    restarts, killed = _kill_node_plugin(storage)
    dvms_at_kill = len(storage.dvms())
    dmps_at_kill = len(storage.dmps())
    wait_for(lambda: _node_plugin_ready(storage, restarts), 120, "the node plugin runs again")
    paths = {"/dynamic/data/roll.txt": "rolled out\n"}
    wait_for(lambda: _reads(storage, pods, paths), 240, "every pod has the claim", interval=1.0)
    took = time.monotonic() - killed
    wait_for(lambda: _converged(storage, ["c"], users) or True, 60, "one DVM and DMP per pod")
    assert _user_pods(storage, "app=roll") == users
    assert len(set(_fuse_under(XVOLS / storage.class_name))) == replicas
    during = _host_mounts()
    assert not [p for p in before if during[p] < before[p]], "a mount that was there is gone"
    storage.cluster.kubectl("-n", storage.namespace, "delete", "dynamicvolumeclaim", "c")
    wait_for(lambda: not storage.dmps(), 120, "the DMPs are gone")
    wait_for(lambda: _host_mounts() == before, 60, "the host mount table is as before")
    assert _user_pods(storage, "app=roll") == users
    print(
        f"SIGKILL of the node plugin during a rollout to {replicas} pods (at the kill: "
        f"{dvms_at_kill} DVMs, {dmps_at_kill} DMPs): every pod mounted after {took:.1f} s"
    )
