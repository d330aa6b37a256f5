"""Stream reads without a consumer (``stablealign.nats.direct``), on a real nats-server.

What a reader would notice: every message of its subject, in order, a batch at a time, none of another
subject's; a read bounded at the subject's last message when it began while others keep publishing; a follow
that sees what is published after it started, says when it has caught up and rides out a NATS restart; a read
whose last messages were removed meanwhile ends instead of waiting for them; and a stream that does not serve
direct gets is one clear error, not a hang.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from nats.js.api import StreamConfig

from stablealign.core.errors import UnavailableError
from stablealign.nats import client as nats_client
from stablealign.nats import direct

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def js(nats_url):
    nc = await nats_client.connect(nats_url, "direct-reads", give_up_after=5.0)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="READS", subjects=["reads.>"], allow_direct=True))
    yield js
    await nc.close()


async def test_a_read_holds_one_subject_in_order_a_batch_at_a_time(js):
    for i in range(150):
        await js.publish("reads.mine", f"m{i}".encode(), headers={"Nats-Msg-Id": f"id-{i}"})
        await js.publish("reads.other", b"x")
    batches = [got async for got in direct.read_batches(js, "READS", "reads.mine", batch=64)]
    assert [len(b) for b in batches] == [64, 64, 22]
    messages = [m for b in batches for m in b]
    assert [m.data for m in messages] == [f"m{i}".encode() for i in range(150)]
    assert [m.seq for m in messages] == list(range(1, 300, 2))
    assert {m.subject for m in messages} == {"reads.mine"} and messages[7].headers["Nats-Msg-Id"] == "id-7"
    after = await direct.read_subject(js, "READS", "reads.mine", after_seq=messages[-2].seq)
    assert [(seq, m.data) for seq, m in after] == [(messages[-1].seq, b"m149")]
    assert await direct.read_subject(js, "READS", "reads.none") == []


async def test_a_read_stops_where_the_subject_ended_when_it_began(js):
    for i in range(10):
        await js.publish("reads.mine", f"m{i}".encode())
    seen = []
    async for got in direct.read_batches(js, "READS", "reads.mine", batch=3):
        seen.extend(m.data for m in got)
        await js.publish("reads.mine", b"later")  # published while the read goes on: not part of it
    assert seen == [f"m{i}".encode() for i in range(10)]


async def test_follow_sees_new_messages_and_says_when_it_has_caught_up(js):
    await js.publish("reads.mine", b"before")
    start = await direct.last_sequence(js, "READS", "reads.mine")
    got: list[bytes | None] = []
    async with contextlib.aclosing(direct.follow(js, "READS", "reads.mine", after_seq=start, poll_seconds=0.05)) as live:
        async for msg in live:
            got.append(None if msg is None else msg.data)
            if got.count(None) == 1:
                await js.publish("reads.mine", b"new")
            if b"new" in got:
                break
    assert b"before" not in got and got[-1] == b"new" and got[0] is None


async def test_a_read_whose_last_messages_were_removed_ends(js):
    for i in range(5):
        await js.publish("reads.mine", f"m{i}".encode())
    end = await direct.last_sequence(js, "READS", "reads.mine")
    await js.delete_msg("READS", end)  # e.g. an age limit, between the start of a read and its end
    batches = [b async for b in direct.read_batches(js, "READS", "reads.mine", up_to=end, batch=2, idle_timeout=5)]
    got = [m.data for b in batches for m in b]
    assert got == [b"m0", b"m1", b"m2", b"m3"]


async def test_follow_rides_out_a_nats_restart(nats_server, js):
    await js.publish("reads.mine", b"before")
    seen: list[bytes] = []
    restarting: asyncio.Task | None = None
    reader = direct.follow(js, "READS", "reads.mine", poll_seconds=0.05, outage_seconds=30)
    async with contextlib.aclosing(reader) as live:
        async for msg in live:  # the follow keeps asking while the server is down
            if msg is not None:
                seen.append(msg.data)
                if msg.data == b"after":
                    break
            elif restarting is None:
                restarting = asyncio.create_task(asyncio.to_thread(nats_server.restart))
            elif restarting.done() and seen == [b"before"]:
                await restarting
                await js.publish("reads.mine", b"after", timeout=10)
    assert seen == [b"before", b"after"]


async def test_a_stream_without_direct_gets_is_a_clear_error(js):
    await js.add_stream(StreamConfig(name="NODIRECT", subjects=["nodirect.>"]))
    await js.publish("nodirect.a", b"x")
    with pytest.raises(UnavailableError, match="direct get of nodirect.a from NODIRECT"):
        await asyncio.wait_for(direct.read_subject(js, "NODIRECT", "nodirect.a"), timeout=10)
