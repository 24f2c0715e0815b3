"""Kafka plumbing on aiokafka shared by the services.

* :func:`make_producer`: acks=all, idempotent, compressed, batched. A caller that
  awaits :meth:`AIOKafkaProducer.send_and_wait` knows the broker holds the record.
* :func:`ensure_topics`: create the registry's topics and dead-letter twins, idempotently.
* :class:`ConsumerLoop`: consume → process → dead-letter the bad → commit, in that order.
  Commit is always the last step, so a crash at any point redelivers, never skips.

Two kinds of failure (as in getsentry/arroyo): a record that can never be processed
(:class:`InvalidRecord`, or an :class:`~churnguard.common.envelope.InvalidEnvelope`) goes to
the topic's dead-letter twin with headers naming its origin and the reason, and the
flow goes on; anything else is not the record's fault and stops the loop without
committing, so the record is retried after restart. A :class:`DeadLetterBreaker` stops
the consumer when a large share of recent records dead-letter, which after a bad deploy
is far more likely a bug than a flood of bad input: better stop than empty a topic into
its dead-letter twin.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from churnguard.common import metrics
from churnguard.common.envelope import InvalidEnvelope
from churnguard.common.topics import TopicPlan

log = logging.getLogger(__name__)

DLQ_HEADER_PREFIX = "churnguard.dlq."


class InvalidRecord(ValueError):
    """The record itself is bad and no retry can fix it: dead-letter it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DeadLetterBreakerTripped(RuntimeError):
    """Too many recent records went dead-letter; the consumer stopped itself."""


def make_producer(
    bootstrap: str,
    *,
    client_id: str,
    idempotent: bool = True,
    linger_ms: int = 5,
    compression_type: str | None = "zstd",
    max_batch_size: int = 512 * 1024,
    max_request_size: int = 4 * 1024 * 1024,
) -> AIOKafkaProducer:
    """A producer for records that must not be lost (acks=all, idempotent).

    zstd: on a 500-event envelope (112 KB) it took 0.10 ms and gave 2.1 KB, where gzip at
    aiokafka's level 9 took 2.2 ms for 3.4 KB. Kafka reads zstd since 2.1; Tansu does too.
    """
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        acks="all",
        enable_idempotence=idempotent,
        compression_type=compression_type,
        linger_ms=linger_ms,
        max_batch_size=max_batch_size,
        max_request_size=max_request_size,
        request_timeout_ms=30_000,
    )


@dataclass
class TopicReport:
    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)


