"""Mount targets opened without following symbolic links (docs/design.md §6.2).

A mount target lies inside a pod's slot, a directory the pod must not be able to steer.
A path is text, and the kernel would follow any symbolic link along it, so a link planted
at ``data`` would move a mount of ``/xvols/data`` onto ``/etc`` of the mount pod. Here a
target is reached one name at a time from a directory the agent trusts (``--xvols``):
each name is opened relative to its parent's descriptor with
``O_PATH | O_NOFOLLOW | O_DIRECTORY``, so a symbolic link (dangling or not), a file or
anything else that is not a directory stops the walk with :class:`UnsafeTarget`, and a
missing directory is made with ``mkdirat`` relative to its parent's descriptor and then
opened the same way (a link swapped in meanwhile is still refused).

The result is a descriptor of the target directory itself. No mounter is given a path in
the slot: each mounts at a private staging directory, and the host binds that mount onto
``/proc/self/fd/N``, which the kernel resolves to exactly this directory
(:meth:`dynvol_providers.hosting.LocalHost.attach`). Handing ``/proc/self/fd/N`` to the
mounters themselves does not do that: libfuse (s3fs) turns it back into a path with
realpath(3) before mount(2), and rclone passes it to fusermount, a process of its own.
The agent then checks, from the mount table, that the mount landed exactly at the planned
path (:func:`dynvol_core.mountinfo.landing_of`), and undoes it otherwise.

Neighbours: :mod:`dynvol_dmp.agent` (the caller), :func:`dynvol_core.paths.components_below`
(the names of a target below its root).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import PurePosixPath
from typing import Final

from dynvol_core.errors import DynvolError, InvalidPath
from dynvol_core.paths import components_below

__all__ = [
    "REASON_UNSAFE",
    "OpenTarget",
    "UnsafeTarget",
    "open_below",
    "open_parent",
    "remove_dir_below",
]

#: The reason (Events, conditions) for a target that cannot be used safely.
REASON_UNSAFE: Final = "UnsafeMountTarget"

_DIR_FLAGS: Final = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC


class UnsafeTarget(DynvolError):
    """A mount target cannot be reached without following a link or crossing a non-directory."""


class OpenTarget:
    """An O_PATH descriptor of a target directory, and the path it was reached by.

    Close it (or use it as a context manager) once the mount is made and checked.
    """

    def __init__(self, path: PurePosixPath, fd: int) -> None:
        self.path = path
        self.fd = fd

    @property
    def fd_path(self) -> str:
        """The descriptor as a path: the kernel resolves it to exactly this directory."""
        return f"/proc/self/fd/{self.fd}"

    def same_directory_as(self, path: str | PurePosixPath) -> bool:
        """Whether ``path`` (not followed if a link) is still the directory opened."""
        try:
            now = os.lstat(path)
        except OSError:
            return False
        mine = os.fstat(self.fd)
        return stat.S_ISDIR(now.st_mode) and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OpenTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _names(root: PurePosixPath, target: str | PurePosixPath) -> tuple[str, ...]:
    try:
        return components_below(target, root)
    except InvalidPath as exc:
        raise UnsafeTarget(str(exc)) from None


def _refusal(shown: PurePosixPath, parent_fd: int, name: str, exc: OSError) -> UnsafeTarget:
    """Say what is in the way at ``shown`` (looked at without following it)."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except OSError:
        return UnsafeTarget(f"cannot open {shown}: {exc.strerror}")
    if stat.S_ISLNK(st.st_mode):
        try:
            where = os.readlink(name, dir_fd=parent_fd)
        except OSError:
            where = "?"
        return UnsafeTarget(
            f"{shown} is a symbolic link (to {where!r}); mount targets are never reached "
            "through symbolic links. Remove the link or choose another mountpoint"
        )
    return UnsafeTarget(
        f"{shown} exists and is not a directory; remove it or choose another mountpoint"
    )


def _open_dir(parent_fd: int, name: str, shown: PurePosixPath, *, create: bool) -> int:
    for _ in range(2):
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            if not create:
                raise UnsafeTarget(f"{shown} does not exist") from None
            # Made relative to the parent's descriptor: a parent swapped for a link since
            # it was opened does not matter. An entry that appears meanwhile is opened
            # (and judged) like any other on the next turn.
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                raise _refusal(shown, parent_fd, name, exc) from None
            raise UnsafeTarget(f"cannot open {shown}: {exc.strerror}") from None
    raise UnsafeTarget(f"{shown} keeps disappearing while it is being opened")


@contextlib.contextmanager
def _closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _walk(root: PurePosixPath, names: Sequence[str], *, create_from: int) -> int:
    """Open ``root`` (trusted: ``--xvols``), then each of ``names`` below it in turn."""
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    shown = root
    try:
        for index, name in enumerate(names):
            shown = shown / name
            next_fd = _open_dir(fd, name, shown, create=index >= create_from)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_below(
    root: PurePosixPath, target: str | PurePosixPath, *, create_from: int | None = 0
) -> OpenTarget:
    """Open ``target``, a directory strictly below ``root``, without following any link.

    :param create_from: names from this index on are made when missing (mode 0755);
        ``None`` makes none. A shared mount pod passes the length of the slot's part
        (``<slot-uuid>/<podUID>``): the slot must exist, only the mountpoint is made.
    :raises UnsafeTarget: a component is a link or not a directory, a component that may
        not be made is missing, or ``target`` is not a plain path below ``root``.
    """
    names = _names(root, target)
    limit = len(names) if create_from is None else create_from
    return OpenTarget(PurePosixPath(target), _walk(root, names, create_from=limit))


def open_parent(root: PurePosixPath, target: PurePosixPath) -> tuple[int, str]:
    """A descriptor of ``target``'s parent (reached without links) and ``target``'s name.

    :raises UnsafeTarget: as :func:`open_below` (nothing is created).
    """
    names = _names(root, target)
    return _walk(root, names[:-1], create_from=len(names)), names[-1]


def remove_dir_below(root: PurePosixPath, target: PurePosixPath) -> bool:
    """Remove the empty directory ``target`` (below ``root``) without following links.

    :returns: True if it was removed; False if it is gone, not empty, a mount point, or
        cannot be reached without following a link (then it is left alone).
    """
    try:
        parent_fd, name = open_parent(root, target)
    except UnsafeTarget:
        return False
    with _closing(parent_fd):
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                return False
            os.rmdir(name, dir_fd=parent_fd)
        except OSError:
            return False
    return True
