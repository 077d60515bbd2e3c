"""A :class:`~dynvol_providers.base.MountHost` for this machine: real processes, real mounts.

:class:`LocalHost` starts mounters with asyncio subprocesses and waits for every one of
them, so nothing it starts is ever left unreaped. It learns about mount table changes from
``/proc/self/mountinfo`` through epoll (the kernel flags the file with ``EPOLLPRI`` on each
change), so waiting for a daemon's mount costs no polling. Its owner (the DMP agent, or the
conformance kit) passes ``on_daemon_exit`` to hear about daemons that die by themselves and
decides what to do about it: restart policy does not live here.

Paths into a pod's slot are not trusted (docs/design.md §6.2): :meth:`LocalHost.unmount` walks
to a mount point without following links, and :meth:`LocalHost.attach` lets the owner move
a mount made at a private staging directory onto a directory it opened itself, by
descriptor, so that no path in the slot is resolved after the owner checked it.

Neighbours: :mod:`dynvol_providers.base` (the contract), :mod:`dynvol_dmp` (the owner in
production).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import posixpath
import select
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import PurePosixPath

import attrs

from dynvol_core.mountinfo import MountEntry, parse_mountinfo, topmost_at
from dynvol_providers.base import (
    CommandResult,
    CommandSpec,
    DaemonHandle,
    DaemonSpec,
    FileSpec,
    Health,
    HealthState,
    MountFailed,
    Reason,
)

__all__ = ["LocalHost", "MountTableWatch", "read_mount_table", "redact"]

log = logging.getLogger(__name__)

_MNT_DETACH = 2
_UMOUNT_NOFOLLOW = 8
_MOUNTINFO = "/proc/self/mountinfo"
_OUTPUT_LINES = 40
#: Looked up in a new mount to see that the backend answers (see LocalHost._answers).
_PROBE_NAME = ".dynvol-ready-probe"
_MS_BIND = 0x1000


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret value replaced by ``***``."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    return text


def read_mount_table() -> tuple[MountEntry, ...]:
    """This process's mount table."""
    with open(_MOUNTINFO, encoding="utf-8", errors="surrogateescape") as fh:
        return parse_mountinfo(fh.read())


def _mount_at(target: PurePosixPath) -> MountEntry | None:
    """The top-most mount at ``target`` (the last one listed wins)."""
    return topmost_at(read_mount_table(), target)


