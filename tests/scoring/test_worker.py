"""The scoring worker against a real broker: online features equal offline ones over a
simulated stream, before and after a SIGKILL; its outputs are valid events; bad input
goes to dead letters while the rest flows on."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import date
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import TypeAdapter

from churnguard.common import envelope
from churnguard.common.events.derived import RevenueMovement, ScoreEvent, SignalEvent
from churnguard.common.kafka import make_producer
from churnguard.common.topics import Topic
from churnguard.scoring.features import AccountState, day_ordinal
from churnguard.simulator.world import SimConfig, World
from tests.fixtures.kafka import KafkaBroker, read_topic
from tests.fixtures.services import RunningService, ServiceFactory

pytestmark = pytest.mark.integration

PARTITIONS = 4
TOPIC_OF = {
    "usage": Topic.USAGE,
    "billing": Topic.BILLING,
    "feedback": Topic.FEEDBACK,
}


def simulated_events(accounts: int, days: int, seed: int) -> list[dict[str, Any]]:
    events = []
    for day in World(SimConfig(accounts=accounts, days=days, seed=seed)).run():
        events.extend(orjson.loads(line) for line in day.lines)
    return events


async def publish_as_envelopes(
    kafka: KafkaBroker, prefix: str, events: list[dict[str, Any]], size: int = 200
) -> dict[TopicPartition, int]:
    """Every event to its topic in partition envelopes, in stream order, as ingest would:
    an envelope closes when full or when the stream's day ends. Returns the end offset of
    each partition written."""
    chunks: dict[tuple[Topic, int], list[bytes]] = defaultdict(list)
    producer = make_producer(kafka.bootstrap, client_id="test", idempotent=kafka.idempotent)
    await producer.start()
    ends: dict[TopicPartition, int] = {}
    try:

        async def flush(topic: Topic, partition: int) -> None:
            payloads = chunks.pop((topic, partition))
            sent = await producer.send_and_wait(
                topic.name_in(prefix),
                envelope.encode_raw(payloads),
                partition=partition,
                headers=envelope.headers(),
            )
            ends[TopicPartition(sent.topic, sent.partition)] = sent.offset + 1

        day = ""
        for event in events:
            if event["time"][:10] != day:  # what ingest has acknowledged by then is in Kafka
                day = event["time"][:10]
                for topic, partition in list(chunks):
                    await flush(topic, partition)
            topic = TOPIC_OF[event["type"].split(".")[1]]
            partition = envelope.partition_for(event["subject"], PARTITIONS)
            chunks[(topic, partition)].append(orjson.dumps(event))
            if len(chunks[(topic, partition)]) >= size:
                await flush(topic, partition)
        for topic, partition in list(chunks):
            await flush(topic, partition)
    finally:
        await producer.stop()
    return ends


async def await_committed(
    kafka: KafkaBroker, group: str, ends: dict[TopicPartition, int], timeout: float = 60
) -> None:
    """Until the scoring group has committed every record up to ``ends``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        async with asyncio.timeout(timeout):
            while True:
                committed = await admin.list_consumer_group_offsets(group, partitions=list(ends))
                if all(tp in committed and committed[tp].offset >= end for tp, end in ends.items()):
                    return
                await asyncio.sleep(0.2)  # polling the group's offsets: nothing to await on
    finally:
        await admin.close()


def offline_features(events: list[dict[str, Any]], as_of: int) -> dict[str, dict[str, float]]:
    states: dict[str, AccountState] = defaultdict(AccountState)
    for event in events:
        states[event["subject"]].apply(event)
    return {account: state.features(as_of).as_dict() for account, state in states.items()}


async def online_features(
    client: httpx.AsyncClient, scoring: RunningService, account: str, as_of: int
) -> dict[str, float] | None:
    response = await client.get(
        f"{scoring.url}/accounts/{account}", params={"as_of_ordinal": as_of}
    )
    if response.status_code == 404:
        return None
    response.raise_for_status()
    features: dict[str, float] = response.json()["features"]
    return features


async def await_equal(
    client: httpx.AsyncClient,
    scoring: RunningService,
    expected: dict[str, dict[str, float]],
    as_of: int,
    timeout: float = 120,
) -> None:
    pending = set(expected)
    try:
        async with asyncio.timeout(timeout):
            while pending:
                for account in sorted(pending):
                    if await online_features(client, scoring, account, as_of) == expected[account]:
                        pending.discard(account)
                if pending:
                    await asyncio.sleep(0.2)  # polling an HTTP view: nothing to await on
    except TimeoutError:
        account = sorted(pending)[0]
        got = await online_features(client, scoring, account, as_of) or {}
        diff = {k: (v, got.get(k)) for k, v in expected[account].items() if got.get(k) != v}
        raise AssertionError(f"{len(pending)} accounts differ, e.g. {account}: {diff}") from None