async def ensure_topics(bootstrap: str, plans: Sequence[TopicPlan]) -> TopicReport:
    """Create missing topics; leave existing ones alone (partitions and configs untouched)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="churnguard-topics")
    await admin.start()
    report = TopicReport()
    try:
        existing = set(await admin.list_topics())
        missing = [p for p in plans if p.name not in existing]
        report.existing = [p.name for p in plans if p.name in existing]
        for plan in missing:
            try:
                await admin.create_topics(
                    [NewTopic(plan.name, plan.partitions, 1, topic_configs=plan.config)]
                )
            except TopicAlreadyExistsError:
                # created concurrently (another service starting at the same time)
                report.existing.append(plan.name)
            else:
                report.created.append(plan.name)
        await _await_metadata(admin, [p.name for p in missing])
    finally:
        await admin.close()
    return report


async def _await_metadata(admin: AIOKafkaAdminClient, names: Iterable[str]) -> None:
    """CreateTopics returns before every broker serves the topic; wait until listed."""
    pending = set(names)
    deadline = time.monotonic() + 30
    while pending and time.monotonic() < deadline:
        pending -= set(await admin.list_topics())
        if pending:
            await asyncio.sleep(0.1)
    if pending:
        raise TimeoutError(f"topics not visible after creation: {sorted(pending)}")


def dead_letter_headers(
    *,
    topic: str,
    partition: int,
    offset: int,
    headers: Iterable[tuple[str, bytes]] | None,
    reason: str,
    consumer: str,
    error: str,
) -> list[tuple[str, bytes]]:
    """The original headers plus where the record came from and why it was rejected."""
    p = DLQ_HEADER_PREFIX
    own = [
        (p + "original-topic", topic.encode()),
        (p + "original-partition", str(partition).encode()),
        (p + "original-offset", str(offset).encode()),
        (p + "reason", reason[:2000].encode()),
        (p + "error", error.encode()),
        (p + "consumer", consumer.encode()),
        (p + "time", datetime.now(UTC).isoformat().encode()),
    ]
    original = [(k, v) for k, v in (headers or ()) if not k.startswith(p)]
    return original + own


class DeadLetterBreaker:
    """Trips when more than ``max_ratio`` of the last ``window`` records dead-lettered.

    It needs a full window before it can trip, so a handful of bad records at start-up
    never stop a consumer; and it only ever looks at recent records, so a burst long past
    does not count against the present.
    """

    def __init__(self, max_ratio: float, window: int) -> None:
        self.max_ratio = max_ratio
        self.window = window
        self._recent: deque[bool] = deque(maxlen=window)
        self._bad = 0

    def record(self, dead_lettered: bool) -> None:
        if len(self._recent) == self.window and self._recent[0]:
            self._bad -= 1
        self._recent.append(dead_lettered)
        self._bad += dead_lettered

    @property
    def ratio(self) -> float:
        return self._bad / len(self._recent) if self._recent else 0.0

    @property
    def tripped(self) -> bool:
        return len(self._recent) >= self.window and self.ratio > self.max_ratio


class ConsumedRecord(Protocol):
    """What a dead letter needs of a consumed record: aiokafka's ConsumerRecord and
    Faust's Message both have these attributes."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Any: ...


DeadLetterSend = Callable[
    [str, bytes | None, bytes | None, list[tuple[str, bytes]]], Awaitable[Any]
]
"""Sends (topic, key, value, headers) and returns once Kafka acknowledged the record."""


class DeadLetters:
    """Where one consumer's rejected records go, and when that consumer must stop.

    Shared by :class:`ConsumerLoop` and the Faust agents, which differ only in how they
    send (``send``). Every dead letter is acknowledged by Kafka before the caller moves
    on, so committing the original record afterwards can never lose it.
    """

    def __init__(self, consumer: str, send: DeadLetterSend, breaker: DeadLetterBreaker) -> None:
        self.consumer = consumer
        self.send = send
        self.breaker = breaker

    async def reject(
        self,
        record: ConsumedRecord,
        *,
        dead_letter_topic: str,
        reason: str,
        error: str,
        value: bytes | None = None,
    ) -> None:
        """Dead-letter ``record`` (or, with ``value``, one event of it: an envelope's
        event that could not be used while the rest of the envelope was)."""
        await self.send(
            dead_letter_topic,
            record.key,
            record.value if value is None else value,
            dead_letter_headers(
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                headers=record.headers,
                reason=reason,
                consumer=self.consumer,
                error=error,
            ),
        )
        self.breaker.record(True)
        metrics.DEAD_LETTERS.labels(self.consumer, record.topic).inc()
        log.warning(
            "record dead-lettered: %s",
            reason,
            extra={
                "consumer": self.consumer,
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "dead_letter_topic": dead_letter_topic,
            },
        )

    def accept(self) -> None:
        self.breaker.record(False)

    def raise_if_tripped(self) -> None:
        if not self.breaker.tripped:
            return
        metrics.CONSUMER_STOPPED.labels(self.consumer).set(1)
        msg = (
            f"{self.consumer}: {self.breaker.ratio:.0%} of the last {self.breaker.window} "
            f"records went to dead letters (limit {self.breaker.max_ratio:.0%}); "
            "stopping instead of dead-lettering everything. Inspect the dead-letter "
            "topic, fix the cause, then restart."
        )
        log.critical(msg, extra={"consumer": self.consumer})
        raise DeadLetterBreakerTripped(msg)


RecordProcessor = Callable[[ConsumerRecord], Awaitable[int]]
"""Processes one record and returns how many events it held; raises InvalidRecord if bad."""


