"""The shared consumer loop on a real broker: commit after processing, dead letters, breaker."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from churnguard.common import envelope
from churnguard.common.kafka import (
    ConsumerLoop,
    DeadLetterBreaker,
    DeadLetterBreakerTripped,
    RecordProcessor,
    make_producer,
)
from churnguard.common.topics import Topic
from tests.fixtures.events import feature_used as event
from tests.fixtures.kafka import KafkaBroker, read_topic


def test_breaker_needs_a_full_window_and_forgets_old_records() -> None:
    breaker = DeadLetterBreaker(max_ratio=0.5, window=4)
    for _ in range(3):
        breaker.record(True)
    assert not breaker.tripped  # three bad records at start-up are not a full window
    breaker.record(False)
    assert breaker.tripped  # now the window is full and 3/4 > 1/2
    breaker2 = DeadLetterBreaker(max_ratio=0.5, window=4)
    for bad in (True, True, False, False, False, False):
        breaker2.record(bad)
    assert breaker2.ratio == 0.0
    assert not breaker2.tripped


def test_breaker_trips_above_the_ratio() -> None:
    breaker = DeadLetterBreaker(max_ratio=0.5, window=4)
    for bad in (True, False, True, True):
        breaker.record(bad)
    assert breaker.ratio == 0.75
    assert breaker.tripped


def usage_loop(
    kafka: KafkaBroker,
    prefix: str,
    name: str,
    process: RecordProcessor,
    producer: AIOKafkaProducer,
    breaker: DeadLetterBreaker,
) -> ConsumerLoop:
    return ConsumerLoop(
        name=f"test-{name}",
        bootstrap=kafka.bootstrap,
        topics=[Topic.USAGE.name_in(prefix)],
        group_id=prefix + name,
        process=process,
        dead_letter_topic=lambda t: Topic.USAGE.dead_letter_in(prefix),
        producer=producer,
        breaker=breaker,
    )


async def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(4)]
        return {tp.partition: (await consumer.committed(tp)) or 0 for tp in parts}
    finally:
        await consumer.stop()


@pytest.mark.integration
async def test_loop_processes_dead_letters_and_commits_after(
    kafka: KafkaBroker, kafka_topics: str
) -> None:
    topic = Topic.USAGE.name_in(kafka_topics)
    producer = make_producer(kafka.bootstrap, client_id="t", idempotent=kafka.idempotent)
    await producer.start()
    seen: list[str] = []
    done = asyncio.Event()

    async def process(record: ConsumerRecord) -> int:
        events = Topic.USAGE.codec.decode(record.value)
        seen.extend(e.id for e in events)
        if len(seen) == 5:
            done.set()
        return len(events)

    loop = usage_loop(kafka, kafka_topics, "loop", process, producer, DeadLetterBreaker(0.9, 100))
    try:
        for account, n in (("acct_a", 3), ("acct_b", 2)):
            batch = [event(account, i) for i in range(n)]
            await producer.send_and_wait(
                topic, envelope.encode(batch), partition=envelope.partition_for(account, 4)
            )
        bad = await producer.send_and_wait(topic, b"[{}]", partition=0)
        runner = asyncio.create_task(loop.run())
        await asyncio.wait_for(done.wait(), 60)
        (dead,) = await read_topic(kafka.bootstrap, Topic.USAGE.dead_letter_in(kafka_topics), 1)
        headers = dict(dead.headers)
        assert headers["churnguard.dlq.original-offset"] == str(bad.offset).encode()
        assert headers["churnguard.dlq.reason"].startswith(b"events[0]: ")
        assert headers["churnguard.dlq.consumer"] == b"test-loop"
        loop.stop()
        await asyncio.wait_for(runner, 30)
    finally:
        await producer.stop()
    assert sorted(seen) == sorted([f"acct_a-{i}" for i in range(3)] + ["acct_b-0", "acct_b-1"])
    offsets = await committed(kafka.bootstrap, kafka_topics + "loop", topic)
    assert sum(offsets.values()) == 3  # two envelopes and the dead-lettered record


@pytest.mark.integration
async def test_breaker_stops_the_loop_instead_of_emptying_the_topic(
    kafka: KafkaBroker, kafka_topics: str
) -> None:
    topic = Topic.USAGE.name_in(kafka_topics)
    producer = make_producer(kafka.bootstrap, client_id="t", idempotent=kafka.idempotent)
    await producer.start()

    async def process(record: ConsumerRecord) -> int:
        return len(Topic.USAGE.codec.decode(record.value))

    loop = usage_loop(kafka, kafka_topics, "breaker", process, producer, DeadLetterBreaker(0.5, 4))
    try:
        for i in range(10):
            await producer.send_and_wait(topic, b"garbage %d" % i, partition=0)
        with pytest.raises(DeadLetterBreakerTripped, match="stopping instead"):
            await asyncio.wait_for(loop.run(), 60)
    finally:
        await producer.stop()
    # it stopped after the fourth bad record, with those four committed, the rest untouched
    assert (await committed(kafka.bootstrap, kafka_topics + "breaker", topic))[0] == 4
