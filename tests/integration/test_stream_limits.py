"""Every JetStream stream and KV bucket is bounded (max_bytes, max_age) and replicated as configured, new limits
reach streams made before, and a full records stream refuses new records instead of dropping old ones
(stablealign/nats/streams.py). Against a real nats-server."""

from __future__ import annotations

import nats.js.errors
import pytest
from nats.js.api import DiscardPolicy

from stablealign.nats import streams, subjects
from stablealign.nats.streams import DAY_SECONDS, MiB, StreamSettings
from stablealign.sandbox import memory
from tests.support.streams import ensure_all_streams

STREAMS = (subjects.RECORDS_STREAM, subjects.MEMORY_STREAM, memory.POOL_STREAM, subjects.JOB_LOGS_STREAM,
           f"KV_{subjects.WORLDS_BUCKET}", f"KV_{subjects.JOBS_BUCKET}")


@pytest.fixture
def limits():
    """Sets this process's stream limits for one test, then puts the defaults back."""
    def use(**fields) -> StreamSettings:
        settings = StreamSettings(**fields)
        streams.configure(settings)
        return settings

    yield use
    streams.configure(StreamSettings())


async def test_every_stream_and_bucket_has_byte_and_age_limits(nc):
    js = nc.jetstream()
    await memory.ensure_pool_stream(js)
    defaults = StreamSettings()
    infos = {info.config.name: info.config for info in await js.streams_info()}
    assert set(STREAMS) <= set(infos)
    for name, config in infos.items():  # whatever a future version adds is bounded too
        assert config.max_bytes and config.max_bytes > 0, name
        assert config.max_age and config.max_age > 0, name
        assert config.num_replicas == defaults.stream_replicas == 1, name
    records = infos[subjects.RECORDS_STREAM]
    assert records.max_bytes == defaults.stream_records_max_bytes
    assert records.max_age == defaults.stream_records_max_age_days * DAY_SECONDS
    assert records.discard == DiscardPolicy.NEW  # training data: refuse, never drop the oldest silently
    assert infos[subjects.JOB_LOGS_STREAM].discard == DiscardPolicy.OLD
    assert records.duplicate_window <= records.max_age
    # The byte limits together fit the NATS volume the manifests give the server (max_file_store 9GB).
    assert sum(config.max_bytes for config in infos.values()) < 9 * 10**9


async def test_new_limits_reach_streams_and_buckets_made_before(nc, limits):
    js = nc.jetstream()
    limits(stream_records_max_bytes=64 * MiB, stream_records_max_age_days=7, stream_state_max_bytes=8 * MiB,
           stream_state_max_age_days=1)
    await ensure_all_streams(js)
    records = (await js.stream_info(subjects.RECORDS_STREAM)).config
    assert (records.max_bytes, records.max_age) == (64 * MiB, 7 * DAY_SECONDS)
    worlds = (await js.stream_info(f"KV_{subjects.WORLDS_BUCKET}")).config
    assert (worlds.max_bytes, worlds.max_age) == (8 * MiB, DAY_SECONDS)
    assert worlds.max_msgs_per_subject == 1  # still a bucket with one value per key
    kv = await js.key_value(subjects.WORLDS_BUCKET)
    await kv.put("w1", b"state")
    assert (await kv.get("w1")).value == b"state"


async def test_a_full_records_stream_refuses_new_records_and_keeps_the_old(nc, limits):
    js = nc.jetstream()
    limits(stream_records_max_bytes=1 * MiB)
    await ensure_all_streams(js)
    chunk = b"x" * (200 * 1024)
    subject = subjects.RECORDS_SUBJECT.format(world_id="full")
    with pytest.raises(nats.js.errors.APIError, match="maximum bytes exceeded"):
        for i in range(8):
            await js.publish(subject, chunk, headers={subjects.MSG_ID_HEADER: f"full.0.{i}"})
    first = await js.get_msg(subjects.RECORDS_STREAM, seq=1)
    assert first.headers[subjects.MSG_ID_HEADER] == "full.0.0"