class ConsumerLoop:
    """consume → process → dead-letter → commit, for one consumer group.

    Offsets are committed after each fetched batch has been fully processed (and its
    dead letters acknowledged by Kafka), never before: processing is at-least-once and
    the processors make their effects idempotent by event id.
    """

    def __init__(
        self,
        *,
        name: str,
        bootstrap: str,
        topics: Sequence[str],
        group_id: str,
        process: RecordProcessor,
        dead_letter_topic: Callable[[str], str],
        producer: AIOKafkaProducer,
        breaker: DeadLetterBreaker,
        max_batch: int = 500,
        before_commit: Callable[[], Awaitable[None]] | None = None,
        consumer_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.topics = list(topics)
        self.process = process
        self.dead_letter_topic = dead_letter_topic
        self.breaker = breaker

        async def send(
            topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
        ) -> Any:
            return await producer.send_and_wait(topic, value=value, key=key, headers=headers)

        self.dead_letters = DeadLetters(name, send, breaker)
        self.max_batch = max_batch
        self.before_commit = before_commit
        """Awaited after a batch is processed and before its offsets are committed: where
        a processor that stages side effects (an outbox of commands) sends them, so a
        record's offset is committed only once what it caused is in Kafka."""
        self.consumer = AIOKafkaConsumer(
            *self.topics,
            bootstrap_servers=bootstrap,
            group_id=group_id,
            client_id=name,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            # e.g. fetch_max_wait_ms: a broker that holds every fetch that long (Tansu
            # does, whatever fetch_min_bytes says) adds it to a latency-bound consumer's lag
            **(consumer_options or {}),
        )
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        await self.consumer.start()
        metrics.CONSUMER_STOPPED.labels(self.name).set(0)
        log.info(
            "consumer started",
            extra={
                "consumer": self.name,
                "topics": self.topics,
                "guarantee": "at-least-once, commit after processing",
                "dead_letter_max_ratio": self.breaker.max_ratio,
                "dead_letter_window": self.breaker.window,
            },
        )
        try:
            while not self._stopping.is_set():
                batches = await self.consumer.getmany(timeout_ms=200, max_records=self.max_batch)
                if batches:
                    await self._process_batches(batches)
        finally:
            await self.consumer.stop()

    def stop(self) -> None:
        self._stopping.set()

    async def _process_batches(self, batches: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        started = time.perf_counter()
        offsets: dict[TopicPartition, int] = {}
        try:
            for tp, records in batches.items():
                for record in records:
                    await self._process_one(record)
                    offsets[tp] = record.offset + 1
                    # checked after the offset is recorded: the record that trips the
                    # breaker is already in the dead-letter topic and must not go twice
                    self.dead_letters.raise_if_tripped()
        finally:
            # commit what was fully handled, even when the breaker trips mid-batch
            if offsets:
                if self.before_commit is not None:
                    await self.before_commit()
                await self.consumer.commit(offsets)
                self._report_lag(offsets)
            metrics.CONSUMER_BATCH_SECONDS.labels(self.name).observe(time.perf_counter() - started)

    def _report_lag(self, offsets: dict[TopicPartition, int]) -> None:
        """Records behind the partition's high watermark, as of the last fetch."""
        for tp, position in offsets.items():
            highwater = self.consumer.highwater(tp)
            if highwater is not None:
                metrics.CONSUMER_LAG.labels(self.name, tp.topic, str(tp.partition)).set(
                    max(highwater - position, 0)
                )

    async def _process_one(self, record: ConsumerRecord) -> None:
        try:
            events = await self.process(record)
        except (InvalidRecord, InvalidEnvelope) as exc:
            await self.dead_letters.reject(
                record,
                dead_letter_topic=self.dead_letter_topic(record.topic),
                reason=exc.reason,
                error=type(exc).__name__,
            )
            return
        self.dead_letters.accept()
        metrics.CONSUMER_RECORDS.labels(self.name, record.topic).inc()
        metrics.CONSUMER_EVENTS.labels(self.name, record.topic).inc(events)
