"""Controllers: workers that take keys from a :class:`~.queueing.WorkQueue` and reconcile.

Stage three of the pipeline (observe -> queue -> process -> act). A reconcile receives only
a key; it reads the current state from informer caches and acts through the client (stage
four). What it returns is one :data:`~.outcomes.Outcome`, which decides what happens to the
key: forgotten, or requeued after a delay. What it raises is retried: after the delay of a
:class:`~.errors.TemporaryError`, otherwise with the queue's per-key rate-limited backoff.

Given the process's :class:`~.metrics.Metrics`, a controller counts its reconciles by
result, times them, reports its queue, and registers a liveness check
(:class:`~.health.Progress`): a reconcile under way for longer than ``stall_after``
seconds means the controller is stuck, and the process should be restarted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from .errors import APIConflict, APIError, TemporaryError
from .health import Progress
from .metrics import Metrics
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
        metrics: Metrics | None = None,
        stall_after: float = 300.0,
    ) -> None:
        self.name = name
        self.queue = WorkQueue(name, limiter=limiter, metrics=metrics)
        self._reconcile = reconcile
        self._workers = workers
        self._tasks: list[asyncio.Task[None]] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.metrics = metrics
        self.progress = Progress(f"controller {name}", stall_after=stall_after)
        self._unregister: list[Callable[[], None]] = []

    def enqueue(self, key: str) -> None:
        """Queue ``key`` for reconciliation (deduplicated)."""
        self.queue.add(key)

    async def start(self) -> None:
        """Start the workers."""
        if self._tasks:
            return
        if self.metrics is not None:
            self._unregister = [
                self.metrics.health.add_liveness(self.progress.name, self.progress.problem),
                self.metrics.track_depth(self.name, lambda: len(self.queue)),
            ]
        self._tasks = [
            asyncio.create_task(self._work(), name=f"{self.name} worker {i}")
            for i in range(self._workers)
        ]

    async def close(self) -> None:
        """Stop taking keys, let running reconciles finish briefly, then cancel them."""
        self.queue.shut_down()
        for unregister in self._unregister:
            unregister()
        self._unregister = []
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
        token = self.progress.began()
        started = time.monotonic()
        try:
            outcome = await self._reconcile(key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._count("Retry", started)
            self._retry(key, exc)
            return
        finally:
            self.progress.ended(token)
        match outcome:
            case None | Done():
                self._count("Done", started)
                self.queue.forget(key)
            case RequeueAfter(delay=delay):
                self._count("RequeueAfter", started)
                self.queue.forget(key)
                self.queue.add_after(key, delay)
            case _:
                self._count("Retry", started)
                self._retry(key, TypeError(f"not an outcome: {outcome!r}"))

    def _count(self, result: str, started: float) -> None:
        self.counts[result] += 1
        if self.metrics is not None:
            self.metrics.reconciles.labels(self.name, result).inc()
            self.metrics.reconcile_duration.labels(self.name).observe(time.monotonic() - started)

    def _retry(self, key: str, error: Exception) -> None:
        if isinstance(error, TemporaryError) and error.delay is not None:
            delay = error.delay
            self.queue.add_after(key, delay)
        else:
            delay = self.queue.add_rate_limited(key)
        if self.metrics is not None:
            self.metrics.queue_retries.labels(self.name).inc()
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
            extra=_context(key),
        )


def _context(key: str) -> dict[str, str]:
    """The structured-log fields of a ``namespace/name`` (or ``name``) key."""
    namespace, sep, name = key.rpartition("/")
    return {"namespace": namespace, "object_name": name} if sep else {"object_name": key}


def _expected(error: BaseException) -> bool:
    # Our own error types carry a clear message; a traceback adds nothing.
    return isinstance(error, TemporaryError | APIError)
