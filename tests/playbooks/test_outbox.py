"""The outbox relay: commands recorded by a process that died before sending them are sent
by the next one, with the same ids, and once marked sent are not sent again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from churnguard.common.kafka import make_producer
from churnguard.common.topics import Topic
from churnguard.playbooks.outbox import OutboxRelay
from tests.fixtures.kafka import KafkaBroker, read_topic
from tests.fixtures.postgres import PgSchema
from tests.playbooks import builders as b
from tests.playbooks.conftest import make_harness
from tests.playbooks.test_decisions import account, not_held_out

pytestmark = pytest.mark.integration


async def test_unsent_commands_are_swept_with_their_ids(
    kafka: KafkaBroker, kafka_topics: str, migrated: PgSchema
) -> None:
    harness = make_harness(migrated, quiet_hours="")
    acct = not_held_out("high-risk-enterprise", "acct_crash")
    await account(harness, acct)
    t = datetime.now(UTC) - timedelta(minutes=5)
    await harness.signal(
        b.tier_crossed(acct, t, to="critical"), b.detractor(acct, t + timedelta(seconds=1))
    )
    recorded = {c.id for c in await harness.commands()}  # committed, never published
    assert len(recorded) == 3
    logged = {c.id for c in await harness.commands(topic=Topic.DECISIONS)}
    assert len(logged) == 2

    producer = make_producer(kafka.bootstrap, client_id="test", idempotent=kafka.idempotent)
    await producer.start()
    try:
        relay = OutboxRelay(migrated.engine, producer, kafka_topics, sweep_interval_s=1)
        assert await relay.sweep(grace=timedelta(0)) == 5
        assert await relay.sweep(grace=timedelta(0)) == 0
    finally:
        await producer.stop()
    topic = Topic.NOTIFICATIONS.name_in(kafka_topics)
    records = await read_topic(kafka.bootstrap, topic, 3)
    assert {Topic.NOTIFICATIONS.codec.decode(r.value)[0].id for r in records} == recorded
    assert {r.key for r in records} == {acct.encode()}
    decisions = await read_topic(kafka.bootstrap, Topic.DECISIONS.name_in(kafka_topics), 2)
    assert {Topic.DECISIONS.codec.decode(r.value)[0].id for r in decisions} == logged
    unsent = await harness.rows("SELECT command_id FROM outbox WHERE sent_at IS NULL")
    assert unsent == []
