"""Load through a Kafka crash: no acknowledged event is lost, and ingest recovers by itself.

Eight senders post native usage batches to a real ingest process while the test's own
Apache Kafka broker (not the shared session broker) is SIGKILLed and, a few seconds
later, started again on the same durable log directory. Every request must come back
within the publish timeout plus a margin (503 with ``Retry-After`` while Kafka is away),
senders retry with the same ids as a client should, and afterwards every id that got a
2xx must be on ``events.usage``. Duplicates are allowed (at-least-once) and reported.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from churnguard.common import envelope
from churnguard.common.kafka import ensure_topics
from churnguard.common.topics import Topic, planned_topics
from churnguard.devstack.apache_kafka import ApacheKafkaBroker, java_available
from churnguard.devstack.process import free_port, pid_alive, wait_until
from tests.fixtures.kafka import CACHE_DIR, TEST_STATE, KafkaBroker
from tests.fixtures.services import IngestDatabase, _run, service_env

pytestmark = pytest.mark.integration

PUBLISH_TIMEOUT_S = 3
MAX_LATENCY_S = 10.0
"""No request may take longer: the publish timeout plus a generous margin."""
SENDERS = 8
BATCH_SIZE = 50
ACCOUNTS = 300
MAX_REQUESTS_PER_SENDER = 400
PACE_S = 0.1
"""Pause of a sender after an acknowledged batch (keeps the topic to tens of thousands)."""
WARM_S = 3.0
OUTAGE_S = 3.0
AFTER_RESTART_S = 3.0
RETRY_AFTER_CAP_S = 2.0


@pytest.fixture
def own_broker() -> Iterator[ApacheKafkaBroker]:
    """An Apache Kafka broker of this test's own: it gets killed, so not the shared one."""
    if not java_available():
        if os.environ.get("CHURNGUARD_TEST_REQUIRE_APACHE") == "1":
            pytest.fail("CHURNGUARD_TEST_REQUIRE_APACHE=1 but java or mvn is missing")
        pytest.skip(
            "Kafka restart test skipped: java and mvn are required to fetch and run Apache "
            "Kafka (.ci/run installs them; `apt-get install openjdk-17-jre-headless maven`)"
        )
    state = TEST_STATE / f"kafka-restart-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    broker = ApacheKafkaBroker(
        data_dir=state, cache_dir=CACHE_DIR, port=free_port(), controller_port=free_port()
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(state, ignore_errors=True)


def usage_event(event_id: str, account: str) -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "/tests/load",
        "type": "churnguard.usage.feature_used",
        "time": "2026-11-20T09:30:00Z",
        "subject": account,
        "schemaversion": 1,
        "data": {"user_id": f"u_{account}", "feature": "dashboards"},
    }


@dataclass
class Outcome:
    sent: float
    done: float
    status: int | None
    """HTTP status, or None for a connection error or client timeout."""
    retry_after: str | None = None
    accepted: list[dict[str, object]] = field(default_factory=list)

    @property
    def latency(self) -> float:
        return self.done - self.sent


@dataclass
class Load:
    acknowledged: set[str] = field(default_factory=set)
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def sender(client: httpx.AsyncClient, load: Load, number: int, run: str) -> None:
    rng = random.Random(number)
    seq = 0
    batch: list[dict[str, object]] | None = None
    for _ in range(MAX_REQUESTS_PER_SENDER):
        if load.stop.is_set():
            return
        if batch is None:  # a new batch only once the previous one was acknowledged
            batch = [
                usage_event(f"{run}-{number}-{seq}-{i}", f"acct_{rng.randrange(ACCOUNTS):04d}")
                for i in range(BATCH_SIZE)
            ]
            seq += 1
        sent = time.monotonic()
        try:
            response = await client.post("/v1/events/usage/batch", json={"events": batch})
        except httpx.TransportError:
            load.outcomes.append(Outcome(sent, time.monotonic(), None))
            await asyncio.sleep(0.5)
            continue
        outcome = Outcome(sent, time.monotonic(), response.status_code)
        load.outcomes.append(outcome)
        if response.is_success:
            outcome.accepted = response.json()["accepted"]
            assert not response.json()["rejected"], response.text
            load.acknowledged.update(str(a["id"]) for a in outcome.accepted)
            batch = None
            await asyncio.sleep(PACE_S)
        elif response.status_code == 503:
            outcome.retry_after = response.headers.get("retry-after")
            # honour Retry-After, with jitter so that the senders do not retry in lockstep
            wait = min(float(outcome.retry_after or 1), RETRY_AFTER_CAP_S)
            await asyncio.sleep(wait * rng.uniform(0.5, 1.0))
        else:
            raise AssertionError(f"unexpected {response.status_code}: {response.text}")


