"""Mount operations of the node plugin: bind mounts, propagation, lazy unmounts.

The calls go straight to mount(2) and umount2(2) through ctypes rather than through
util-linux's mount(8): a publish needs one or two mount calls and an unpublish one per
mount point, and fork+exec of mount(8) costs a few milliseconds each (it also parses
fstab and updates utab), whereas the syscall takes microseconds and returns the errno we
need to decide what happened (EINVAL: not a mount point, ENOENT: gone). Bind mounts need
no helper program, so nothing of mount(8) is lost.

Every function here blocks; the node service calls them from worker threads. Mount table
reads go through :mod:`dynvol_core.mountinfo`. Neighbours: ``volumes`` decides what to
mount and unmount; ``server`` makes the xvols root rshared at start-up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Final

from dynvol_core.errors import DynvolError
from dynvol_core.mountinfo import MountEntry, entries_under, escape_field, parse_mountinfo

__all__ = [
    "MountFailed",
    "bind",
    "ensure_read_only",
    "ensure_rshared_mount",
    "lazy_unmount",
    "mounted_under",
    "read_mountinfo",
]

# From <sys/mount.h>; these values are the same on every Linux architecture.
MS_RDONLY: Final = 0x1
MS_NOSUID: Final = 0x2
MS_NODEV: Final = 0x4
MS_NOEXEC: Final = 0x8
MS_REMOUNT: Final = 0x20
MS_NOATIME: Final = 0x400
MS_NODIRATIME: Final = 0x800
MS_BIND: Final = 0x1000
MS_REC: Final = 0x4000
MS_RELATIME: Final = 0x200000
MS_SHARED: Final = 0x100000
MNT_DETACH: Final = 0x2
UMOUNT_NOFOLLOW: Final = 0x8

# statvfs(3) f_flag bits that a read-only remount of a bind must keep: a bind remount
# replaces the per-mount flags, and dropping a locked one (nosuid on a mount inherited from
# a more privileged namespace) fails with EPERM.
_KEPT_FLAGS: Final = (
    (os.ST_NOSUID, MS_NOSUID),
    (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_NOATIME, MS_NOATIME),
    (os.ST_NODIRATIME, MS_NODIRATIME),
    (os.ST_RELATIME, MS_RELATIME),
)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = (
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
)
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.umount2.restype = ctypes.c_int

_MOUNTINFO: Final = Path("/proc/self/mountinfo")


class MountFailed(DynvolError):
    """A mount(2) or umount2(2) call failed; ``errno`` says why."""

    def __init__(self, operation: str, path: str, err: int) -> None:
        self.operation = operation
        self.path = path
        self.errno = err
        super().__init__(f"{operation} {path}: {os.strerror(err)} (errno {err})")


def _encode(path: str | PurePosixPath | None) -> bytes | None:
    return None if path is None else os.fsencode(str(path))


def _mount(
    source: str | PurePosixPath | None,
    target: str | PurePosixPath,
    flags: int,
    *,
    operation: str,
) -> None:
    if _libc.mount(_encode(source), _encode(target), None, flags, None) != 0:
        raise MountFailed(operation, str(target), ctypes.get_errno())


def bind(source: PurePosixPath, target: PurePosixPath, *, read_only: bool) -> None:
    """Bind ``source`` (with its sub-mounts) onto ``target``, read-only if asked.

    If ``source`` lies on a shared mount the new mount joins its peer group, which is what
    makes later sub-mounts of the source appear at the target. A read-only bind is made
    read-only by a second, remount call (the kernel ignores MS_RDONLY on the first); it is
    not recursive, so sub-mounts keep their own flags.

    :raises MountFailed: if either call fails; after a failed remount the bind is undone.
    """
    _mount(source, target, MS_BIND | MS_REC, operation=f"bind {source} onto")
    if not read_only:
        return
    try:
        _remount_read_only(target)
    except BaseException:
        lazy_unmount(target)
        raise


def _remount_read_only(target: PurePosixPath) -> None:
    # MS_REMOUNT|MS_BIND changes only the per-mount flags of the mount at target; the
    # mount keeps its peer group, so sub-mounts of its source still propagate into it.
    kept = os.statvfs(target).f_flag
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY
    for st_flag, ms_flag in _KEPT_FLAGS:
        if kept & st_flag:
            flags |= ms_flag
    _mount(None, target, flags, operation="remount read-only")


def ensure_read_only(target: PurePosixPath) -> bool:
    """Make the mount at ``target`` read-only if it is not; True if it had to be changed.

    :raises MountFailed: if the remount fails.
    """
    if os.statvfs(target).f_flag & os.ST_RDONLY:
        return False
    _remount_read_only(target)
    return True


def make_rshared(path: PurePosixPath) -> None:
    """Give the mount at ``path`` and every mount below it shared propagation."""
    _mount(None, path, MS_SHARED | MS_REC, operation="make rshared")


def lazy_unmount(path: str | PurePosixPath) -> bool:
    """Detach the mount at ``path`` (``umount -l``); the unmount propagates to its peers.

    :returns: True if something was unmounted, False if ``path`` was not a mount point or
        does not exist (both are success for a caller that wants it gone).
    :raises MountFailed: for any other error.
    """
    if _libc.umount2(_encode(path), MNT_DETACH | UMOUNT_NOFOLLOW) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    raise MountFailed("unmount", str(path), err)


def read_mountinfo(*, mentioning: Iterable[PurePosixPath] = ()) -> tuple[MountEntry, ...]:
    """The mount table of this process's mount namespace.

    :param mentioning: if given, only lines that contain one of these paths (as the kernel
        escapes them) are parsed. A node has hundreds of mounts and an unpublish only cares
        about those at or below two paths; skipping the rest keeps it cheap. The caller
        still filters the result by mount point.
    """
    text = _MOUNTINFO.read_text(encoding="utf-8", errors="surrogateescape")
    needles = [escape_field(str(path)) for path in mentioning]
    if needles:
        text = "\n".join(
            line for line in text.split("\n") if any(needle in line for needle in needles)
        )
    return parse_mountinfo(text)


def ensure_rshared_mount(path: PurePosixPath) -> bool:
    """Make ``path`` an rshared mount point, binding it onto itself first if it is none.

    Idempotent: a second call finds the mount point and only re-applies the propagation.

    :returns: True if a self-bind was made.
    """
    entries = read_mountinfo()
    is_mount_point = any(entry.path == path for entry in entries)
    made = False
    if not is_mount_point:
        _mount(path, path, MS_BIND | MS_REC, operation=f"bind {path} onto")
        made = True
    make_rshared(path)
    return made


def mounted_under(entries: Iterable[MountEntry], path: PurePosixPath) -> bool:
    """Whether any mount point is at or below ``path``."""
    return bool(entries_under(entries, path, include_self=True))
