"""Propagation checks over mountinfo: the rshared xvols tree and the slot's kubelet bind."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from dynvol_core.mountinfo import parse_mountinfo
from dynvol_core.paths import XvolsLayout
from dynvol_core.propagation import (
    XvolsRootStatus,
    binding_shares_peer_group,
    slot_binding_problem,
    xvols_root_status,
)

DATA = Path(__file__).parent / "data"
LAYOUT = XvolsLayout("/var/lib/dynamic")
SLOT = LAYOUT.slot(
    "s3-sample", "1f8c3ad2-5b1e-4c4e-9d0a-2f1b7c6e9a10", "0a2b4c6d-8e0f-4123-8456-789abcdef012"
)
OTHER_SLOT = LAYOUT.slot(
    "s3-sample", "2f8c3ad2-5b1e-4c4e-9d0a-2f1b7c6e9a10", "0a2b4c6d-8e0f-4123-8456-789abcdef012"
)
TARGET = "/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/dynamic-volume-root-path/mount"
XVOLS = "/var/lib/dynamic/xvols"


def node(*lines: str) -> str:
    """A node's mount table: private / (as on this machine) plus ``lines``."""
    return "1 0 254:0 / / rw - ext4 /dev/vda rw\n" + "".join(f"{line}\n" for line in lines)


def test_xvols_not_a_mount_point() -> None:
    for text in [node(), node("20 1 0:40 / /var/lib/dynamic/xvols-old rw shared:2 - tmpfs t rw")]:
        assert xvols_root_status(parse_mountinfo(text), XVOLS) == XvolsRootStatus(
            is_mount_point=False,
            shared=False,
            unshared_below=(),
            action="bind-self-then-make-rshared",
        )


def test_xvols_private_mount() -> None:
    entries = parse_mountinfo(node(f"20 1 254:0 {XVOLS} {XVOLS} rw - ext4 /dev/vda rw"))
    status = xvols_root_status(entries, PurePosixPath(XVOLS))
    assert status.is_mount_point
    assert not status.shared
    assert status.action == "make-rshared"


def test_xvols_shared_with_a_private_mount_below() -> None:
    entries = parse_mountinfo(
        node(
            f"20 1 254:0 {XVOLS} {XVOLS} rw shared:5 - ext4 /dev/vda rw",
            f"21 20 254:0 {SLOT.path} {SLOT.path} rw - ext4 /dev/vda rw",
            f"22 21 0:41 / {SLOT.path}/data rw shared:6 - fuse.s3fs s3fs rw",
        )
    )
    status = xvols_root_status(entries, XVOLS)
    assert status.shared
    assert status.unshared_below == (str(SLOT.path),)
    assert status.action == "make-rshared"


def test_xvols_rshared_is_ok_and_stacking_counts_the_top() -> None:
    shared = f"20 1 254:0 {XVOLS} {XVOLS} rw shared:5 - ext4 /dev/vda rw"
    entries = parse_mountinfo(
        node(shared, f"21 20 0:41 / {XVOLS}/s3-sample/x rw shared:6 - t t rw")
    )
    assert xvols_root_status(entries, XVOLS).action == "ok"
    covered = parse_mountinfo(node(shared, f"21 20 0:42 / {XVOLS} rw - tmpfs t rw"))
    assert xvols_root_status(covered, XVOLS).action == "make-rshared"


def test_captured_tables() -> None:
    # This machine: "/" private, no xvols.
    host = parse_mountinfo((DATA / "mountinfo-host.txt").read_text())
    assert xvols_root_status(host, XVOLS).action == "bind-self-then-make-rshared"
    # A real self-bound, rshared directory with a tmpfs below, bound elsewhere and stacked.
    ns = parse_mountinfo((DATA / "mountinfo-rshared-ns.txt").read_text())
    base = "/tmp/mi.2kMk"
    assert xvols_root_status(ns, f"{base}/xvols").action == "ok"
    assert xvols_root_status(ns, f"{base}/back\\slash").action == "make-rshared"
    assert binding_shares_peer_group(ns, f"{base}/xvols/with space", f"{base}/target")
    assert not binding_shares_peer_group(ns, f"{base}/xvols", f"{base}/slave")  # a slave copy
    assert not binding_shares_peer_group(ns, f"{base}/xvols/with space", f"{base}/slave")


def bound(target_root: str, peer: str = "shared:5", device: str = "254:0") -> str:
    return node(
        f"20 1 254:0 {XVOLS} {XVOLS} rw shared:5 - ext4 /dev/vda rw",
        f"30 1 {device} {target_root} {TARGET} rw {peer} - ext4 /dev/vda rw",
    )


def test_binding_of_the_slot_shares_its_peer_group() -> None:
    entries = parse_mountinfo(bound(str(SLOT.path)))
    assert slot_binding_problem(entries, SLOT, TARGET) is None
    assert binding_shares_peer_group(entries, SLOT.path, PurePosixPath(TARGET))


def test_binding_problems() -> None:
    cases = {
        "is not a mount point": node(f"20 1 254:0 {XVOLS} {XVOLS} rw shared:5 - ext4 /dev/vda rw"),
        "is not a shared mount": bound(str(SLOT.path), peer="master:5"),
        "is in peer group 6": bound(str(SLOT.path), peer="shared:6"),
        "device": bound(str(SLOT.path), device="254:1"),
        "not the slot's directory": bound(str(OTHER_SLOT.path)),
        "no mount holds": f"30 1 254:0 {SLOT.path} {TARGET} rw shared:5 - ext4 /dev/vda rw\n",
    }
    for problem, text in cases.items():
        entries = parse_mountinfo(text)
        found = slot_binding_problem(entries, SLOT, TARGET)
        assert found is not None
        assert problem in found, (problem, found)
        assert not binding_shares_peer_group(entries, SLOT, TARGET)


def test_binding_of_a_self_bound_slot() -> None:
    # The node plugin may bind the slot onto itself first; the bind then shows its root.
    entries = parse_mountinfo(
        node(
            f"20 1 254:0 {XVOLS} {XVOLS} rw shared:5 - ext4 /dev/vda rw",
            f"21 20 254:0 {SLOT.path} {SLOT.path} rw shared:8 - ext4 /dev/vda rw",
            f"30 1 254:0 {SLOT.path} {TARGET} rw shared:8 - ext4 /dev/vda rw",
        )
    )
    assert binding_shares_peer_group(entries, SLOT, TARGET)
