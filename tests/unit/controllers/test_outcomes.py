"""The one outcome type and how a controller acts on it."""

from __future__ import annotations

import asyncio

import pytest

from dynvol_controllers.errors import PermanentError, TemporaryError
from dynvol_controllers.outcomes import (
    DONE,
    Done,
    RequeueAfter,
    Retry,
    Terminal,
    outcome_of,
)
from dynvol_controllers.processing import Controller
from dynvol_controllers.queueing import ExponentialBackoff, RateLimiter


def test_outcome_of_maps_results_and_errors() -> None:
    assert outcome_of(None) is DONE
    assert outcome_of(RequeueAfter(3)) == RequeueAfter(3)
    temporary = TemporaryError("later", delay=2)
    assert outcome_of(temporary) == Retry(temporary, 2)
    unexpected = RuntimeError("boom")
    assert outcome_of(unexpected) == Retry(unexpected, None)
    permanent = PermanentError("never", reason="BadClaim")
    assert outcome_of(permanent) == Terminal(permanent, "BadClaim")


def test_impossible_outcomes_cannot_be_built() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        RequeueAfter(-1)
    with pytest.raises(ValueError, match="negative"):
        TemporaryError("x", delay=-1)
    with pytest.raises(TypeError):
        outcome_of("done")  # type: ignore[arg-type]


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


async def test_terminal_errors_are_reported_not_retried() -> None:
    reported: list[tuple[str, Terminal]] = []
    calls = 0

    async def reconcile(key: str) -> None:
        nonlocal calls
        calls += 1
        raise PermanentError("bad spec", reason="InvalidSpec")

    async def on_terminal(key: str, outcome: Terminal) -> None:
        reported.append((key, outcome))

    controller = Controller("t", reconcile, on_terminal=on_terminal)
    await controller.start()
    try:
        controller.enqueue("ns/x")
        for _ in range(100):
            if reported:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
    finally:
        await controller.close()
    assert calls == 1
    assert reported[0][0] == "ns/x"
    assert reported[0][1].reason == "InvalidSpec"


async def test_requeue_after_reschedules() -> None:
    seen: list[float] = []

    async def reconcile(key: str) -> RequeueAfter | None:
        seen.append(asyncio.get_running_loop().time())
        return RequeueAfter(0.05) if len(seen) < 2 else None

    controller = Controller("t", reconcile)
    await controller.start()
    try:
        controller.enqueue("k")
        for _ in range(100):
            if len(seen) >= 2:
                break
            await asyncio.sleep(0.01)
    finally:
        await controller.close()
    assert len(seen) == 2
    assert seen[1] - seen[0] >= 0.04
