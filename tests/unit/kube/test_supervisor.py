"""Supervisor: a background task that fails is logged, counted and started again."""

from __future__ import annotations

import asyncio
import logging

import pytest

from dynvol_kube import Supervisor


async def test_a_failing_task_is_restarted_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    runs = 0
    third = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError(f"failure {runs}")
        third.set()
        await asyncio.Event().wait()  # then runs for good

    supervisor = Supervisor(base=0.01, cap=0.02)
    supervisor.start("flaky", flaky)
    try:
        with caplog.at_level(logging.ERROR, logger="dynvol_kube.lifecycle"):
            await asyncio.wait_for(third.wait(), 5)
    finally:
        await supervisor.close()
    assert runs == 3
    assert supervisor.failures["flaky"] == 2
    assert [r.exc_info[1].args[0] for r in caplog.records if r.exc_info and r.exc_info[1]] == [
        "failure 1",
        "failure 2",
    ]


async def test_a_task_that_ends_is_restarted_too() -> None:
    runs = 0
    again = asyncio.Event()

    async def short() -> None:
        nonlocal runs
        runs += 1
        if runs == 2:
            again.set()

    supervisor = Supervisor(base=0.01, cap=0.01)
    supervisor.start("short", short)
    try:
        await asyncio.wait_for(again.wait(), 5)
    finally:
        await supervisor.close()
    assert supervisor.failures["short"] >= 1


async def test_close_cancels_and_a_name_is_supervised_once() -> None:
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    supervisor = Supervisor()
    supervisor.start("forever", forever)
    with pytest.raises(ValueError, match="already supervised"):
        supervisor.start("forever", forever)
    await asyncio.sleep(0)
    await supervisor.close()
    assert cancelled.is_set()
    assert supervisor.failures["forever"] == 0
