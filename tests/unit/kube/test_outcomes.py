"""The one outcome type and how a controller acts on it."""

from __future__ import annotations

import asyncio

import pytest

from dynvol_kube.errors import TemporaryError
from dynvol_kube.outcomes import Done, RequeueAfter
from dynvol_kube.processing import Controller
from dynvol_kube.queueing import ExponentialBackoff, RateLimiter


def test_impossible_outcomes_cannot_be_built() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        RequeueAfter(-1)
    with pytest.raises(ValueError, match="negative"):
        TemporaryError("x", delay=-1)


async def _reconcile_twice(controller: Controller, seen: list[float]) -> None:
    """Enqueue key ``k`` and wait (up to ~1 s) until it was reconciled twice."""
    await controller.start()
    try:
        controller.enqueue("k")
        for _ in range(100):
            if len(seen) >= 2:
                break
            await asyncio.sleep(0.01)
    finally:
        await controller.close()


async def test_controller_retries_then_succeeds_and_never_overlaps() -> None:
    calls: list[str] = []
    running: set[str] = set()
    overlaps = 0
    finished = asyncio.Event()

    async def reconcile(key: str) -> RequeueAfter | Done | None:
        nonlocal overlaps
        if key in running:
            overlaps += 1
        running.add(key)
        try:
            calls.append(key)
            await asyncio.sleep(0.005)
            if calls.count(key) < 3:
                raise RuntimeError("not yet")
            finished.set()
            return None
        finally:
            running.discard(key)

    limiter = RateLimiter(ExponentialBackoff(base=0.01, cap=0.05))
    controller = Controller("t", reconcile, workers=4, limiter=limiter)
    await controller.start()
    try:
        for _ in range(10):
            controller.enqueue("a")
            await asyncio.sleep(0.001)
        await asyncio.wait_for(finished.wait(), 2)
    finally:
        await controller.close()
    assert overlaps == 0
    assert controller.counts["Retry"] >= 2
    assert controller.counts["Done"] >= 1


async def test_temporary_error_delay_is_kept() -> None:
    seen: list[float] = []

    async def reconcile(key: str) -> None:
        seen.append(asyncio.get_running_loop().time())
        if len(seen) < 2:
            raise TemporaryError("later", delay=0.1)

    # A huge rate-limited backoff: only the error's own delay can bring the key back soon.
    limiter = RateLimiter(ExponentialBackoff(base=100.0, cap=100.0))
    controller = Controller("t", reconcile, limiter=limiter)
    await _reconcile_twice(controller, seen)
    assert len(seen) == 2
    assert seen[1] - seen[0] >= 0.09
    assert controller.counts["Retry"] == 1


async def test_a_non_outcome_is_retried_not_taken_as_done() -> None:
    calls = 0
    done = asyncio.Event()

    async def reconcile(key: str) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            return "done"  # a reconcile bug: not an Outcome
        done.set()
        return None

    limiter = RateLimiter(ExponentialBackoff(base=0.01, cap=0.01))
    controller = Controller("t", reconcile, limiter=limiter)  # type: ignore[arg-type]
    await controller.start()
    try:
        controller.enqueue("k")
        await asyncio.wait_for(done.wait(), 2)
    finally:
        await controller.close()
    assert calls == 2
    assert controller.counts["Retry"] == 1


async def test_requeue_after_reschedules() -> None:
    seen: list[float] = []

    async def reconcile(key: str) -> RequeueAfter | None:
        seen.append(asyncio.get_running_loop().time())
        return RequeueAfter(0.05) if len(seen) < 2 else None

    controller = Controller("t", reconcile)
    await _reconcile_twice(controller, seen)
    assert len(seen) == 2
    assert seen[1] - seen[0] >= 0.04
