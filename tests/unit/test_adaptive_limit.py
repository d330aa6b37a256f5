"""The adaptive concurrency limit (backends/limiter.py), fed latencies: no clock, no sleeps."""

from __future__ import annotations

import heapq

import pytest

from stablealign.llm.backends.limiter import (
    PROMPT_TOKEN_EQUIVALENT,
    AdaptiveLimit,
    LimitSettings,
    limit_settings,
)


def run_saturated(limit: AdaptiveLimit, *, service: float, parallel: int | None, samples: int,
                  tokens: int = 20, cold: float = 0.0) -> list[tuple[int, float]]:
    """A client with always more calls to send than the limit admits, against a server that serves
    ``parallel`` requests at once (None: any number), each in ``service`` seconds; FIFO queue at the server.
    ``cold``: seconds more for the very first request (a server warming up).

    Returns (allowed limit, latency) after each finished call, but while a probe runs.
    """
    now = 0.0
    free_at = [0.0] * (parallel or 0)  # when each of the server's slots is free
    done: list[tuple[float, float, int, int]] = []  # (finish, start, epoch, in flight at start)
    in_flight = 0
    seen: list[tuple[int, float]] = []
    sent = 0
    while len(seen) < samples:
        while in_flight < limit.allowed:  # send what the limit admits, now
            in_flight += 1
            took = service + (cold if sent == 0 else 0.0)
            sent += 1
            if parallel is None:
                finish = now + took
            else:
                slot = min(range(parallel), key=lambda i: free_at[i])
                finish = max(now, free_at[slot]) + took
                free_at[slot] = finish
            heapq.heappush(done, (finish, now, limit.epoch, in_flight))
        finish, start, epoch, out = heapq.heappop(done)
        now = finish
        in_flight -= 1
        limit.success(now - start, tokens=tokens, kind="draft", epoch=epoch, in_flight=out)
        if not limit.probing:  # a probe holds the limit at one for a moment, by design
            seen.append((limit.allowed, now - start))
    return seen


def test_against_a_one_at_a_time_server_the_limit_settles_at_one_or_two():
    limit = AdaptiveLimit(1024, initial=4)
    seen = run_saturated(limit, service=2.0, parallel=1, samples=300)
    settled = seen[50:]
    limits = [allowed for allowed, _ in settled]
    # One or two; three for a moment after a probe, when two calls sent together come back at 1x and 2x.
    assert max(limits) <= 3 and sum(limit <= 2 for limit in limits) >= 0.9 * len(limits)
    # A call waits behind at most two others: never the queue of hundreds a fixed limit of 1,024 made.
    assert max(latency for _, latency in settled) <= 3 * 2.0 + 1e-9


def test_a_floor_set_by_a_cold_servers_slow_first_reply_is_measured_again():
    limit = AdaptiveLimit(1024, initial=2)
    # The first reply takes 6x as long: as a floor it would pass three or four calls queued as no queueing.
    seen = run_saturated(limit, service=1.0, parallel=1, samples=600, cold=5.0)
    settled = [allowed for allowed, _ in seen[300:]]
    assert max(settled) <= 3 and sum(limit <= 2 for limit in settled) >= 0.9 * len(settled)
    assert limit.floors["draft"] == pytest.approx(1.0 / (20 + PROMPT_TOKEN_EQUIVALENT))


def test_against_a_server_that_serves_many_at_once_the_limit_grows_to_the_bound():
    limit = AdaptiveLimit(256, initial=4)
    seen = run_saturated(limit, service=0.2, parallel=None, samples=3000)
    assert seen[-1][0] == 256
    assert all(latency == pytest.approx(0.2) for _, latency in seen)


def test_against_a_server_of_eight_slots_it_stays_near_eight():
    limit = AdaptiveLimit(1024, initial=4)
    settled = [allowed for allowed, _ in run_saturated(limit, service=1.0, parallel=8, samples=2000)[500:]]
    assert 6 <= min(settled) and max(settled) <= 13


def test_growth_doubles_per_round_trip_until_the_first_sign_of_queueing_then_one_per_round_trip():
    limit = AdaptiveLimit(1024, initial=4)
    for _ in range(4):
        limit.success(1.0, tokens=10, epoch=0, in_flight=4)
    assert limit.allowed == 8  # slow start: +1 per answered call
    limit.success(10.0, tokens=10, epoch=0, in_flight=8)  # queueing: x0.75, and slow start ends
    assert limit.allowed == 6 and limit.epoch == 1 and not limit.slow_start
    for _ in range(6):
        limit.success(1.0, tokens=10, epoch=1, in_flight=6)
    assert limit.allowed == 6 or limit.allowed == 7
    assert 6.75 < limit.limit < 7.0 + 1e-9  # about +1 over a round trip's worth of calls


