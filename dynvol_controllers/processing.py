"""Controllers: workers that take keys from a :class:`~.queueing.WorkQueue` and reconcile.

Stage three of the pipeline (observe -> queue -> process -> act). A reconcile receives only
a key; it reads the current state from informer caches and acts through the client (stage
four). Whatever it returns or raises becomes one :data:`~.outcomes.Outcome`, which decides
what happens to the key: forgotten, requeued after a delay, retried with backoff, or dropped
as terminal (logged, counted and handed to ``on_terminal`` so it can be reported).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable

from .errors import ReconcileError
from .k8s import APIConflict, APIError
from .outcomes import Done, Outcome, RequeueAfter, Retry, Terminal, outcome_of
from .queueing import RateLimiter, ShutDown, WorkQueue

__all__ = ["Controller", "Reconcile"]

log = logging.getLogger(__name__)

Reconcile = Callable[[str], Awaitable[Outcome | None]]
TerminalHook = Callable[[str, Terminal], Awaitable[None]]


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
        on_terminal: TerminalHook | None = None,
    ) -> None:
        self.name = name
        self.queue = WorkQueue(name, limiter=limiter)
        self._reconcile = reconcile
        self._workers = workers
        self._on_terminal = on_terminal
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
            result: Outcome | BaseException | None = await self._reconcile(key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            result = exc
        outcome = outcome_of(result)
        self.counts[type(outcome).__name__] += 1
        match outcome:
            case Done():
                self.queue.forget(key)
            case RequeueAfter(delay=delay):
                self.queue.forget(key)
                self.queue.add_after(key, delay)
            case Retry(error=error, delay=delay):
                if delay is None:
                    delay = self.queue.add_rate_limited(key)
                else:
                    self.queue.add_after(key, delay)
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
            case Terminal(error=error):
                self.queue.forget(key)
                log.error("%s: %s failed permanently: %s", self.name, key, error)
                if self._on_terminal is not None:
                    try:
                        await self._on_terminal(key, outcome)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception("%s: reporting the failure of %s failed", self.name, key)


def _expected(error: BaseException) -> bool:
    # Our own error types carry a clear message; a traceback adds nothing.
    return isinstance(error, ReconcileError | APIError)
