"""run_until_signalled: the first signal drains, the second exits, close always runs."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from dynvol_kube import run_until_signalled


def _signal_soon(signum: int = signal.SIGTERM, delay: float = 0.02) -> None:
    asyncio.get_running_loop().call_later(delay, os.kill, os.getpid(), signum)


async def test_first_signal_closes_after_start() -> None:
    steps: list[str] = []

    async def start() -> None:
        steps.append("start")
        _signal_soon()

    async def close() -> None:
        steps.append("close")

    assert await run_until_signalled(start, close, exit_now=pytest.fail) is True
    assert steps == ["start", "close"]
    # The handlers are gone again: the default SIGINT handler is back.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


async def test_second_signal_exits_at_once_during_the_drain() -> None:
    exits: list[int] = []
    released = asyncio.Event()

    def exit_now(status: int) -> None:
        exits.append(status)
        released.set()

    async def start() -> None:
        _signal_soon(signal.SIGINT)

    async def close() -> None:
        _signal_soon(signal.SIGTERM)
        await asyncio.wait_for(released.wait(), 2)

    await run_until_signalled(start, close, exit_now=exit_now)
    assert exits == [1]


async def test_until_ends_the_run_without_a_signal() -> None:
    closed = asyncio.Event()

    async def start() -> None:
        pass

    async def until() -> None:
        await asyncio.sleep(0.01)

    async def close() -> None:
        closed.set()

    assert await run_until_signalled(start, close, until=until, exit_now=pytest.fail) is False
    assert closed.is_set()


async def test_close_runs_when_start_fails() -> None:
    closed = asyncio.Event()

    async def start() -> None:
        raise RuntimeError("cannot start")

    async def close() -> None:
        closed.set()

    with pytest.raises(RuntimeError, match="cannot start"):
        await run_until_signalled(start, close, exit_now=pytest.fail)
    assert closed.is_set()