def test_a_decrease_happens_once_per_round_trip():
    limit = AdaptiveLimit(1024, initial=16)
    limit.success(1.0, tokens=0, epoch=0, in_flight=1)
    for _ in range(10):  # ten late replies of calls that all started before the first decrease
        limit.success(9.0, tokens=0, epoch=0, in_flight=16)
    assert limit.allowed == 12 and limit.epoch == 1
    limit.dropped(epoch=0)  # a timeout of a call of that same round trip: already answered
    assert limit.allowed == 12
    limit.dropped(epoch=1)  # a 429 of a call sent after the decrease
    assert limit.allowed == 9 and limit.epoch == 2


@pytest.mark.parametrize("failures", [1, 5, 40])
def test_timeouts_and_overload_bring_it_down_to_one_and_never_below(failures):
    limit = AdaptiveLimit(64, initial=32)
    for _ in range(failures):
        limit.dropped(epoch=limit.epoch)
    assert limit.allowed == max(1, int(32 * 0.75 ** failures))
    assert limit.allowed >= 1


def test_a_long_reply_is_not_a_slow_server_and_kinds_of_call_are_compared_apart():
    limit = AdaptiveLimit(1024, initial=4)
    limit.success(0.5, tokens=16, kind="draft", epoch=0, in_flight=4)
    limit.success(8.0, tokens=316, kind="draft", epoch=0, in_flight=4)  # 20x the tokens, 16x the time
    limit.success(0.9, tokens=1, kind="rate_alignment", epoch=0, in_flight=4)  # a rating: its own floor
    assert limit.epoch == 0 and limit.allowed == 7


def test_a_limit_not_in_use_does_not_grow_and_the_bound_holds():
    limit = AdaptiveLimit(6, initial=4)
    for _ in range(10):
        limit.success(1.0, tokens=10, epoch=0, in_flight=1)  # one call at a time: 4 places are plenty
    assert limit.allowed == 4
    for _ in range(10):
        limit.success(1.0, tokens=10, epoch=0, in_flight=limit.allowed)
    assert limit.allowed == 6


def test_a_floor_taken_alone_follows_a_server_that_became_slower_for_good():
    limit = AdaptiveLimit(64, initial=1)
    limit.success(1.0, tokens=0, epoch=0, in_flight=1)
    for _ in range(60):  # the server now takes 3x as long, with nothing of ours queued beside the call
        limit.success(3.0, tokens=0, epoch=limit.epoch, in_flight=1)
    assert limit.floors[""] > 2.0 / PROMPT_TOKEN_EQUIVALENT  # per token, the prompt counted as a few
    assert limit.allowed >= 2  # it grows again once 3 s is the new normal


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("STABLEALIGN_LLM_LIMIT_INITIAL", "2")
    monkeypatch.setenv("STABLEALIGN_LLM_LIMIT_TOLERANCE", "2.5")
    settings = limit_settings()
    assert isinstance(settings, LimitSettings) and settings.initial == 2 and settings.tolerance == 2.5
    with pytest.raises(ValueError):
        AdaptiveLimit(0)


async def test_the_limiter_admits_first_come_first_served_and_a_cancelled_waiter_loses_nothing():
    import asyncio

    from stablealign.llm.backends.limiter import ConcurrencyLimiter

    limiter = ConcurrencyLimiter(2, backend="test", endpoint="http://127.0.0.1:1/v1")
    first, second = await limiter.acquire(), await limiter.acquire()
    order: list[int] = []

    async def wait(n: int) -> None:
        slot = await limiter.acquire()
        order.append(n)
        limiter.release(slot)

    waiters = [asyncio.create_task(wait(n)) for n in range(4)]
    await asyncio.sleep(0)
    assert limiter.in_flight == 2 and not order
    waiters[1].cancel()  # gives up while waiting: never admitted, holds nothing
    limiter.release(first)
    await asyncio.sleep(0)
    limiter.release(second, tokens=3, kind="draft")  # fixed limit: a sample changes nothing
    await asyncio.gather(*waiters, return_exceptions=True)
    assert order == [0, 2, 3] and limiter.in_flight == 0 and limiter.allowed == 2
    limiter.release(first)  # a slot is given back once
    assert limiter.in_flight == 0


async def test_a_waiter_cancelled_just_as_it_was_admitted_gives_its_place_on():
    import asyncio

    from stablealign.llm.backends.limiter import ConcurrencyLimiter

    limiter = ConcurrencyLimiter(1)
    held = await limiter.acquire()
    late = asyncio.create_task(limiter.acquire())
    after = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    limiter.release(held)  # hands the place to ``late``...
    late.cancel()  # ...which is cancelled before it runs: the place goes to ``after``
    await asyncio.gather(late, return_exceptions=True)
    slot = await after
    assert limiter.in_flight == 1 and slot.in_flight == 1