async def test_online_features_equal_offline_ones_and_survive_a_kill(
    kafka: KafkaBroker, kafka_topics: str, start_scoring: ServiceFactory
) -> None:
    events = simulated_events(accounts=40, days=100, seed=7)
    assert {e["type"].split(".")[1] for e in events} == set(TOPIC_OF)
    cut = next(
        i
        for i, e in enumerate(events)
        if day_ordinal(e["time"]) >= day_ordinal(events[-1]["time"]) - 10
    )
    head, tail = events[:cut], events[cut:]
    as_of = max(day_ordinal(e["time"]) for e in events)
    group = f"{kafka_topics}churnguard-scoring"

    scoring = start_scoring()
    ends = await publish_as_envelopes(kafka, kafka_topics, head)
    async with httpx.AsyncClient(timeout=10) as client:
        await await_equal(client, scoring, offline_features(head, as_of), as_of)
        # everything committed, then SIGKILL: the restarted worker consumes nothing again,
        # so what it knows comes from the changelog alone
        await await_committed(kafka, group, ends)
        scoring.process.kill()
        restored = start_scoring()
        await await_equal(client, restored, offline_features(head, as_of), as_of)

        # the rest of the stream, and SIGKILL as soon as it is applied (no flush, no
        # commit): the next worker restores the state and consumes part of it again
        await publish_as_envelopes(kafka, kafka_topics, tail)
        expected = offline_features(events, as_of)
        await await_equal(client, restored, expected, as_of)
        restored.process.kill()
        restarted = start_scoring()
        await await_equal(client, restarted, expected, as_of)

    # what it produced: a score per account, movements for billing, all valid events
    scores = await read_topic(kafka.bootstrap, Topic.SCORES.name_in(kafka_topics), len(expected))
    scored = {TypeAdapter(ScoreEvent).validate_json(r.value).subject for r in scores}
    assert scored <= set(expected)
    movements = await read_topic(kafka.bootstrap, Topic.REVENUE_MOVEMENTS.name_in(kafka_topics), 1)
    RevenueMovement.model_validate_json(movements[0].value)


async def test_scores_and_signals_are_valid_events_keyed_by_account(
    kafka: KafkaBroker, kafka_topics: str, scoring_service: RunningService
) -> None:
    events = simulated_events(accounts=60, days=60, seed=11)
    await publish_as_envelopes(kafka, kafka_topics, events)
    accounts = {e["subject"] for e in events}
    scores = await read_topic(kafka.bootstrap, Topic.SCORES.name_in(kafka_topics), len(accounts))
    for record in scores:
        event = TypeAdapter(ScoreEvent).validate_json(record.value)
        assert record.key == event.subject.encode()
        assert record.partition == envelope.partition_for(event.subject, PARTITIONS)
    signals = await read_topic(kafka.bootstrap, Topic.SIGNALS.name_in(kafka_topics), 1)
    for record in signals:
        TypeAdapter(SignalEvent).validate_json(record.value)

    # what an SRE scrapes: every event consumed, scores sent, the model's version
    async with httpx.AsyncClient(timeout=10) as client:
        async with asyncio.timeout(60):
            while (  # noqa: ASYNC110 - polling an HTTP view: nothing to await on
                consumed := metric(
                    await client.get(f"{scoring_service.url}/metrics"),
                    "churnguard_consumer_events_total",
                )
            ) < len(events):
                await asyncio.sleep(0.2)
        response = await client.get(f"{scoring_service.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    assert consumed == len(events)
    assert metric(response, 'churnguard_scoring_outputs_total{kind="scores"') >= len(accounts)
    assert 'churnguard_scoring_model_info{version="gbm-' in response.text


def metric(response: httpx.Response, name: str) -> float:
    """The sum of a metric's samples whose line starts with ``name`` (labels may follow)."""
    response.raise_for_status()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in response.text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


async def test_bad_records_and_events_go_to_dead_letters_and_the_rest_flows_on(
    kafka: KafkaBroker, kafka_topics: str, scoring_service: RunningService
) -> None:
    topic = Topic.USAGE.name_in(kafka_topics)
    good = {
        "id": "good-1",
        "type": "churnguard.usage.feature_used",
        "time": f"{date(2025, 5, 2).isoformat()}T10:00:00Z",
        "subject": "acct_dlq",
        "data": {"user_id": "u1", "feature": "reports", "count": 2},
    }
    future = dict(good, id="future-1", time="2999-01-01T00:00:00Z")
    partition = envelope.partition_for("acct_dlq", PARTITIONS)
    producer = make_producer(kafka.bootstrap, client_id="test", idempotent=kafka.idempotent)
    await producer.start()
    try:
        bad = await producer.send_and_wait(topic, b'{"id": "x", "type": "nope"', partition=1)
        await producer.send_and_wait(
            topic,
            envelope.encode_raw([orjson.dumps(future), orjson.dumps(good)]),
            partition=partition,
        )
    finally:
        await producer.stop()

    dead = await read_topic(kafka.bootstrap, Topic.USAGE.dead_letter_in(kafka_topics), 2)
    by_origin = {
        (h["churnguard.dlq.original-partition"], h["churnguard.dlq.original-offset"]): r
        for r in dead
        if (h := dict(r.headers))
    }
    record = by_origin[(str(bad.partition).encode(), str(bad.offset).encode())]
    assert record.value == b'{"id": "x", "type": "nope"'
    headers = dict(record.headers)
    assert headers["churnguard.dlq.original-topic"] == topic.encode()
    assert headers["churnguard.dlq.reason"].startswith(b"record value is not JSON")
    (event_letter,) = [r for r in dead if r is not record]
    assert orjson.loads(event_letter.value)["id"] == "future-1"
    assert b"future" in dict(event_letter.headers)["churnguard.dlq.reason"]
    async with httpx.AsyncClient(timeout=10) as client:
        async with asyncio.timeout(60):
            while (  # noqa: ASYNC110 - polling an HTTP view: nothing to await on
                got := await online_features(
                    client, scoring_service, "acct_dlq", date(2025, 5, 2).toordinal()
                )
            ) is None:
                await asyncio.sleep(0.2)
        assert got["activity_1d"] == 2
