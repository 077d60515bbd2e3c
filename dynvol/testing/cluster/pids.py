"""Processes of a cluster found again by PID, from another process than their parent.

``down`` and ``status`` run long after ``up`` has exited: they know the cluster's processes
only by the PIDs in its state file. A PID counts as the cluster's only while the process
runs and its command line names the cluster's directory, so a reused PID is never
signalled. The supervisor (:mod:`dynvol.testing.cluster.supervisor`) reaps them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["alive", "cmdline", "ours", "stop_pid", "wait_gone"]


def cmdline(pid: int) -> list[str]:
    """The command line of ``pid``; empty when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def _state(pid: int) -> str | None:
    """The one-letter state of ``pid``; None when it does not exist."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def alive(pid: int | None) -> bool:
    """Whether ``pid`` exists and is neither a zombie nor dead."""
    return isinstance(pid, int) and pid > 0 and _state(pid) not in (None, "Z", "X")


def ours(pid: object, directory: Path) -> bool:
    """Whether ``pid`` runs and its command line names ``directory``."""
    return (
        isinstance(pid, int) and alive(pid) and any(str(directory) in arg for arg in cmdline(pid))
    )


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until each PID is gone or a zombie; return those still alive."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if alive(p)]
    return left


def stop_pid(
    pid: int, name: str, *, timeout: float = 20, say: Callable[[str], None] | None = None
) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; its parent (the supervisor) reaps it."""
    if not alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if wait_gone([pid], timeout):
        if say is not None:
            say(f"{name} ({pid}) ignored SIGTERM for {timeout:.0f}s; killing it")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone([pid], 10)
