"""The thin end-to-end slice: ingest → Kafka → Faust agent → per-account table, and dead letters."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from churnguard.common.kafka import make_producer
from churnguard.common.topics import Topic
from churnguard.devstack.process import wait_until
from tests.fixtures.kafka import KafkaBroker, read_topic
from tests.fixtures.services import RunningService, ServiceFactory
from tests.ingest.test_usage_endpoint import usage_event

pytestmark = pytest.mark.integration


async def usage_count(client: httpx.AsyncClient, scoring: RunningService, account: str) -> int:
    response = await client.get(f"{scoring.url}/accounts/{account}/usage-count")
    response.raise_for_status()
    count: int = response.json()["usage_events"]
    return count


async def await_counts(
    client: httpx.AsyncClient,
    scoring: RunningService,
    expected: dict[str, int],
    timeout: float = 60,
) -> None:
    seen: dict[str, int] = {}
    async with asyncio.timeout(timeout):
        while True:
            seen = {a: await usage_count(client, scoring, a) for a in expected}
            if seen == expected:
                return
            await asyncio.sleep(0.1)  # polling an HTTP view: there is nothing to await on


async def test_events_are_counted_per_account(
    kafka: KafkaBroker,
    kafka_topics: str,
    ingest_service: RunningService,
    scoring_service: RunningService,
) -> None:
    plan = {"acct_a1": 5, "acct_b2": 3, "acct_c3": 1}
    async with httpx.AsyncClient(base_url=ingest_service.url, auth=ingest_service.auth) as client:
        for account, n in plan.items():
            for i in range(n):
                r = await client.post(
                    "/v1/events/usage", json=usage_event(account, f"{account}-{i}")
                )
                assert r.status_code == 202, r.text
        await await_counts(client, scoring_service, plan)
        assert await usage_count(client, scoring_service, "acct_never_seen") == 0


async def test_malformed_record_goes_to_dead_letters_and_the_agent_goes_on(
    kafka: KafkaBroker,
    kafka_topics: str,
    ingest_service: RunningService,
    scoring_service: RunningService,
) -> None:
    topic = Topic.USAGE.name_in(kafka_topics)
    producer = make_producer(kafka.bootstrap, client_id="test", idempotent=kafka.idempotent)
    await producer.start()
    try:
        bad = await producer.send_and_wait(topic, b'{"id": "x", "type": "nope"', partition=1)
    finally:
        await producer.stop()

    (dead,) = await read_topic(kafka.bootstrap, Topic.USAGE.dead_letter_in(kafka_topics), 1)
    headers = dict(dead.headers)
    assert dead.value == b'{"id": "x", "type": "nope"'
    assert headers["churnguard.dlq.original-topic"] == topic.encode()
    assert headers["churnguard.dlq.original-partition"] == b"1"
    assert headers["churnguard.dlq.original-offset"] == str(bad.offset).encode()
    assert headers["churnguard.dlq.reason"].startswith(b"record value is not JSON")

    async with httpx.AsyncClient(auth=ingest_service.auth) as client:
        r = await client.post(
            f"{ingest_service.url}/v1/events/usage", json=usage_event("acct_after", "after-1")
        )
        assert r.status_code == 202
        await await_counts(client, scoring_service, {"acct_after": 1})


async def test_worker_stops_when_most_records_dead_letter(
    kafka: KafkaBroker, kafka_topics: str, start_scoring: ServiceFactory
) -> None:
    scoring = start_scoring(
        CHURNGUARD_DEAD_LETTER_WINDOW="3", CHURNGUARD_DEAD_LETTER_MAX_RATIO="0.5"
    )
    topic = Topic.USAGE.name_in(kafka_topics)
    producer = make_producer(kafka.bootstrap, client_id="test", idempotent=kafka.idempotent)
    await producer.start()
    try:
        for i in range(5):
            await producer.send_and_wait(topic, b"not an envelope %d" % i, partition=0)
    finally:
        await producer.stop()
    await asyncio.to_thread(
        wait_until, lambda: not scoring.process.alive(), timeout=60, what="scoring to stop"
    )
    assert "stopping instead of dead-lettering everything" in scoring.process.log_tail(200)
    dead = await read_topic(kafka.bootstrap, Topic.USAGE.dead_letter_in(kafka_topics), 3)
    assert [d.offset for d in dead][:3] == [0, 1, 2]
