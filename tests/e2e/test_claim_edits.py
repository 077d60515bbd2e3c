"""Editing every field of a live claim with real mounts in a running pod (docs/design.md §9).

After each edit the pod converges: the new mount serves the right data, and no old mount
is left, seen from inside the pod (/proc/self/mounts), from the host mount table and from
the Dynamic Mount Pod's process list (one FUSE daemon, not the old one).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.conftest import API_VERSION, GROUP, SYSTEM_NAMESPACE, XVOLS, wait_for

if TYPE_CHECKING:
    from tests.e2e.conftest import Storage

pytestmark = pytest.mark.e2e

DAEMONS = ("s3fs", "rclone")


def _fuse_mounts_on_host(class_dir: Path) -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].replace("\\040", " ")
        fs_type = fields[fields.index("-") + 1]
        if fs_type.startswith("fuse") and point.startswith(str(class_dir) + "/"):
            points.append(point)
    return sorted(points)


def _pod_mounts(storage: Storage, pod: str) -> list[str]:
    out = storage.sh(pod, "awk '{print $2}' /proc/self/mounts")
    return sorted(p for p in out.split() if p.startswith("/dynamic/"))


def _dmp_daemons(storage: Storage, dmp: str) -> list[str]:
    """pid:name of the FUSE daemons in the Dynamic Mount Pod ``dmp``."""
    script = "for d in /proc/[0-9]*; do echo ${d#/proc/}:$(cat $d/comm 2>/dev/null); done"
    result = storage.cluster.kubectl(
        "-n", SYSTEM_NAMESPACE, "exec", dmp, "--", "sh", "-c", script, check=False, timeout=30
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return sorted(
        line for line in result.stdout.split() if line.partition(":")[2] in DAEMONS
    )  # fmt: skip


def _dvm(storage: Storage, claim: str) -> dict[str, Any] | None:
    found = [d for d in storage.dvms() if d["spec"]["claimName"] == claim]
    return found[0] if found else None


def _converged(
    storage: Storage, pod: str, claim: str, mountpoint: str, old: list[str]
) -> list[str]:
    """Wait until ``mountpoint`` is the pod's only dynvol mount everywhere; the daemons.

    Mount points are compared as sets: propagation may show one mount more than once (at
    peers of one mount point), but a stale mount is at another path.
    """
    dvm = _dvm(storage, claim)
    assert dvm is not None
    dmp = dvm["spec"]["dmpName"]
    class_dir = XVOLS / storage.class_name
    seen: list[str] = []

    def settled() -> list[str] | None:
        daemons = _dmp_daemons(storage, dmp)
        host = sorted(set(_fuse_mounts_on_host(class_dir)))
        inside = sorted(set(_pod_mounts(storage, pod)))
        seen[:] = [f"pod {inside}, host {host}, dmp {dmp} daemons {daemons} (old {old})"]
        ok = (
            inside == [f"/dynamic{mountpoint}"]
            and len(host) == 1
            and host[0].endswith(mountpoint)
            and len(daemons) == 1
            and not set(daemons) & set(old)
        )
        return daemons if ok else None

    try:
        return wait_for(settled, 60, f"{mountpoint} is the only mount of {pod}")  # type: ignore[no-any-return]
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {seen}") from None


def _edit(storage: Storage, claim: str, patch: dict[str, Any]) -> None:
    storage.cluster.kubectl(
        "-n", storage.namespace, "patch", "dynamicvolumeclaim", claim, "--type=merge",
        "-p", json.dumps({"spec": patch}),
    )  # fmt: skip


@contextlib.contextmanager
def _another_class(storage: Storage) -> Iterator[str]:
    """A second class like the test's own (same Secret), deleted afterwards."""
    out = storage.cluster.kubectl("get", "storageproviderclass", storage.class_name, "-o", "json")
    spc = json.loads(out.stdout)
    name = f"{storage.class_name}-other"
    storage.cluster.apply(
        {"apiVersion": API_VERSION, "kind": "StorageProviderClass", "metadata": {"name": name},
         "spec": spc["spec"]}
    )  # fmt: skip
    try:
        yield name
    finally:
        storage.cluster.kubectl(
            "delete", "storageproviderclass", name, "--ignore-not-found", "--wait=true",
            "--timeout=60s", check=False, timeout=90,
        )  # fmt: skip


def _read(storage: Storage, pod: str, path: str, body: str) -> None:
    storage.wait_content(pod, path, body, timeout=60)


