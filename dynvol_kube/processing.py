"""Controllers: workers that take keys from a :class:`~.queueing.WorkQueue` and reconcile.

Stage three of the pipeline (observe -> queue -> process -> act). A reconcile receives only
a key; it reads the current state from informer caches and acts through the client (stage
four). What it returns is one :data:`~.outcomes.Outcome`, which decides what happens to the
key: forgotten, or requeued after a delay. What it raises is retried: after the delay of a
:class:`~.errors.TemporaryError`, otherwise with the queue's per-key rate-limited backoff.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable

from .errors import APIConflict, APIError, TemporaryError
from .outcomes import Done, Outcome, RequeueAfter
from .queueing import RateLimiter, ShutDown, WorkQueue

__all__ = ["Controller", "Reconcile"]

log = logging.getLogger(__name__)

Reconcile = Callable[[str], Awaitable[Outcome | None]]


class Controller:
    """Run ``reconcile`` for queued keys with ``workers`` concurrent workers.

    One key is never reconciled by two workers at once (the queue guarantees it).
    """

    def __init__(
        self,
        name: str,
        reconcile: Reconcile,
        *,
        workers: int = 2,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.name = name
        self.queue = WorkQueue(name, limiter=limiter)
        self._reconcile = reconcile
        self._workers = workers
        self._tasks: list[asyncio.Task[None]] = []
        self.counts: collections.Counter[str] = collections.Counter()

    def enqueue(self, key: str) -> None:
        """Queue ``key`` for reconciliation (deduplicated)."""
        self.queue.add(key)

    async def start(self) -> None:
        """Start the workers."""
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self._work(), name=f"{self.name} worker {i}")
            for i in range(self._workers)
        ]

    async def close(self) -> None:
        """Stop taking keys, let running reconciles finish briefly, then cancel them."""
        self.queue.shut_down()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=5)
        for task in pending:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _work(self) -> None:
        while True:
            try:
                key = await self.queue.get()
            except ShutDown:
                return
            try:
                await self._process(key)
            finally:
                self.queue.done(key)

    async def _process(self, key: str) -> None:
        try:
            outcome = await self._reconcile(key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.counts["Retry"] += 1
            self._retry(key, exc)
            return
        match outcome:
            case None | Done():
                self.counts["Done"] += 1
                self.queue.forget(key)
            case RequeueAfter(delay=delay):
                self.counts["RequeueAfter"] += 1
                self.queue.forget(key)
                self.queue.add_after(key, delay)
            case _:
                self.counts["Retry"] += 1
                self._retry(key, TypeError(f"not an outcome: {outcome!r}"))

    def _retry(self, key: str, error: Exception) -> None:
        if isinstance(error, TemporaryError) and error.delay is not None:
            delay = error.delay
            self.queue.add_after(key, delay)
        else:
            delay = self.queue.add_rate_limited(key)
        # Conflicts are routine optimistic-concurrency misses, not incidents.
        level = logging.DEBUG if isinstance(error, APIConflict) else logging.WARNING
        log.log(
            level,
            "%s: %s failed (%s); retrying in %.2fs",
            self.name,
            key,
            error,
            delay,
            exc_info=error if level == logging.WARNING and not _expected(error) else None,
        )


def _expected(error: BaseException) -> bool:
    # Our own error types carry a clear message; a traceback adds nothing.
    return isinstance(error, TemporaryError | APIError)
