"""Mount helpers for tests: rshared scratch directories and leak detection.

A real node has shared propagation at ``/``; development machines and CI often do not, so
tests bind a scratch directory onto itself and make it rshared, as the node plugin does
with its xvols root.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from dynvol_core.mountinfo import parse_mountinfo, unmount_order


def mounts_under(path: Path, *, pid: str = "self") -> list[str]:
    """Mount points at or below ``path`` in the mount namespace of ``pid``, deepest first."""
    text = Path(f"/proc/{pid}/mountinfo").read_text()
    return unmount_order(parse_mountinfo(text), str(path).rstrip("/") or "/", include_self=True)


def lazy_unmount_tree(path: Path) -> None:
    """Lazily unmount everything at or below ``path``, deepest first."""
    for _ in range(3):
        points = mounts_under(path)
        if not points:
            return
        for point in points:
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


@contextlib.contextmanager
def rshared_dir(path: Path) -> Iterator[Path]:
    """Bind ``path`` onto itself and make it rshared; undo everything on exit."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "--make-rshared", str(path)], check=True)
        yield path
    finally:
        lazy_unmount_tree(path)
