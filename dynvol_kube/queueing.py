"""The work queue between observing and processing.

Stage two of the pipeline (observe -> queue -> process -> act). Informer handlers add keys
(``namespace/name`` or any string); workers in :mod:`.processing` take them. The queue
guarantees what controller-runtime's does:

* a key is queued at most once however often it is added (deduplication);
* a key is never handed to two workers at once: added while being processed, it is queued
  again when the worker calls :meth:`WorkQueue.done`;
* delayed adds keep the earliest deadline; failures back off per key, exponentially, under
  an overall token-bucket rate limit (:class:`RateLimiter`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque

import attrs

from .metrics import Metrics

__all__ = ["ExponentialBackoff", "RateLimiter", "ShutDown", "WorkQueue"]


class ShutDown(Exception):
    """The queue was shut down; workers should exit."""


@attrs.define
class ExponentialBackoff:
    """Per-key delays ``base * 2**failures`` capped at ``cap`` seconds."""

    base: float = 0.05
    cap: float = 300.0
    _failures: dict[str, int] = attrs.field(factory=dict, init=False)

    def when(self, key: str) -> float:
        """The delay for this failure of ``key`` (and count it)."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        return min(self.cap, self.base * float(2 ** min(failures, 62)))

    def failures(self, key: str) -> int:
        """How many times ``key`` failed since it was last forgotten."""
        return self._failures.get(key, 0)

    def forget(self, key: str) -> None:
        """Reset ``key`` after a success."""
        self._failures.pop(key, None)


@attrs.define
class RateLimiter:
    """Retry delays: the larger of a per-key exponential backoff and an overall bucket.

    The bucket (``qps`` tokens per second, ``burst`` deep) stops a storm of failing keys
    from hammering the apiserver together.
    """

    backoff: ExponentialBackoff = attrs.field(factory=ExponentialBackoff)
    qps: float = 10.0
    burst: int = 100
    _tokens: float = attrs.field(init=False)
    _stamp: float = attrs.field(init=False, factory=time.monotonic)

    def __attrs_post_init__(self) -> None:
        self._tokens = float(self.burst)

    def when(self, key: str) -> float:
        """The delay before retrying ``key``."""
        now = time.monotonic()
        self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.qps)
        self._stamp = now
        self._tokens -= 1.0
        bucket = 0.0 if self._tokens >= 0 else -self._tokens / self.qps
        return max(self.backoff.when(key), bucket)

    def failures(self, key: str) -> int:
        """How many times ``key`` failed since it was last forgotten."""
        return self.backoff.failures(key)

    def forget(self, key: str) -> None:
        """Reset ``key`` after a success."""
        self.backoff.forget(key)


class WorkQueue:
    """A deduplicating, delay-capable queue of keys with per-key exclusion."""

    def __init__(
        self, name: str = "", *, limiter: RateLimiter | None = None, metrics: Metrics | None = None
    ) -> None:
        self.name = name
        self._adds = metrics.queue_adds.labels(name) if metrics is not None else None
        self.limiter = limiter or RateLimiter()
        self._queue: deque[str] = deque()
        self._dirty: set[str] = set()
        self._processing: set[str] = set()
        self._timers: dict[str, tuple[float, asyncio.TimerHandle]] = {}
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._shutting_down = False
        #: When :meth:`add_coalesced` last saw each key (the loop's clock).
        self._last_coalesced: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def pending(self) -> int:
        """Keys queued, being processed, or waiting for a timer."""
        return len(self._dirty | self._processing | set(self._timers))

    def add(self, key: str) -> None:
        """Queue ``key`` now (no-op if it already is queued)."""
        if self._shutting_down:
            return
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer[1].cancel()
        if key in self._dirty:
            return
        self._dirty.add(key)
        if self._adds is not None:
            self._adds.inc()
        if key in self._processing:
            # Re-queued by done(): one worker per key.
            return
        self._queue.append(key)
        self._wake()

    def add_after(self, key: str, delay: float) -> None:
        """Queue ``key`` after ``delay`` seconds (an earlier pending deadline wins)."""
        if self._shutting_down:
            return
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        existing = self._timers.get(key)
        if existing is not None:
            if existing[0] <= deadline:
                return
            existing[1].cancel()
        handle = loop.call_at(deadline, self._fire, key)
        self._timers[key] = (deadline, handle)

    def add_coalesced(self, key: str, window: float) -> None:
        """Queue ``key`` at once if it was not added this way in the last ``window``
        seconds (a lone change is not delayed), else after ``window`` (a burst of changes
        costs one more pass, not one each)."""
        now = asyncio.get_running_loop().time()
        quiet = now - self._last_coalesced.get(key, -math.inf) >= window
        self._last_coalesced[key] = now
        if window > 0 and not quiet:
            self.add_after(key, window)
        else:
            self.add(key)

    def add_rate_limited(self, key: str) -> float:
        """Queue ``key`` after its backoff delay; returns the delay."""
        delay = self.limiter.when(key)
        self.add_after(key, delay)
        return delay

    def forget(self, key: str) -> None:
        """Clear ``key``'s failure history (it succeeded)."""
        self.limiter.forget(key)

    def failures(self, key: str) -> int:
        """How often ``key`` failed in a row."""
        return self.limiter.failures(key)

    async def get(self) -> str:
        """The next key; raises :class:`ShutDown` once the queue is shut down."""
        while not self._queue:
            if self._shutting_down:
                raise ShutDown(self.name)
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        key = self._queue.popleft()
        self._dirty.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: str) -> None:
        """The worker finished ``key``; queue it again if it was added meanwhile."""
        self._processing.discard(key)
        if key in self._dirty:
            self._queue.append(key)
            self._wake()

    def shut_down(self) -> None:
        """Stop handing out keys; waiting workers get :class:`ShutDown`."""
        self._shutting_down = True
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self._queue.clear()
        self._dirty.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
