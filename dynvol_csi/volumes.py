"""Publishing and unpublishing dynvol volumes on the host: slots, binds, records.

:class:`VolumeManager` owns the node plugin's state: the records of published volumes (kept
in memory and in the state directory) and the per-volume locks. Each operation runs as one
blocking function in a worker thread, holding the volume's lock, and is shielded from the
caller's cancellation: once started it runs to the end (including its undo on failure), so
a client that gives up or a server that shuts down never leaves half-done work behind
while the plugin keeps running. A crash is covered by the records (see :meth:`recover`).

Neighbours: ``validation`` (what comes in), ``mounting`` (the syscalls), ``state`` (the
records on disk), ``node`` (the gRPC handlers calling this).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path, PurePosixPath
from typing import TypeVar

import attrs

from dynvol_core.errors import DynvolError
from dynvol_core.mountinfo import MountEntry, entries_at, unmount_order
from dynvol_core.paths import XvolsLayout
from dynvol_core.records import VolumeRecord
from dynvol_csi.errors import ShuttingDown, TargetUnavailable, VolumeConflict, VolumeNotFound
from dynvol_csi.mounting import (
    bind,
    ensure_read_only,
    lazy_unmount,
    mounted_under,
    read_mountinfo,
)
from dynvol_csi.state import VolumeStore
from dynvol_csi.validation import PublishRequest, StatsRequest, UnpublishRequest

__all__ = ["VolumeManager", "VolumeUsage"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@attrs.frozen
class VolumeUsage:
    """Capacity figures of a published volume, in one unit ("bytes" or "inodes")."""

    unit: str
    total: int
    available: int
    used: int


@attrs.define
class _VolumeLock:
    lock: asyncio.Lock = attrs.field(factory=asyncio.Lock)
    users: int = 0


@attrs.define
class VolumeManager:
    """The volumes this node plugin has published, and the operations on them."""

    layout: XvolsLayout
    store: VolumeStore
    _records: dict[str, VolumeRecord] = attrs.field(factory=dict, init=False)
    _locks: dict[str, _VolumeLock] = attrs.field(factory=dict, init=False)
    _inflight: set[asyncio.Task[object]] = attrs.field(factory=set, init=False)
    _draining: bool = attrs.field(default=False, init=False)
    _listeners: list[Callable[[], None]] = attrs.field(factory=list, init=False)

    # ---- async API (event loop) -------------------------------------------------------

    async def publish(self, request: PublishRequest) -> VolumeRecord:
        """Give the pod its slot and bind it onto the target path; idempotent."""
        record = await self._run(request.volume_id, self._publish, request)
        self._notify()
        return record

    async def unpublish(self, request: UnpublishRequest) -> None:
        """Remove every mount at and below the target, the slot and the record."""
        await self._run(request.volume_id, self._unpublish, request)
        self._notify()

    async def usage(self, request: StatsRequest) -> list[VolumeUsage]:
        """statvfs figures of a published volume."""
        return await asyncio.to_thread(self._usage, request)

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (on the event loop) after every publish and unpublish, so
        whoever acts on published volumes (the node reconciler) learns of them at once."""
        self._listeners.append(listener)

    def _notify(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("volume listener %r failed", listener)

    def records(self) -> dict[str, VolumeRecord]:
        """A snapshot of the known volumes, by volume ID."""
        return dict(self._records)

    async def drain(self) -> None:
        """Refuse new operations and wait until those under way have finished."""
        self._draining = True
        while self._inflight:
            await asyncio.wait(set(self._inflight))

    async def _run(self, volume_id: str, operation: Callable[..., T], *args: object) -> T:
        if self._draining:
            raise ShuttingDown("the node plugin is shutting down; retry shortly")
        task: asyncio.Task[T] = asyncio.ensure_future(self._locked_call(volume_id, operation, args))
        self._inflight.add(task)
        task.add_done_callback(self._finished)
        return await asyncio.shield(task)

    def _finished(self, task: asyncio.Task[object]) -> None:
        self._inflight.discard(task)
        # The caller may have been cancelled and not be there to collect the outcome.
        if not task.cancelled():
            task.exception()

    async def _locked_call(
        self, volume_id: str, operation: Callable[..., T], args: tuple[object, ...]
    ) -> T:
        async with self._volume_lock(volume_id):
            return await asyncio.to_thread(operation, *args)

    @contextlib.asynccontextmanager
    async def _volume_lock(self, volume_id: str) -> AsyncIterator[None]:
        # One lock per volume, dropped when nobody holds or waits for it, so the table
        # stays as small as the set of volumes being worked on.
        entry = self._locks.get(volume_id)
        if entry is None:
            entry = self._locks[volume_id] = _VolumeLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[volume_id]

    # ---- blocking operations (worker threads, one per volume at a time) --------------

    def recover(self) -> None:
        """Rebuild the state from the records on disk, checked against the mount table.

        A publish or unpublish that was interrupted is undone or finished, respectively
        (kubelet retries a publish it got no answer for). A published volume whose bind
        is gone (the node rebooted) is bound again if kubelet's directory for it still
        exists, and cleaned up otherwise. A record that cannot be repaired is kept, so a
        later unpublish can retry.
        """
        self.store.open()
        records = self.store.load_all()
        entries = read_mountinfo()
        for record in records.values():
            self._records[record.volume_id] = record
            try:
                if record.phase != "published":
                    log.info(
                        "finishing interrupted %s of volume %s", record.phase, record.volume_id
                    )
                    self._teardown(record)
                    self._forget(record.volume_id)
                elif entries_at(entries, record.target_path):
                    log.info("volume %s is published at %s", record.volume_id, record.target_path)
                    ensure_read_only(record.target_path)
                elif Path(record.target_path).parent.is_dir():
                    log.warning(
                        "volume %s lost its bind at %s; binding its slot again",
                        record.volume_id,
                        record.target_path,
                    )
                    self._establish(record)
                else:
                    log.warning(
                        "volume %s: kubelet's directory for %s is gone; cleaning up",
                        record.volume_id,
                        record.target_path,
                    )
                    self._teardown(record)
                    self._forget(record.volume_id)
            except (DynvolError, OSError):
                log.exception("could not recover volume %s; keeping its record", record.volume_id)
        self._remove_orphan_slots(entries)
        log.info("recovered %d published volume(s)", len(self._records))

    def _remove_orphan_slots(self, entries: tuple[MountEntry, ...]) -> None:
        """Delete slot directories no record refers to and nothing is mounted in."""
        known = {record.slot(self.layout).path for record in self._records.values()}
        xvols = Path(self.layout.xvols_dir)
        for slot_dir in xvols.glob("*/*/*"):
            slot = self.layout.parse_slot(PurePosixPath(slot_dir))
            if slot is None or slot.path in known:
                continue
            if mounted_under(entries, slot.path) or any(e.root == str(slot.path) for e in entries):
                log.warning("slot %s has no record but is mounted; leaving it", slot.path)
                continue
            log.info("removing orphan slot %s", slot.path)
            _remove_tree(slot_dir)
            _rmdir_if_empty(slot_dir.parent)

    def _publish(self, request: PublishRequest) -> VolumeRecord:
        existing = self._records.get(request.volume_id)
        if existing is not None:
            self._check_compatible(existing, request)
            slot = existing.slot(self.layout)
            if existing.phase == "published":
                if self._is_bound(slot.path, existing.target_path):
                    ensure_read_only(existing.target_path)
                    return existing
                # Bound before but not any more (someone unmounted it): bind again, and
                # keep the slot and the record whatever happens, as they may be in use.
                self._establish(existing)
                return existing
            # Left half-way by a failed undo: start again from a clean slate.
            self._teardown(existing)
            self._forget(existing.volume_id)

        record = VolumeRecord(
            volume_id=request.volume_id,
            pod_uid=request.pod_uid,
            pod_name=request.pod_name,
            pod_namespace=request.pod_namespace,
            class_name=request.class_name,
            policy=request.policy,
            slot_uuid=str(uuid.uuid4()),
            target_path=request.target_path,
            read_only=request.read_only,
            phase="publishing",
        )
        # The record is written before the host is touched, so that a crash at any point
        # after this leaves enough behind to undo the work.
        self._remember(record, durable=False)
        try:
            self._establish(record)
            published = record.with_phase("published")
            self._remember(published, durable=False)
        except BaseException as exc:
            log.warning("publishing volume %s failed, undoing: %s", record.volume_id, exc)
            try:
                self._teardown(record)
                self._forget(record.volume_id)
            except (DynvolError, OSError):
                log.exception(
                    "undoing volume %s failed; its record is kept for a retry", record.volume_id
                )
            raise
        log.info(
            "published volume %s (pod %s/%s) at %s",
            record.volume_id,
            record.pod_namespace,
            record.pod_name,
            record.target_path,
        )
        return published

    def _unpublish(self, request: UnpublishRequest) -> None:
        record = self._records.get(request.volume_id)
        if record is None:
            # The CSI spec asks for success: the volume is not (or no longer) here.
            log.info("unpublish of unknown volume %s: nothing to do", request.volume_id)
            return
        if record.target_path != request.target_path:
            raise TargetUnavailable(
                f"volume {record.volume_id} is published at {str(record.target_path)!r}, "
                f"not at {str(request.target_path)!r}"
            )
        record = record.with_phase("unpublishing")
        self._remember(record, durable=False)
        self._teardown(record)
        self._forget(record.volume_id)
        log.info("unpublished volume %s from %s", record.volume_id, record.target_path)

    def _usage(self, request: StatsRequest) -> list[VolumeUsage]:
        record = self._records.get(request.volume_id)
        if record is None or record.phase != "published":
            raise VolumeNotFound(f"volume {request.volume_id} is not published on this node")
        if request.volume_path != str(record.target_path):
            raise VolumeNotFound(
                f"volume {request.volume_id} is not published at {request.volume_path!r} "
                f"(it is at {str(record.target_path)!r})"
            )
        try:
            st = os.statvfs(record.target_path)
        except FileNotFoundError as exc:
            raise VolumeNotFound(f"{record.target_path} does not exist") from exc
        return [
            VolumeUsage(
                unit="bytes",
                total=st.f_blocks * st.f_frsize,
                available=st.f_bavail * st.f_frsize,
                used=(st.f_blocks - st.f_bfree) * st.f_frsize,
            ),
            VolumeUsage(
                unit="inodes",
                total=st.f_files,
                available=st.f_favail,
                used=st.f_files - st.f_ffree,
            ),
        ]

    # ---- steps ---------------------------------------------------------------------

    def _remember(self, record: VolumeRecord, *, durable: bool) -> None:
        # Records describe mounts, and mounts do not survive a power loss, so records are
        # written atomically but not fsynced (fsync was most of a publish's tail latency).
        # A crash of the process keeps everything written. After a power loss, recover()
        # squares whatever the disk kept with the (empty) mount table: a lost "published"
        # record leaves an unmounted slot that _remove_orphan_slots deletes, and kubelet
        # publishes again for pods still on the node; a record whose deletion was lost is
        # cleaned up because kubelet's directory for it is gone, or bound again if the pod
        # is still there (kubelet then unpublishes it if it no longer wants it). Callers
        # may still ask for durability.
        self.store.save(record, durable=durable)
        self._records[record.volume_id] = record

    def _forget(self, volume_id: str) -> None:
        self.store.delete(volume_id, durable=False)
        self._records.pop(volume_id, None)

    @staticmethod
    def _check_compatible(existing: VolumeRecord, request: PublishRequest) -> None:
        wanted = {
            "target_path": request.target_path,
            "read_only": request.read_only,
            "pod_uid": request.pod_uid,
            "pod_name": request.pod_name,
            "pod_namespace": request.pod_namespace,
            "class_name": request.class_name,
            "policy": request.policy,
        }
        different = [
            f"{name} is {getattr(existing, name)!s} (asked: {value!s})"
            for name, value in wanted.items()
            if getattr(existing, name) != value
        ]
        if different:
            raise VolumeConflict(
                f"volume {existing.volume_id} is already published with other parameters: "
                + "; ".join(different)
                + ". Unpublish it first."
            )

    def _establish(self, record: VolumeRecord) -> None:
        """Create the slot and the target directory and bind one onto the other."""
        slot = record.slot(self.layout).path
        target = Path(record.target_path)
        os.makedirs(slot, mode=0o755, exist_ok=True)
        # A symlink anywhere in kubelet's directories could redirect the bind outside
        # them; the validated path must be the real one.
        if os.path.realpath(target.parent) != str(target.parent):
            raise TargetUnavailable(
                f"{target.parent} resolves to {os.path.realpath(target.parent)!r}; "
                "symbolic links in the target path are not allowed"
            )
        try:
            os.mkdir(target, 0o750)
        except FileNotFoundError as exc:
            raise TargetUnavailable(
                f"the parent of the target path, {target.parent}, does not exist "
                "(kubelet creates it before calling NodePublishVolume)"
            ) from exc
        except FileExistsError as exc:
            if not stat.S_ISDIR(os.lstat(target).st_mode):
                raise TargetUnavailable(
                    f"target path {target} exists and is not a directory"
                ) from exc
        if not self._is_bound(slot, record.target_path):
            # Always read-only, whatever the volume asks (docs/design.md §6.2): a pod that could
            # write its slot could plant a symbolic link where a claim's mountpoint goes and
            # redirect the DMP's mount. record.read_only is kept only so that a publish with
            # other parameters is still recognised as a conflict. Sub-mounts the DMP makes
            # later keep their own flags (a read-only bind is not recursive), so claims
            # stay writable where they say so.
            bind(slot, record.target_path, read_only=True)
        else:
            # A bind made by an earlier version (or by hand) may be writable.
            ensure_read_only(record.target_path)

    @staticmethod
    def _is_bound(slot: PurePosixPath, target: PurePosixPath) -> bool:
        # A bind mount shows the inode of its source: target and slot are then the same
        # directory. Cheaper than reading the mount table on the idempotent path.
        try:
            a, b = os.stat(slot), os.stat(target)
        except FileNotFoundError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def _teardown(self, record: VolumeRecord) -> None:
        """Unmount everything at and below the target and the slot, then remove both."""
        slot = record.slot(self.layout).path
        target = record.target_path
        entries = read_mountinfo(mentioning=(target, slot))
        # Below the target first (those unmounts propagate to the slot and the DMP), then
        # the bind itself, then whatever is still mounted in the slot from this side.
        for mount_point in unmount_order(entries, target, include_self=True):
            lazy_unmount(mount_point)
        for mount_point in unmount_order(entries, slot, include_self=True):
            lazy_unmount(mount_point)
        _remove_tree(Path(slot))
        with contextlib.suppress(FileNotFoundError):
            _rmdir_if_empty(Path(slot).parent)  # the slot-uuid directory, ours alone
        try:
            os.rmdir(target)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                raise
            # Not ours to delete: something was put there outside of the mount.
            log.warning("target path %s is not empty after unmounting; leaving it", target)


def _rmdir_if_empty(path: Path) -> None:
    try:
        os.rmdir(path)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise


def _remove_tree(root: Path) -> None:
    """Delete ``root`` and everything in it, refusing to cross into another filesystem.

    Called once every mount in the tree is gone; what is left are the directories the DMP
    made for its mount points. A directory on another device means a mount survived, and
    deleting through it would delete the user's remote data, so that is an error.
    """
    try:
        root_dev = os.lstat(root).st_dev
    except FileNotFoundError:
        return

    def fail(exc: OSError) -> None:
        raise exc

    directories: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        if os.lstat(dirpath).st_dev != root_dev:
            raise DynvolError(f"{dirpath} is still a mount point; not deleting through it")
        directories.append(dirpath)
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
        for name in list(dirnames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                os.unlink(full)
                dirnames.remove(name)
    for dirpath in reversed(directories):
        os.rmdir(dirpath)