@pytest.mark.parametrize("mounter", ["s3fs", "rclone"])
def test_every_claim_field_changes_on_a_live_claim(storage: Storage, mounter: str) -> None:
    if mounter != "s3fs":
        storage.cluster.kubectl(
            "patch", "storageproviderclass", storage.class_name, "--type=merge",
            "-p", json.dumps({"spec": {"parameters": {"s3-mounter": mounter}}}),
        )  # fmt: skip
    storage.cluster.apply(storage.workload("Pod", "app", {"app": "app"}))
    (pod,) = storage.wait_ready("app=app", 1)
    body = f"first {uuid.uuid4().hex}\n"
    storage.put("which.txt", body)
    other = storage.minio.make_bucket("e2e-b", {"which.txt": b"other bucket\n"})
    storage.put("team/which.txt", "team prefix\n")
    storage.claim("c", mountpoint="/m1", selector={"app": "app"})
    _read(storage, pod, "/dynamic/m1/which.txt", body)
    daemons = _converged(storage, pod, "c", "/m1", [])

    # mountpoint: the new one is there, the old one is gone, and its daemon too.
    _edit(storage, "c", {"mountpoint": "/m2"})
    _read(storage, pod, "/dynamic/m2/which.txt", body)
    daemons = _converged(storage, pod, "c", "/m2", daemons)
    assert storage.exec(pod, "test -e /dynamic/m1").returncode != 0, "/m1 is left in the pod"

    # The provider config: prefix, bucket, endpoint (the same MinIO, spelled another way).
    port = storage.minio.endpoint.rsplit(":", 1)[1]
    edits: list[tuple[dict[str, Any], str]] = [
        ({"s3Config": {"prefix": "team"}}, "team prefix\n"),
        ({"s3Config": {"prefix": None, "bucket": other}}, "other bucket\n"),
        ({"s3Config": {"endpoint": f"http://localhost:{port}"}}, "other bucket\n"),
    ]
    for patch, expected in edits:
        _edit(storage, "c", patch)
        _read(storage, pod, "/dynamic/m2/which.txt", expected)
        daemons = _converged(storage, pod, "c", "/m2", daemons)

    # readOnly, both ways.
    _edit(storage, "c", {"readOnly": True})
    wait_for(
        lambda: storage.exec(pod, "echo x > /dynamic/m2/ro.txt").returncode != 0,
        60, "writes fail once readOnly",
    )  # fmt: skip
    daemons = _converged(storage, pod, "c", "/m2", daemons)
    _edit(storage, "c", {"readOnly": False})
    wait_for(
        lambda: storage.exec(pod, "echo rw > /dynamic/m2/rw.txt").returncode == 0,
        60, "writes work again once readOnly is false",
    )  # fmt: skip
    daemons = _converged(storage, pod, "c", "/m2", daemons)
    wait_for(lambda: storage.get("rw.txt", bucket=other) == "rw\n", 30, "rw.txt in the bucket")

    # A pinned storageProviderClass: its own class changes nothing; another unmounts.
    _edit(storage, "c", {"storageProviderClass": storage.class_name})
    _converged(storage, pod, "c", "/m2", [])
    with _another_class(storage) as another:
        _edit(storage, "c", {"storageProviderClass": another})
        storage.wait_gone(pod, "/dynamic/m2", timeout=60)
        wait_for(lambda: _dvm(storage, "c") is None, 60, "the mount of the claim is gone")
        wait_for(
            lambda: not _fuse_mounts_on_host(XVOLS / storage.class_name), 60,
            "no mount on the host",
        )  # fmt: skip
        _edit(storage, "c", {"storageProviderClass": None})
    _read(storage, pod, "/dynamic/m2/which.txt", "other bucket\n")

    # selector: the pod stops matching, then matches again.
    _edit(storage, "c", {"selector": {"matchLabels": {"app": "nobody"}}})
    storage.wait_gone(pod, "/dynamic/m2", timeout=60)
    wait_for(
        lambda: not _fuse_mounts_on_host(XVOLS / storage.class_name), 60, "no mount on the host"
    )
    _edit(storage, "c", {"selector": {"matchLabels": {"app": "app"}}})
    _read(storage, pod, "/dynamic/m2/which.txt", "other bucket\n")
    _converged(storage, pod, "c", "/m2", [])

    # Deleting the claim leaves nothing mounted.
    storage.cluster.kubectl("-n", storage.namespace, "delete", "dynamicvolumeclaim", "c")
    storage.wait_gone(pod, "/dynamic/m2", timeout=60)
    wait_for(
        lambda: not _fuse_mounts_on_host(XVOLS / storage.class_name), 60, "no mount on the host"
    )


# -- deleting a claim while a pod still writes (docs/design.md §9.5) ----------------------


