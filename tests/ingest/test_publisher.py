"""The envelope publisher: grouping across requests, dedupe, and its bounds."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka.structs import RecordMetadata, TopicPartition

from churnguard.common import envelope
from churnguard.common.kafka import make_producer
from churnguard.common.topics import Topic
from churnguard.ingest.publisher import DedupeWindow, EnvelopePublisher, PublishFailed
from tests.fixtures.events import feature_used as event
from tests.fixtures.kafka import KafkaBroker, read_topic


@dataclass
class FakeProducer:
    """Stands in for aiokafka's producer in these unit tests of the grouping logic only."""

    partitions: int = 4
    acks: bool = True
    sent: list[dict[str, Any]] = field(default_factory=list)

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(self.partitions))

    unacked: list[tuple[asyncio.Future[RecordMetadata], RecordMetadata]] = field(
        default_factory=list
    )

    async def send(self, topic: str, **record: Any) -> asyncio.Future[RecordMetadata]:
        self.sent.append(record | {"topic": topic})
        future: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        tp = TopicPartition(topic, record["partition"])
        metadata = RecordMetadata(topic, record["partition"], tp, len(self.sent) - 1, 0, 0, 0)
        if self.acks:
            future.set_result(metadata)
        else:
            self.unacked.append((future, metadata))
        return future

    def ack_late(self) -> None:
        for future, metadata in self.unacked:
            future.set_result(metadata)
        self.unacked.clear()


def publisher(producer: FakeProducer, **options: Any) -> EnvelopePublisher:
    return EnvelopePublisher(producer, "", 0.5, **options)  # type: ignore[arg-type]


async def test_concurrent_requests_share_one_envelope_per_partition() -> None:
    producer = FakeProducer()
    pub = publisher(producer, linger_s=0.01)
    accounts = [f"acct_{i}" for i in range(40)]
    results = await asyncio.gather(*(pub.publish(Topic.USAGE, [event(a, 0)]) for a in accounts))
    used = {envelope.partition_for(a, 4) for a in accounts}
    assert len(producer.sent) == len(used)  # 40 requests, one record per partition touched
    for (published,), account in zip(results, accounts, strict=True):
        assert published.partition == envelope.partition_for(account, 4)
    for record in producer.sent:
        events = envelope.unpack(record["value"])
        assert {envelope.partition_for(e["subject"], 4) for e in events} == {record["partition"]}
        assert record["key"] is None or len({e["subject"] for e in events}) == 1


async def test_envelopes_are_capped_by_event_count() -> None:
    producer = FakeProducer(partitions=1)
    pub = publisher(producer, linger_s=0.01, max_envelope_events=10)
    await pub.publish(Topic.USAGE, [event("acct_1", i) for i in range(25)])
    assert [len(envelope.unpack(r["value"])) for r in producer.sent] == [10, 10, 5]
    assert producer.sent[0]["key"] == b"acct_1"


async def test_a_published_id_is_not_published_again() -> None:
    producer = FakeProducer()
    pub = publisher(producer)
    (first,) = await pub.publish(Topic.USAGE, [event("acct_1", 1)])
    (again,) = await pub.publish(Topic.USAGE, [event("acct_1", 1)])
    assert len(producer.sent) == 1
    assert again.duplicate
    assert (again.partition, again.offset) == (first.partition, first.offset)


async def test_a_request_mixing_new_and_published_ids_is_told_which_is_which() -> None:
    producer = FakeProducer(partitions=1)  # one envelope for the whole request
    pub = publisher(producer)
    (old,) = await pub.publish(Topic.USAGE, [event("acct_1", 1)])
    outcome = await pub.publish(Topic.USAGE, [event("acct_1", n) for n in (0, 1, 2)])
    assert [p.duplicate for p in outcome] == [False, True, False]
    assert outcome[1].offset == old.offset
    assert outcome[0].offset == outcome[2].offset == 1  # the second record
    assert [e["id"] for e in envelope.unpack(producer.sent[1]["value"])] == ["acct_1-0", "acct_1-2"]


