"""Child processes for tests and local tooling: started, waited for and always reaped.

PID 1 on development machines and CI runners does not always reap orphans, so every
process started here stays our child until :meth:`Process.stop` has waited for it.
Neighbours: :mod:`dynvol.testing.controlplane` and :mod:`dynvol.testing.minio` start their
servers through this module; :mod:`dynvol.testing.pytest_plugin` checks at session end that
none is left.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import attrs

#: Every Process started in this interpreter and not yet stopped, by PID.
_LIVE: dict[int, Process] = {}


#: Names the ports :func:`free_port` may hand out, ``LOW-HIGH`` (inclusive). ``make test``
#: gives each of its lanes its own range, so that steps running side by side never pick
#: the same port.
PORTS_ENV = "DYNVOL_TEST_PORTS"
#: Where :func:`free_port` looks without ``$DYNVOL_TEST_PORTS``: above the well-known
#: ports, below Kubernetes' NodePort range (30000-32767 by default) and the kernel's
#: ephemeral ports (``net.ipv4.ip_local_port_range``, 32768-60999 by default), from which
#: every ``bind(("", 0))`` and ``connect()`` on the machine takes its port. A port handed
#: out from there could be taken by any process between the check here and the bind of the
#: server it is meant for (a mount pod's status server, a kubelet, an outgoing connection),
#: and the test would then talk to that process instead.
DEFAULT_PORTS = (20000, 29999)
#: Ports this interpreter handed out already: never handed out twice.
_GIVEN: set[int] = set()


def port_range(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """The ports :func:`free_port` picks from (``$DYNVOL_TEST_PORTS`` or the default)."""
    raw = (os.environ if environ is None else environ).get(PORTS_ENV, "")
    if not raw:
        return DEFAULT_PORTS
    low_text, sep, high_text = raw.partition("-")
    if not sep or not low_text.isdigit() or not high_text.isdigit():
        raise ValueError(f"${PORTS_ENV} must be LOW-HIGH (two port numbers), not {raw!r}")
    low, high = int(low_text), int(high_text)
    if not 1024 <= low <= high <= 65535:
        raise ValueError(f"${PORTS_ENV}={raw!r}: want 1024 <= LOW <= HIGH <= 65535")
    return low, high


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, from :func:`port_range`, and
    not handed out before by this interpreter."""
    low, high = port_range()
    candidates = [port for port in range(low, high + 1) if port not in _GIVEN]
    random.shuffle(candidates)
    for port in candidates[:512]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError(f"no free TCP port on 127.0.0.1 in {low}-{high} (${PORTS_ENV})")


def wait_until(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
    alive: Process | None = None,
) -> None:
    """Wait until ``predicate()`` is true; fail early if ``alive`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(
                f"{alive.name} exited with {alive.returncode} while waiting for {what}"
                f"{alive.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@attrs.define(kw_only=True)
class Process:
    """A child process with its log file; use :meth:`start`, then :meth:`stop`."""

    name: str
    argv: tuple[str, ...]
    log_path: Path | None
    popen: subprocess.Popen[bytes]

    @classmethod
    def start(
        cls,
        argv: Sequence[str],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
        cwd: Path | None = None,
        new_session: bool = True,
    ) -> Process:
        """Start ``argv`` with its output in ``log`` (or discarded)."""
        out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=new_session,
            )
        finally:
            if log is not None:
                out.close()  # type: ignore[union-attr]
        proc = cls(name=name or Path(argv[0]).name, argv=tuple(argv), log_path=log, popen=popen)
        _LIVE[popen.pid] = proc
        return proc

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the log, prefixed with a newline, for error messages."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n--- last lines of " + str(self.log_path) + " ---\n" + "\n".join(text)

    def send_signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signum)

    def stop(self, *, timeout: float = 10.0, signum: int = signal.SIGTERM) -> int:
        """Ask the process to stop, kill it after ``timeout``, and reap it."""
        try:
            if self.popen.poll() is None:
                self.send_signal(signum)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.send_signal(signal.SIGKILL)
                    self.popen.wait()
        finally:
            _LIVE.pop(self.popen.pid, None)
        return self.popen.returncode

    def kill(self) -> int:
        """SIGKILL and reap."""
        return self.stop(timeout=0.0, signum=signal.SIGKILL)


def live_processes() -> list[Process]:
    """Processes started here that have not been stopped (for the session leak check)."""
    return [p for p in _LIVE.values() if p.poll() is None]


def stop_all() -> None:
    """Stop every process still tracked, newest first."""
    for proc in reversed(list(_LIVE.values())):
        proc.stop(timeout=5.0)


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 60.0, **kw: object) -> str:
    """Run a short command and return its stdout; errors carry its stderr."""
    result = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kw,  # type: ignore[call-overload]
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed with {result.returncode}: {result.stderr.strip()}"
        )
    out: str = result.stdout
    return out
