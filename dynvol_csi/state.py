"""The node plugin's state directory: one :class:`VolumeRecord` file per volume.

A record is written before the host is touched and its phase is updated as a publish or
unpublish proceeds, so that a restarted plugin knows what to finish or undo. Writes are
atomic: the JSON goes to a temporary file in the same directory, is fsynced, renamed over
the record and the directory is fsynced, so a crash leaves either the old or the new
record, never a torn one.

Neighbours: ``dynvol_core.records`` (the format), ``volumes`` (the only writer).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import attrs

from dynvol_core.errors import DynvolError
from dynvol_core.paths import XvolsLayout
from dynvol_core.records import VolumeRecord

__all__ = ["VolumeStore"]

log = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"
_RECORD_SUFFIX = ".json"


@attrs.define
class VolumeStore:
    """Reads and atomically writes the records under ``layout.volumes_state_dir``."""

    layout: XvolsLayout
    _dir: Path = attrs.field(init=False)
    _dir_fd: int = attrs.field(init=False, default=-1)

    def __attrs_post_init__(self) -> None:
        self._dir = Path(self.layout.volumes_state_dir)

    def open(self) -> None:
        """Create the directory if needed and keep it open for the directory fsyncs."""
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._dir_fd < 0:
            self._dir_fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        """Release the directory descriptor."""
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def load_all(self) -> dict[str, VolumeRecord]:
        """Every readable record, by volume ID.

        Leftover temporary files (a crash between write and rename) are removed. A record
        that does not parse is renamed to ``<name>.corrupt`` so that it is kept for a human
        but no longer read, and is logged.
        """
        records: dict[str, VolumeRecord] = {}
        for entry in sorted(self._dir.iterdir()):
            name = entry.name
            if name.startswith(_TMP_PREFIX):
                entry.unlink(missing_ok=True)
                continue
            if not name.endswith(_RECORD_SUFFIX):
                continue
            try:
                record = VolumeRecord.from_json(entry.read_bytes())
                if Path(self.layout.record_path(record.volume_id)) != entry:
                    raise DynvolError(f"record for {record.volume_id!r} is stored as {name}")
            except (DynvolError, OSError) as exc:
                log.error("ignoring unreadable volume record %s: %s", entry, exc)
                entry.rename(entry.with_name(name + ".corrupt"))
                continue
            records[record.volume_id] = record
        self._sync_dir()
        return records

    def save(self, record: VolumeRecord, *, durable: bool = True) -> None:
        """Write ``record`` atomically (replacing any earlier version).

        :param durable: fsync the file before the rename and the directory after it, so
            the record survives a power loss. Without it the write is still atomic for
            readers and survives a crash of the process (the page cache outlives it),
            which is all a transient phase needs: see :class:`~dynvol_csi.volumes.VolumeManager`.
        """
        final = Path(self.layout.record_path(record.volume_id))
        tmp = final.with_name(f"{_TMP_PREFIX}{final.name}")
        data = record.to_json().encode("utf-8")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        if durable:
            self._sync_dir()

    def delete(self, volume_id: str, *, durable: bool = True) -> None:
        """Remove the record of ``volume_id``; a missing record is not an error."""
        Path(self.layout.record_path(volume_id)).unlink(missing_ok=True)
        if durable:
            self._sync_dir()

    def _sync_dir(self) -> None:
        # The rename or unlink is only durable once the directory itself is on disk.
        if self._dir_fd >= 0:
            os.fsync(self._dir_fd)