@contextlib.contextmanager
def _in_background(storage: Storage, pod: str, script: str) -> Iterator[subprocess.Popen[str]]:
    """``script`` running in ``pod`` (through kubectl exec) while the test goes on."""
    argv = storage.cluster.kubectl_argv(
        "-n", storage.namespace, "exec", pod, "-c", "main", "--", "sh", "-c", script
    )  # fmt: skip
    proc = subprocess.Popen(argv, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def _delete_claim(storage: Storage, name: str) -> None:
    storage.cluster.kubectl(
        "-n", storage.namespace, "delete", "dynamicvolumeclaim", name, "--wait=false"
    )  # fmt: skip


def _files_open_status(storage: Storage, claim: str) -> dict[str, Any] | None:
    """The claim's DynamicVolumeMount's status while it waits for open files, else None."""
    status: dict[str, Any] = (_dvm(storage, claim) or {}).get("status") or {}
    reasons = [x.get("reason") for x in status.get("conditions") or [] if x.get("type") == "Ready"]
    return status if status.get("phase") == "Unmounting" and reasons == ["FilesOpen"] else None


def _files_open(storage: Storage, claim: str) -> bool:
    return _files_open_status(storage, claim) is not None


def test_a_file_open_across_the_claims_deletion_is_complete(storage: Storage) -> None:
    storage.cluster.apply(storage.workload("Pod", "app", {"app": "app"}))
    (pod,) = storage.wait_ready("app=app", 1)
    storage.put("hello.txt", "hello\n")
    storage.claim("c", mountpoint="/data", selector={"app": "app"})
    _read(storage, pod, "/dynamic/data/hello.txt", "hello\n")
    script = (
        "exec 3> /dynamic/data/long.txt && echo part1 >&3 && touch /tmp/opened && sleep 10 "
        "&& echo part2 >&3 && exec 3>&- && echo closed"
    )
    with _in_background(storage, pod, script) as proc:
        wait_for(lambda: storage.exec(pod, "test -e /tmp/opened").returncode == 0, 30, "opened")
        _delete_claim(storage, "c")
        wait_for(lambda: _files_open(storage, "c"), 30, "the dvm shows Unmounting, FilesOpen")
        assert proc.poll() is None, "the writer finished before the deletion was seen"
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert out.strip() == "closed"
    storage.wait_gone(pod, "/dynamic/data", timeout=60)
    assert storage.get("long.txt") == "part1\npart2\n"
    wait_for(lambda: _dvm(storage, "c") is None, 60, "the dvm is gone")
    assert not _fuse_mounts_on_host(XVOLS / storage.class_name)


def test_a_large_copy_finishing_after_the_deletion_reaches_the_bucket(storage: Storage) -> None:
    # Generous on a 2-core machine: the copy is uploaded when it is closed, within the grace.
    storage.cluster.kubectl(
        "patch", "storageproviderclass", storage.class_name, "--type=merge",
        "-p", json.dumps({"spec": {"parameters": {f"{GROUP}/unmount-grace-period": "240"}}}),
    )  # fmt: skip
    storage.cluster.apply(storage.workload("Pod", "app", {"app": "app"}))
    (pod,) = storage.wait_ready("app=app", 1)
    storage.put("hello.txt", "hello\n")
    storage.claim("c", mountpoint="/data", selector={"app": "app"})
    _read(storage, pod, "/dynamic/data/hello.txt", "hello\n")
    # Paced (1 MiB every 20 ms, over 5 s at the least), so that the copy is still being
    # written when the claim is deleted even on an idle machine, where a plain dd of 256
    # MiB into s3fs's local cache ends within a second.
    script = (
        "i=0; while [ $i -lt 256 ]; do dd if=/dev/zero bs=1M count=1 2>/dev/null || exit 1;"
        " sleep 0.02; i=$((i+1)); done > /dynamic/data/big && echo copied"
    )
    with _in_background(storage, pod, script) as proc:
        wait_for(
            lambda: storage.exec(pod, "test -e /dynamic/data/big").returncode == 0, 60, "copying"
        )
        _delete_claim(storage, "c")
        assert proc.poll() is None, "the copy finished before the deletion started"
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        assert out.strip() == "copied"
    storage.wait_gone(pod, "/dynamic/data", timeout=120)
    head = storage.s3.head_object(Bucket=storage.bucket, Key="big")
    assert head["ContentLength"] == 256 * 1024 * 1024
    wait_for(lambda: _dvm(storage, "c") is None, 60, "the dvm is gone")


def _kill_container(storage: Storage, pod: dict[str, Any]) -> None:
    """SIGKILL the DMP's container through the node's containerd (as an OOM kill does)."""
    (status,) = pod["status"]["containerStatuses"]
    container_id = status["containerID"].removeprefix("containerd://")
    socket = storage.cluster.dir / "containerd" / "containerd.sock"
    subprocess.run(
        ["ctr", "--address", str(socket), "-n", "k8s.io", "task", "kill", "-s", "SIGKILL",
         container_id],
        check=True, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_rclone_finishes_an_upload_cut_by_a_killed_dmp_container(storage: Storage) -> None:
    storage.cluster.kubectl(
        "patch", "storageproviderclass", storage.class_name, "--type=merge",
        "-p", json.dumps({"spec": {"parameters": {"s3-mounter": "rclone"}}}),
    )  # fmt: skip
    storage.cluster.apply(storage.workload("Pod", "app", {"app": "app"}))
    (pod,) = storage.wait_ready("app=app", 1)
    storage.put("hello.txt", "hello\n")
    storage.claim("c", mountpoint="/data", selector={"app": "app"})
    _read(storage, pod, "/dynamic/data/hello.txt", "hello\n")
    dvm = _dvm(storage, "c")
    assert dvm is not None
    dmp = storage.cluster.get("pod", dvm["spec"]["dmpName"], SYSTEM_NAMESPACE)
    size = 128 * 1024 * 1024
    storage.sh(pod, f"head -c {size} /dev/urandom > /dynamic/data/cut.bin")
    # Closed, in rclone's write cache, and being uploaded: the container dies now.
    _kill_container(storage, dmp)
    assert storage.get("hello.txt") == "hello\n"
    try:
        storage.s3.head_object(Bucket=storage.bucket, Key="cut.bin")
        uploaded_before = True
    except storage.s3.exceptions.ClientError:
        uploaded_before = False
    assert not uploaded_before, "the upload finished before the container was killed"

    def restarted() -> bool:
        current = storage.cluster.get("pod", dmp["metadata"]["name"], SYSTEM_NAMESPACE)
        statuses = current["status"].get("containerStatuses") or [{}]
        return bool(statuses[0].get("restartCount", 0) >= 1 and statuses[0].get("ready"))

    wait_for(restarted, 120, "the DMP container runs again")

    def complete() -> bool:
        try:
            head = storage.s3.head_object(Bucket=storage.bucket, Key="cut.bin")
        except storage.s3.exceptions.ClientError:
            return False
        return bool(head["ContentLength"] == size)

    wait_for(complete, 180, "the cut upload is finished after the restart", interval=1.0)
    wait_for(
        lambda: storage.exec(pod, "wc -c < /dynamic/data/cut.bin").stdout.strip() == str(size),
        60, "the pod reads the whole file through the mount again",
    )  # fmt: skip


# -- moving a mountpoint while a pod still writes to the old one (docs/design.md §9.1) ---


def _waiting_for_move(storage: Storage, claim: str) -> str | None:
    """The DynamicVolumeMount's message while the old mount of a move waits, else None."""
    message = str((_files_open_status(storage, claim) or {}).get("message", ""))
    return message if "the mountpoint moved from" in message else None


def test_a_file_open_across_a_move_is_completed_on_the_old_mountpoint(storage: Storage) -> None:
    storage.cluster.apply(storage.workload("Pod", "app", {"app": "app"}))
    (pod,) = storage.wait_ready("app=app", 1)
    storage.put("hello.txt", "hello\n")
    storage.claim("c", mountpoint="/m1", selector={"app": "app"})
    _read(storage, pod, "/dynamic/m1/hello.txt", "hello\n")
    (old_daemon,) = _converged(storage, pod, "c", "/m1", [])
    script = (
        "exec 3> /dynamic/m1/moved.txt && echo part1 >&3 && touch /tmp/opened && sleep 10 "
        "&& echo part2 >&3 && exec 3>&- && echo closed"
    )
    with _in_background(storage, pod, script) as proc:
        wait_for(lambda: storage.exec(pod, "test -e /tmp/opened").returncode == 0, 30, "opened")
        moved = time.monotonic()
        _edit(storage, "c", {"mountpoint": "/m2"})
        message = wait_for(
            lambda: _waiting_for_move(storage, "c"), 30, "the dvm shows Unmounting, FilesOpen"
        )
        assert "/m1 to " in message, message
        assert "(mounted there already)" in message, message
        # The new mountpoint serves while the old one still holds the open file.
        _read(storage, pod, "/dynamic/m2/hello.txt", "hello\n")
        assert proc.poll() is None, "the writer finished before the move was seen"
        assert sorted(set(_pod_mounts(storage, pod))) == ["/dynamic/m1", "/dynamic/m2"]
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert out.strip() == "closed"
    storage.wait_gone(pod, "/dynamic/m1", timeout=60)
    gone_after = time.monotonic() - moved
    assert storage.get("moved.txt") == "part1\npart2\n"
    _read(storage, pod, "/dynamic/m2/moved.txt", "part1\npart2\n")
    _converged(storage, pod, "c", "/m2", [old_daemon])  # the old daemon is gone
    wait_for(
        lambda: (_dvm(storage, "c") or {}).get("status", {}).get("phase") == "Mounted",
        30, "the dvm is Mounted again",
    )  # fmt: skip
    print(f"move with a file open 10 s: /m1 gone from the pod {gone_after:.1f} s after the edit")
