"""stablealign.serving.service.unless_stopped: a start that may wait forever still gives way to a stop."""

from __future__ import annotations

import asyncio

import pytest

from stablealign.serving.service import unless_stopped


async def test_the_result_when_the_work_ends_first():
    async def work() -> str:
        return "up"

    assert await unless_stopped(work(), asyncio.Event()) == (True, "up")


async def test_a_stop_first_cancels_the_work_and_waits_for_its_clean_up():
    cleaned = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned.set()

    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, stop.set)
    assert await asyncio.wait_for(unless_stopped(work(), stop), timeout=5) == (False, None)
    assert cleaned.is_set()


async def test_a_failed_start_is_raised():
    async def work() -> None:
        raise RuntimeError("no port")

    with pytest.raises(RuntimeError, match="no port"):
        await unless_stopped(work(), asyncio.Event())
