"""Process lifecycle: run a service until SIGTERM/SIGINT, drain on the first, exit on the second.

:func:`run_until_signalled` is used by every process (``dynvol node``, ``dynvol
controller``, ``dynvol dmp``), so that all three stop the same way: the first signal makes
it close the service (gracefully, in reverse order of start); a second signal while that
drain is under way exits the process at once with status 1. :class:`Supervisor` keeps a
service's background tasks running: one that fails is logged, counted and started again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

__all__ = ["Supervisor", "run_until_signalled", "signal_handling", "stop_task"]

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)

Exit = Callable[[int], object]


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has ended (None: nothing to stop)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@contextlib.contextmanager
def signal_handling(stop: asyncio.Event, *, exit_now: Exit = os._exit) -> Iterator[None]:
    """While inside, the first SIGTERM/SIGINT sets ``stop``; the next calls ``exit_now(1)``.

    The handlers stay installed after ``stop`` is set, so that the drain which follows can
    be cut short by a second signal; they are removed on leaving.
    """
    loop = asyncio.get_running_loop()
    seen = 0

    def on_signal(signum: int) -> None:
        nonlocal seen
        seen += 1
        name = signal.Signals(signum).name
        if seen == 1:
            log.info("%s: shutting down (send it again to exit at once)", name)
            stop.set()
        else:
            log.warning("%s again: exiting now", name)
            sys.stderr.flush()
            exit_now(1)

    for signum in _SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        yield
    finally:
        for signum in _SIGNALS:
            loop.remove_signal_handler(signum)


async def run_until_signalled(
    start: Callable[[], Awaitable[object]],
    close: Callable[[], Awaitable[object]],
    *,
    until: Callable[[], Awaitable[object]] | None = None,
    exit_now: Exit = os._exit,
) -> bool:
    """Start a service, wait for the first signal (or ``until`` to return), then close it.

    ``close`` always runs, also when ``start`` fails; a second signal during the drain exits
    at once. Returns True when a signal stopped the service, False when ``until`` did
    (e.g. a lost Lease), so that the caller can choose its exit status.
    """
    stop = asyncio.Event()
    with signal_handling(stop, exit_now=exit_now):
        try:
            await start()
            waits: set[asyncio.Future[object]] = {asyncio.ensure_future(stop.wait())}
            if until is not None:
                waits.add(asyncio.ensure_future(until()))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waits:
                    waiter.cancel()
                for waiter in waits:
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiter
        finally:
            await close()
    return stop.is_set()


TaskFactory = Callable[[], Coroutine[Any, Any, object]]


class Supervisor:
    """Background tasks that are restarted when they fail (or end), until :meth:`close`.

    A failure is logged with its traceback, counted in ``failures[name]`` and followed by a
    restart after a delay that doubles with each failure in a row (``base`` to ``cap``
    seconds) and resets once the task has run for ``healthy_after`` seconds. Cancellation
    is never swallowed.
    """

    def __init__(self, *, base: float = 0.5, cap: float = 30.0, healthy_after: float = 60.0):
        self.base, self.cap, self.healthy_after = base, cap, healthy_after
        self.failures: collections.Counter[str] = collections.Counter()
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, factory: TaskFactory) -> None:
        """Run ``factory()`` as task ``name``, and again whenever it fails or returns."""
        if name in self._tasks:
            raise ValueError(f"task {name!r} is already supervised")
        self._tasks[name] = asyncio.create_task(self._keep(name, factory), name=name)

    async def _keep(self, name: str, factory: TaskFactory) -> None:
        loop = asyncio.get_running_loop()
        in_a_row = 0
        while True:
            started = loop.time()
            try:
                await factory()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.failures[name] += 1
                log.exception("background task %s failed; restarting it", name)
            else:
                self.failures[name] += 1
                log.error("background task %s ended; restarting it", name)
            if loop.time() - started >= self.healthy_after:
                in_a_row = 0
            await asyncio.sleep(min(self.cap, self.base * 2.0 ** min(in_a_row, 16)))
            in_a_row += 1

    async def close(self) -> None:
        """Cancel every task and wait for it."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