async def read_ids(bootstrap: str, topic: str, timeout: float = 20.0) -> list[str]:
    """Every event id in every envelope of ``topic``, read up to its end offsets."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    ids: list[str] = []
    try:
        partitions = [TopicPartition(topic, p) for p in range(Topic.USAGE.spec.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        async with asyncio.timeout(timeout):
            while ends := {t: end for t, end in ends.items() if await consumer.position(t) < end}:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    ids.extend(e["id"] for r in records for e in envelope.unpack(r.value))
    finally:
        await consumer.stop()
    return ids


async def test_no_acknowledged_event_is_lost_when_kafka_is_killed_and_restarted(
    own_broker: ApacheKafkaBroker, ingest_database: IngestDatabase, tmp_path: Path
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}."
    await asyncio.wait_for(ensure_topics(own_broker.bootstrap, planned_topics(prefix)), 60)
    port = free_port()
    ingest = _run(
        "ingest",
        [sys.executable, "-m", "churnguard.ingest"],
        service_env(
            KafkaBroker("apache", own_broker.bootstrap, idempotent=True),
            prefix,
            CHURNGUARD_INGEST_PORT=str(port),
            CHURNGUARD_INGEST_HOST="127.0.0.1",
            CHURNGUARD_DATABASE_URL=ingest_database.url,
            CHURNGUARD_INGEST_DB_SCHEMA=ingest_database.schema,
            CHURNGUARD_INGEST_PUBLISH_TIMEOUT_S=str(PUBLISH_TIMEOUT_S),
        ),
        tmp_path / "ingest.log",
        f"http://127.0.0.1:{port}",
    )
    load = Load()
    run = uuid.uuid4().hex[:6]
    try:
        async with httpx.AsyncClient(
            base_url=ingest.url,
            auth=(ingest_database.write_key, ""),
            timeout=httpx.Timeout(MAX_LATENCY_S + 5, connect=5),
            limits=httpx.Limits(max_connections=SENDERS),
        ) as client:
            senders = [asyncio.create_task(sender(client, load, n, run)) for n in range(SENDERS)]
            try:
                await asyncio.sleep(WARM_S)
                assert load.acknowledged, "nothing acknowledged before the broker was killed"
                pid = own_broker.pid
                assert pid is not None
                await asyncio.to_thread(own_broker.kill)
                await asyncio.to_thread(
                    wait_until, lambda: not pid_alive(pid), timeout=10, what=f"pid {pid} to exit"
                )
                killed = time.monotonic()
                await asyncio.sleep(OUTAGE_S)
                restart_called = time.monotonic()
                await asyncio.to_thread(own_broker.start)
                restarted = time.monotonic()
                await asyncio.sleep(AFTER_RESTART_S)
            finally:
                load.stop.set()
            async with asyncio.timeout(MAX_LATENCY_S + 10):
                await asyncio.gather(*senders)
        log_tail = ingest.process.log_tail(20)
    finally:
        ingest.process.stop()

    outcomes = load.outcomes
    unavailable = [o for o in outcomes if o.status == 503]
    failed = [o for o in outcomes if o.status is None]
    max_latency = max(o.latency for o in outcomes)
    after_restart = [o.done for o in outcomes if o.status == 202 and o.done >= restart_called]
    # while the broker was down (sent after the kill, answered before the restart began)
    # a 2xx could only be for ids already acknowledged earlier (dedupe hits)
    lied = [
        o
        for o in outcomes
        if o.status == 202
        and o.sent >= killed
        and o.done < restart_called
        and not all(a["duplicate"] for a in o.accepted)
    ]

    topic = Topic.USAGE.name_in(prefix)
    on_topic = await read_ids(own_broker.bootstrap, topic)
    present = set(on_topic)
    lost = load.acknowledged - present
    duplicates = sum(n - 1 for n in Counter(on_topic).values() if n > 1)

    print(
        f"\nrequests {len(outcomes)}, events acknowledged {len(load.acknowledged)}, "
        f"503s {len(unavailable)}, connection errors/timeouts {len(failed)}, "
        f"max request latency {max_latency:.2f} s, "
        f"broker start took {restarted - restart_called:.1f} s, first 2xx "
        + (
            f"{after_restart[0] - restart_called:.2f} s after restart began "
            f"({after_restart[0] - restarted:+.2f} s from broker ready)"
            if after_restart
            else "never"
        )
        + f"; on topic {len(on_topic)} events, {duplicates} duplicates, {len(lost)} lost"
    )

    assert not lost, f"{len(lost)} acknowledged events missing, e.g. {sorted(lost)[:5]}"
    assert not lied, f"{len(lied)} requests got 2xx for new events while Kafka was down"
    assert unavailable, "no 503 while the broker was down: the outage was not real"
    assert all(o.retry_after for o in unavailable), "a 503 without Retry-After"
    assert max_latency <= MAX_LATENCY_S, f"a request took {max_latency:.1f} s"
    assert not failed, f"{len(failed)} requests failed without an HTTP answer:\n{log_tail}"
    assert after_restart, f"no 2xx after the broker restarted:\n{log_tail}"
    assert {o.status for o in outcomes} <= {202, 503}