class MountTableWatch:
    """Wakes waiters when this process's mount table changes (epoll on mountinfo)."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._epoll: select.epoll | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()

    def _ensure_started(self) -> None:
        if self._epoll is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._fd = os.open(_MOUNTINFO, os.O_RDONLY | os.O_CLOEXEC)
        # Only EPOLLPRI: the file is always "readable", the priority flag marks a change.
        self._epoll = select.epoll()
        self._epoll.register(self._fd, select.EPOLLPRI)
        self._loop.add_reader(self._epoll.fileno(), self._on_change)

    def _on_change(self) -> None:
        assert self._epoll is not None
        self._epoll.poll(0)
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def changed(self) -> asyncio.Event:
        """An event set at the next change of the mount table."""
        self._ensure_started()
        return self._changed

    def close(self) -> None:
        if self._epoll is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
        if self._fd is not None:
            os.close(self._fd)
        self._epoll = None
        self._fd = None


_libc: ctypes.CDLL | None = None


def _libc_handle() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _bind_onto_fd(source: str, target_fd: int) -> int:
    """mount(2) ``source`` (bind) onto the directory ``target_fd`` holds; 0 or the errno.

    The target is named ``/proc/self/fd/N``: the kernel resolves that to exactly the
    descriptor's directory, whatever the path to it has become since it was opened.
    """
    libc = _libc_handle()
    target = f"/proc/self/fd/{target_fd}".encode()
    if libc.mount(os.fsencode(source), target, None, ctypes.c_ulong(_MS_BIND), None) == 0:
        return 0
    return ctypes.get_errno()


def _umount2(target: str, flags: int) -> int:
    """umount2(2) of ``target`` without following a symbolic link anywhere on its path.

    The parent directory is reached one name at a time from ``/`` with ``O_NOFOLLOW``, and
    the mount point is then named through that descriptor (``/proc/self/fd/N/name``) with
    ``UMOUNT_NOFOLLOW``: a link planted at any component (one that would lead to the mount
    pod's own ``/etc``) makes this fail with ELOOP or ENOTDIR instead of unmounting whatever
    the link points at. Returns 0 or the errno.
    """
    libc = _libc_handle()
    try:
        parent_fd, name = _open_parent(target)
    except OSError as exc:
        return exc.errno or errno.EINVAL
    try:
        path = f"/proc/self/fd/{parent_fd}/{name}"
        if libc.umount2(os.fsencode(path), flags | _UMOUNT_NOFOLLOW) == 0:
            return 0
        return ctypes.get_errno()
    finally:
        os.close(parent_fd)


def _open_parent(path: str) -> tuple[int, str]:
    """An O_PATH descriptor of ``path``'s parent, reached without following links, and the
    last name. ``path`` is absolute and normalised, as mountinfo lists mount points.

    :raises OSError: ELOOP or ENOTDIR for a link or a non-directory on the way, EINVAL for a
        path that is not absolute and normal.
    """
    names = path.split("/")
    if names[0] != "" or any(name in ("", ".", "..") for name in names[1:]):
        raise OSError(errno.EINVAL, f"{path!r} is not a normalised absolute path")
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in names[1:-1]:
            next_fd = os.open(
                name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd
            )
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd, names[-1]


@attrs.define
class _Daemon:
    handle: DaemonHandle
    target: PurePosixPath
    process: asyncio.subprocess.Process
    output: collections.deque[str]
    secrets: frozenset[str]
    done: asyncio.Task[int]
    stopping: bool = False


DaemonExitCallback = Callable[[DaemonHandle, int], None]


@attrs.define
class LocalHost:
    """Runs mounters as children of this process and mounts in its mount namespace.

    :param on_daemon_exit: called (in the event loop) with the handle and exit status of
        a daemon that exited without :meth:`stop_daemon` having been called.
    """

    on_daemon_exit: DaemonExitCallback | None = None
    unmount_grace: float = 2.0
    #: Seconds a stat of a mount point may take before the mount counts as stale.
    probe_limit: float = 5.0
    _daemons: dict[int, _Daemon] = attrs.field(factory=dict, init=False)
    _watch: MountTableWatch = attrs.field(factory=MountTableWatch, init=False)
    #: Mounts made at a staging directory and then attached elsewhere: staging -> where.
    _attached: dict[PurePosixPath, PurePosixPath] = attrs.field(factory=dict, init=False)

    # -- mounts made at a staging directory ---------------------------------------------

    async def attach(self, staging: PurePosixPath, target_fd: int, target: PurePosixPath) -> None:
        """Move the mount at ``staging`` onto the directory ``target_fd`` holds (``target``).

        The owner (the DMP agent) has a provider mount at a staging directory of its own,
        which no pod can reach, and opened ``target`` without following links. The mount
        is bound onto the descriptor (so no path is resolved again: a link swapped in on
        the way since does not matter) and the staging mount is detached. From then on
        ``staging`` in :meth:`unmount` and :meth:`probe` means ``target``: providers keep
        their handles as they made them.

        :raises OSError: if the bind fails; the staging mount is then left as it is.
        """
        source = str(_canonical(staging))
        err = await asyncio.to_thread(_bind_onto_fd, source, target_fd)
        if err:
            raise OSError(err, f"cannot attach the mount at {source} to {target}: "
                               f"{os.strerror(err)}")  # fmt: skip
        self._attached[_canonical(staging)] = _canonical(target)
        await asyncio.to_thread(_umount2, source, _MNT_DETACH)

    def _where(self, path: PurePosixPath | str) -> PurePosixPath:
        canonical = _canonical(path)
        return self._attached.get(canonical, canonical)

    # -- processes ----------------------------------------------------------------------

    @staticmethod
    def _environment(spec: CommandSpec) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in spec.unset_env}
        env.update(spec.env)
        return env

    @staticmethod
    def _write_files(files: Iterable[FileSpec]) -> None:
        for file in files:
            os.makedirs(file.path.parent, mode=0o700, exist_ok=True)
            fd = os.open(file.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, file.mode)
            try:
                # The mode given to open() is filtered by the umask; make it exact.
                os.fchmod(fd, file.mode)
                os.write(fd, file.content)
            finally:
                os.close(fd)

    async def _spawn(self, spec: CommandSpec) -> asyncio.subprocess.Process:
        self._write_files(spec.files)
        try:
            return await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self._environment(spec),
                start_new_session=True,
            )
        except FileNotFoundError:
            raise MountFailed(
                Reason.MOUNTER_MISSING,
                f"{spec.argv[0]} is not installed where dynvol mounts (the mount pod image); "
                f"install it or choose another mounter",
                retryable=False,
            ) from None

    async def run(self, spec: CommandSpec) -> CommandResult:
        """Run ``spec`` to completion; kill and reap it after ``spec.timeout`` seconds."""
        proc = await self._spawn(spec)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), spec.timeout)
        except TimeoutError:
            proc.kill()
            out, _ = await proc.communicate()
            text = redact(out.decode(errors="replace"), spec.secrets)
            return CommandResult(
                returncode=-signal.SIGKILL,
                output=f"timed out after {spec.timeout:.0f}s\n{text}",
            )
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode is not None
        return CommandResult(
            returncode=proc.returncode, output=redact(out.decode(errors="replace"), spec.secrets)
        )

    async def _collect_output(
        self,
        daemon_name: str,
        proc: asyncio.subprocess.Process,
        sink: collections.deque[str],
        secrets: frozenset[str],
    ) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = redact(raw.decode(errors="replace").rstrip(), secrets)
            sink.append(line)
            log.debug("%s: %s", daemon_name, line)

    async def _supervise(
        self,
        daemon_name: str,
        proc: asyncio.subprocess.Process,
        sink: collections.deque[str],
        secrets: frozenset[str],
    ) -> int:
        reader = asyncio.create_task(self._collect_output(daemon_name, proc, sink, secrets))
        try:
            status = await proc.wait()
        finally:
            # The daemon may have left a grandchild holding the pipe; do not wait for it.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(reader), 1.0)
            reader.cancel()
        daemon = self._daemons.pop(proc.pid, None)
        if daemon is not None and not daemon.stopping:
            log.warning("%s (pid %d) exited with status %d", daemon_name, proc.pid, status)
            if self.on_daemon_exit is not None:
                self.on_daemon_exit(daemon.handle, status)
        return status

    async def start_daemon(self, spec: DaemonSpec) -> DaemonHandle:
        if spec.preflight is not None:
            result = await self.run(spec.preflight)
            if result.returncode != 0:
                raise MountFailed(
                    Reason.MOUNT_FAILED,
                    f"{spec.preflight.argv[0]} could not reach the storage: {_tail(result.output)}",
                )
        target = _canonical(spec.target)
        self._attached.pop(target, None)  # a new mount there, not attached (yet)
        await asyncio.to_thread(os.makedirs, target, exist_ok=True)
        proc = await self._spawn(spec.command)
        handle = DaemonHandle(pid=proc.pid, argv=spec.command.argv)
        name = f"{os.path.basename(spec.command.argv[0])}[{proc.pid}]"
        output: collections.deque[str] = collections.deque(maxlen=_OUTPUT_LINES)
        done = asyncio.create_task(self._supervise(name, proc, output, spec.command.secrets))
        daemon = _Daemon(
            handle=handle,
            target=target,
            process=proc,
            output=output,
            secrets=spec.command.secrets,
            done=done,
        )
        self._daemons[proc.pid] = daemon
        deadline = time.monotonic() + spec.ready_timeout
        try:
            while True:
                changed = self._watch.changed()
                entry = _mount_at(target)
                if entry is not None and entry.fs_type == spec.fs_type:
                    if await self._answers(target, entry, deadline, done):
                        return handle
                    if not done.done() and time.monotonic() < deadline:
                        continue
                if done.done():
                    name = os.path.basename(spec.command.argv[0])
                    raise MountFailed(
                        Reason.MOUNTER_EXITED,
                        f"{name} exited with status {done.result()} before its mount was "
                        f"usable: {_tail(chr(10).join(output))}",
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MountFailed(
                        Reason.MOUNT_TIMEOUT,
                        f"{os.path.basename(spec.command.argv[0])} did not mount within "
                        f"{spec.ready_timeout:.0f}s: {_tail(chr(10).join(output))}",
                    )
                waiters = {asyncio.ensure_future(changed.wait()), done}
                try:
                    await asyncio.wait(
                        waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    for waiter in waiters:
                        if waiter is not done:
                            waiter.cancel()
        except BaseException:
            await self.stop_daemon(handle, kill_after=2.0)
            await self.unmount(target, lazy=True)
            raise

    @staticmethod
    async def _answers(
        target: PurePosixPath, entry: MountEntry, deadline: float, done: asyncio.Task[int]
    ) -> bool:
        """Whether the new mount (``entry``, at ``target``) serves requests from its backend.

        Some mounters (s3fs) mount first, check the bucket in their FUSE init and exit if
        that fails; until they have exited, the mount is there. A stat of the mount's root
        does not prove anything (s3fs answers it without asking S3), so the probe also
        looks up a name that does not exist, which the mounter must ask the backend about:
        the answer must be "no such file" (or the file). Refused credentials give another
        error. False once the daemon has exited (its output says why).

        The lookup goes through a descriptor of the mount's root, checked to be on the
        mount's device: a mounter that unmounts itself between the mount-table read and
        the probe (s3fs unmounts before its process ends) leaves the bare directory, whose
        "no such file" proves nothing.
        """

        def probe() -> bool:
            fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                if (os.major(st.st_dev), os.minor(st.st_dev)) != (entry.major, entry.minor):
                    return False
                with contextlib.suppress(FileNotFoundError):
                    os.stat(_PROBE_NAME, dir_fd=fd)
                return True
            finally:
                os.close(fd)

        try:
            answered = await asyncio.wait_for(
                asyncio.to_thread(probe), max(deadline - time.monotonic(), 0.1)
            )
        except (OSError, TimeoutError):
            answered = False
        if not answered:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), 2.0)
            return False
        return not done.done()

    async def stop_daemon(self, handle: DaemonHandle, *, kill_after: float = 10.0) -> None:
        daemon = self._daemons.get(handle.pid)
        if daemon is None:
            return
        daemon.stopping = True
        proc = daemon.process
        # A FUSE daemon exits by itself once unmounted: give it a moment first.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(daemon.done), self.unmount_grace)
        if not daemon.done.done():
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(asyncio.shield(daemon.done), kill_after)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        await daemon.done

    def daemons(self) -> tuple[DaemonHandle, ...]:
        """The daemons started here and still running."""
        return tuple(d.handle for d in self._daemons.values())

    def daemon_output(self, handle: DaemonHandle) -> str:
        """The last lines the daemon printed (redacted)."""
        daemon = self._daemons.get(handle.pid)
        return "\n".join(daemon.output) if daemon is not None else ""

    async def close(self) -> None:
        """Stop every daemon still running (without unmounting) and stop watching."""
        for handle in self.daemons():
            await self.stop_daemon(handle, kill_after=5.0)
        self._watch.close()

    # -- the mount table ----------------------------------------------------------------

    def mount_table_changed(self) -> asyncio.Event:
        """An event set at the next change of this process's mount table."""
        return self._watch.changed()

    async def unmount(self, target: PurePosixPath, *, lazy: bool = False) -> None:
        """Unmount every mount stacked at ``target``; busy or stale ones lazily.

        No symbolic link is followed on the way (see :func:`_umount2`). ``target`` may be
        a staging directory whose mount was attached elsewhere (:meth:`attach`).
        """
        staging = _canonical(target)
        path = str(self._where(staging))
        # A FUSE daemon exits once its mount is gone: that exit is expected, not a crash.
        for daemon in self._daemons.values():
            if str(self._where(daemon.target)) == path:
                daemon.stopping = True
        for _ in range(16):
            if _mount_at(PurePosixPath(path)) is None:
                self._attached.pop(staging, None)
                return
            flags = _MNT_DETACH if lazy else 0
            err = await asyncio.to_thread(_umount2, path, flags)
            if err in (errno.EBUSY, errno.ENOTCONN, errno.EIO) and not lazy:
                err = await asyncio.to_thread(_umount2, path, _MNT_DETACH)
            if err in (0, errno.EINVAL, errno.ENOENT):
                continue
            raise OSError(err, f"cannot unmount {path}: {os.strerror(err)}")
        raise OSError(errno.EBUSY, f"{path} stays mounted after repeated unmounts")

    async def unmount_if_idle(self, target: PurePosixPath) -> bool:
        """Unmount what is mounted at ``target`` only if nothing uses it (no ``MNT_DETACH``).

        The kernel refuses (EBUSY) while a process, in any mount namespace the mount
        propagated to, has a file open or its working directory on it: that is how the
        owner tells that a pod still uses a mount. No link is followed (see :func:`_umount2`).

        :returns: True if nothing is mounted there any more; False if it is in use.
        :raises OSError: for any other failure.
        """
        path = str(self._where(_canonical(target)))
        if _mount_at(PurePosixPath(path)) is None:
            return True
        daemons = [d for d in self._daemons.values() if str(self._where(d.target)) == path]
        for daemon in daemons:
            daemon.stopping = True  # its exit after a successful unmount is expected
        err = await asyncio.to_thread(_umount2, path, 0)
        if err in (0, errno.EINVAL, errno.ENOENT):
            return _mount_at(PurePosixPath(path)) is None
        for daemon in daemons:
            daemon.stopping = False
        if err == errno.EBUSY:
            return False
        raise OSError(err, f"cannot unmount {path}: {os.strerror(err)}")

    async def probe(self, target: PurePosixPath) -> Health:
        path = self._where(target)
        limit = self.probe_limit
        if _mount_at(path) is None:
            return Health(state=HealthState.ABSENT, message=f"{path} is not mounted")
        try:
            await asyncio.wait_for(asyncio.to_thread(os.stat, path), limit)
        except TimeoutError:
            return Health(state=HealthState.STALE, message=f"{path} did not answer in {limit}s")
        except OSError as exc:
            return Health(state=HealthState.STALE, message=f"{path}: {exc.strerror}")
        return Health(state=HealthState.HEALTHY)


def _canonical(path: PurePosixPath | str) -> PurePosixPath:
    """``path`` normalised without touching the file system (which may hang on a dead
    FUSE mount); callers pass absolute paths free of symlinks, as mountinfo lists them."""
    return PurePosixPath(posixpath.normpath(str(path)))


def _tail(text: str, limit: int = 600) -> str:
    text = text.strip()
    if not text:
        return "(no output)"
    return text if len(text) <= limit else "..." + text[-limit:]
