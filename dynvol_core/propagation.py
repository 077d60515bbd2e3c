"""Checks over the mount table that mounts will propagate the way dynvol relies on.

A mount made in a DMP reaches a pod only if the host's ``xvols`` tree is an rshared mount
and kubelet's target path is a bind of the pod's slot in the same peer group (docs/design.md
§1). The CSI node plugin checks both at start-up and on every publish, and does what
:func:`xvols_root_status` says; these functions only read parsed mountinfo.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Literal

import attrs

from dynvol_core.mountinfo import MountEntry, entries_under, mount_containing, topmost_at
from dynvol_core.paths import PodSlot

__all__ = [
    "XvolsAction",
    "XvolsRootStatus",
    "binding_shares_peer_group",
    "slot_binding_problem",
    "xvols_root_status",
]

#: What the node plugin must do to the xvols directory:
#: ``bind-self-then-make-rshared`` (``mount --bind D D && mount --make-rshared D``),
#: ``make-rshared`` (``mount --make-rshared D``) or ``ok`` (nothing).
XvolsAction = Literal["bind-self-then-make-rshared", "make-rshared", "ok"]


@attrs.frozen(kw_only=True)
class XvolsRootStatus:
    """How the xvols directory is mounted, and what to do about it."""

    #: Whether a mount sits at the directory itself.
    is_mount_point: bool
    #: Whether that mount (the topmost one) is shared.
    shared: bool
    #: Visible mounts below the directory that are not shared, so mounts below them would
    #: not propagate; ``make-rshared`` fixes them.
    unshared_below: tuple[str, ...]
    action: XvolsAction


def xvols_root_status(
    entries: Sequence[MountEntry], xvols_dir: str | PurePosixPath
) -> XvolsRootStatus:
    """Whether ``xvols_dir`` is its own rshared mount, and the action that makes it one.

    The directory must be a mount point of its own (even where ``/`` is shared, as on a
    real node) so that its propagation does not depend on the host's.
    """
    top = topmost_at(entries, xvols_dir)
    if top is None:
        return XvolsRootStatus(
            is_mount_point=False,
            shared=False,
            unshared_below=(),
            action="bind-self-then-make-rshared",
        )
    below = {entry.mount_point for entry in entries_under(entries, xvols_dir)}
    unshared = tuple(
        sorted(
            point
            for point in below
            if (visible := topmost_at(entries, point)) is not None and not visible.is_shared
        )
    )
    return XvolsRootStatus(
        is_mount_point=True,
        shared=top.is_shared,
        unshared_below=unshared,
        action="ok" if top.is_shared and not unshared else "make-rshared",
    )


def slot_binding_problem(
    entries: Sequence[MountEntry],
    slot: PodSlot | str | PurePosixPath,
    target: str | PurePosixPath,
) -> str | None:
    """Why mounts in ``slot`` would not propagate to kubelet's ``target``, or None if they do.

    They do when ``target`` is a shared mount in the same peer group as the mount holding
    the slot, of the same device, showing exactly the slot's directory (a bind of another
    slot is in the same peer group too, but shows the wrong files).
    """
    slot_path = slot.path if isinstance(slot, PodSlot) else PurePosixPath(slot)
    bind = topmost_at(entries, target)
    if bind is None:
        return f"{target} is not a mount point"
    if bind.shared_peer_group is None:
        return f"{target} is not a shared mount"
    holder = mount_containing(entries, slot_path)
    if holder is None:
        return f"no mount holds the slot {slot_path}"
    if holder.shared_peer_group != bind.shared_peer_group:
        return (
            f"{target} is in peer group {bind.shared_peer_group}, the slot's mount "
            f"{holder.mount_point} is in {holder.shared_peer_group}"
        )
    if (holder.major, holder.minor) != (bind.major, bind.minor):
        return f"{target} is on device {bind.major}:{bind.minor}, the slot is not"
    expected_root = PurePosixPath(holder.root) / slot_path.relative_to(holder.path)
    if PurePosixPath(bind.root) != expected_root:
        return f"{target} shows {bind.root}, not the slot's directory {expected_root}"
    return None


def binding_shares_peer_group(
    entries: Sequence[MountEntry],
    slot: PodSlot | str | PurePosixPath,
    target: str | PurePosixPath,
) -> bool:
    """Whether kubelet's ``target`` is a bind of ``slot`` sharing its peer group, so that
    mounts made in the slot later propagate to the pod. See :func:`slot_binding_problem`."""
    return slot_binding_problem(entries, slot, target) is None