async def test_no_ack_in_time_fails_and_a_late_ack_makes_the_retry_a_duplicate() -> None:
    producer = FakeProducer(acks=False)
    pub = publisher(producer, linger_s=0.001)
    with pytest.raises(PublishFailed, match="did not acknowledge"):
        await pub.publish(Topic.USAGE, [event("acct_1", 1)])
    assert len(producer.sent) == 1
    # Kafka answers after the caller gave up; the client's retry must not publish twice
    producer.ack_late()
    async with asyncio.timeout(5):
        while pub.dedupe.get("acct_1-1") is None:  # noqa: ASYNC110 - a callback sets it, no event to await
            await asyncio.sleep(0)
    (retry,) = await pub.publish(Topic.USAGE, [event("acct_1", 1)])
    assert retry.duplicate
    assert len(producer.sent) == 1


async def test_an_id_repeated_in_one_request_or_in_flight_is_published_once() -> None:
    producer = FakeProducer()
    pub = publisher(producer, linger_s=0.01)
    batch = [event("acct_1", 1), event("acct_2", 2), event("acct_1", 1)]
    first, other = pub.publish(Topic.USAGE, batch), pub.publish(Topic.USAGE, [event("acct_2", 2)])
    (a, b, a_again), (b_again,) = await asyncio.gather(first, other)
    sent = [e["id"] for r in producer.sent for e in envelope.unpack(r["value"])]
    assert sorted(sent) == ["acct_1-1", "acct_2-2"]
    assert not a.duplicate
    assert not b.duplicate
    assert a_again.duplicate
    assert (a_again.partition, a_again.offset) == (a.partition, a.offset)
    assert b_again.duplicate
    assert (b_again.partition, b_again.offset) == (b.partition, b.offset)
    assert pub.stats.duplicates == 2


async def test_too_much_waiting_is_refused_at_once() -> None:
    pub = publisher(FakeProducer(acks=False), max_pending_events=5)
    with pytest.raises(PublishFailed, match="limit 5"):
        await pub.publish(Topic.USAGE, [event("acct_1", i) for i in range(6)])


def test_dedupe_window_forgets_the_oldest_first() -> None:
    window = DedupeWindow(ttl_s=60, max_ids=2)
    from churnguard.ingest.publisher import Published

    for i in range(3):
        window.add(f"e{i}", Published("t", 0, i))
    assert window.get("e0") is None
    assert window.get("e2") == Published("t", 0, 2)


def test_dedupe_window_expires_groups_but_keeps_ids_acknowledged_again() -> None:
    from churnguard.ingest.publisher import Published

    window = DedupeWindow(ttl_s=0.0, max_ids=100)
    first, again = Published("t", 0, 1), Published("t", 0, 2)
    window.add_many(["a", "b"], first)
    window.ttl_s = 60.0
    window.add_many(["b"], again)  # b acknowledged again (a retry whose first ack was late)
    assert window.get("a") is None  # its group expired
    assert window.get("b") == again  # the expired group does not take the newer entry along
    assert len(window) == 1


@pytest.mark.integration
async def test_envelopes_grow_with_concurrent_load_on_a_real_broker(
    kafka: KafkaBroker, kafka_topics: str
) -> None:
    producer = make_producer(kafka.bootstrap, client_id="t", idempotent=kafka.idempotent)
    await producer.start()
    try:
        pub = EnvelopePublisher(producer, kafka_topics, 30, linger_s=0.005)
        batches = [[event(f"acct_{r}_{i}", r) for i in range(20)] for r in range(50)]
        await asyncio.gather(*(pub.publish(Topic.USAGE, b) for b in batches))
    finally:
        await producer.stop()
    records = await read_topic(
        kafka.bootstrap, Topic.USAGE.name_in(kafka_topics), pub.stats.envelopes
    )
    events = [e for r in records for e in envelope.unpack(r.value)]
    assert len(events) == 1000
    assert len({e["id"] for e in events}) == 1000
    assert len(records) < 200  # 50 requests x 20 accounts, grouped by partition across requests
