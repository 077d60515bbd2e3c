"""Process lifecycle: run a service until SIGTERM/SIGINT, drain on the first, exit on the second.

Used by every process (``dynvol node``, ``dynvol controller``, ``dynvol dmp``) so that all
three stop the same way: the first signal makes :func:`run_until_signalled` return (the
caller then closes its components in reverse order, gracefully); a second signal while
that drain is under way exits the process at once with status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator

__all__ = ["run_until_signalled", "signal_handling"]

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)

Exit = Callable[[int], object]


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
