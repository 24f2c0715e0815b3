"""Apache Kafka from Maven Central: acknowledged messages survive a SIGKILL of the broker."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from churnguard.devstack.apache_kafka import ApacheKafkaBroker, fetch_kafka_jars, java_available
from churnguard.devstack.process import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not java_available(),
        reason="Apache Kafka suite skipped: java and mvn are required; .ci/run installs them",
    ),
]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("CHURNGUARD_CACHE_DIR", REPO_ROOT / ".dev" / "cache"))
MESSAGES = 100


def _record(what: str, seconds: float) -> None:
    line = f"apache-kafka timing: {what}: {seconds:.1f} s"
    print(line)
    log.info(line)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ApacheKafkaBroker]:
    started = time.monotonic()
    fetch_kafka_jars(CACHE_DIR)
    _record("fetch jars (0 when cached)", time.monotonic() - started)
    kafka = ApacheKafkaBroker(
        data_dir=tmp_path / "kafka",
        cache_dir=CACHE_DIR,
        port=free_port(),
        controller_port=free_port(),
    )
    try:
        yield kafka
    finally:
        kafka.stop()


async def _consume_all(bootstrap: str, topic: str, expected: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        async with asyncio.timeout(30):
            while len(values) < expected:
                batches = await consumer.getmany(timeout_ms=1000)
                values.extend(rec.value for recs in batches.values() for rec in recs)
    finally:
        await consumer.stop()
    return values


async def test_acknowledged_messages_survive_kill_9(broker: ApacheKafkaBroker) -> None:
    started = time.monotonic()
    broker.start()
    _record("first start (format + start) to ready", time.monotonic() - started)
    first_pid = broker.pid
    assert first_pid is not None

    topic = "durability-check"
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])
    finally:
        await admin.close()

    sent = [f"message-{i}".encode() for i in range(MESSAGES)]
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    try:
        acks = await asyncio.gather(*[await producer.send(topic, value) for value in sent])
    finally:
        await producer.stop()
    assert len(acks) == MESSAGES

    assert sorted(await _consume_all(broker.bootstrap, topic, MESSAGES)) == sorted(sent)

    broker.kill()
    assert not broker.alive()
    assert broker.pid is None

    started = time.monotonic()
    broker.start()
    _record("restart after kill -9 to ready", time.monotonic() - started)
    assert broker.pid not in (None, first_pid)

    recovered = await _consume_all(broker.bootstrap, topic, MESSAGES)
    assert sorted(recovered) == sorted(sent), "acknowledged messages lost after kill -9"
