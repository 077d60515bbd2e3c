"""Work queue semantics: deduplication, one worker per key, delays, backoff."""

from __future__ import annotations

import asyncio

import pytest

from dynvol_kube.queueing import ExponentialBackoff, RateLimiter, ShutDown, WorkQueue


async def test_keys_are_deduplicated() -> None:
    queue = WorkQueue()
    for _ in range(5):
        queue.add("a")
    queue.add("b")
    assert len(queue) == 2
    assert await queue.get() == "a"
    assert await queue.get() == "b"


async def test_key_added_while_processing_waits_for_done() -> None:
    queue = WorkQueue()
    queue.add("a")
    key = await queue.get()
    queue.add("a")  # changed while being reconciled
    assert len(queue) == 0, "a key must not be handed to a second worker"
    queue.done(key)
    assert len(queue) == 1
    assert await queue.get() == "a"
    queue.done("a")
    assert queue.pending == 0


async def test_add_after_keeps_earliest_deadline() -> None:
    queue = WorkQueue()
    queue.add_after("a", 10)
    queue.add_after("a", 0.01)
    queue.add_after("a", 5)
    key = await asyncio.wait_for(queue.get(), 1)
    assert key == "a"
    queue.done(key)
    queue.shut_down()


async def test_immediate_add_supersedes_timer() -> None:
    queue = WorkQueue()
    queue.add_after("a", 30)
    queue.add("a")
    assert await asyncio.wait_for(queue.get(), 1) == "a"
    queue.done("a")
    assert queue.pending == 0


async def test_shut_down_wakes_waiting_workers() -> None:
    queue = WorkQueue()
    waiter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.shut_down()
    with pytest.raises(ShutDown):
        await waiter
    queue.add("ignored")
    assert len(queue) == 0


def test_exponential_backoff_doubles_and_caps() -> None:
    backoff = ExponentialBackoff(base=0.1, cap=1.0)
    delays = [backoff.when("k") for _ in range(6)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert backoff.failures("k") == 6
    assert backoff.when("other") == pytest.approx(0.1)
    backoff.forget("k")
    assert backoff.when("k") == pytest.approx(0.1)


def test_rate_limiter_bucket_throttles_many_keys() -> None:
    limiter = RateLimiter(ExponentialBackoff(base=0.001, cap=1), qps=10, burst=3)
    delays = [limiter.when(f"k{i}") for i in range(6)]
    assert delays[:3] == pytest.approx([0.001] * 3)
    # Beyond the burst, the overall bucket dominates the tiny per-key delay.
    assert delays[3] > 0.05
    assert delays[5] > delays[3]
