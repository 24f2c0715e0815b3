"""Publishing events as partition envelopes, acknowledged by Kafka before anyone is told.

Events bound for one partition of one topic are grouped into one record (DESIGN.md,
"Envelopes"): within a request, and across concurrent requests that arrive within a
short linger window, so an envelope grows with load whatever the mix of accounts. Each
caller awaits the acknowledgement of the record that holds its events; only then does
the HTTP response go out.

Three bounds keep a slow or absent Kafka from costing events or memory:

* every publish waits at most ``timeout_s`` for its acknowledgement, then fails with
  :class:`PublishFailed` (the API answers 503 with ``Retry-After``);
* at most ``max_pending_events`` may wait for Kafka at once; beyond that a publish fails
  at once instead of queueing (backpressure, not buffering into memory);
* a record that timed out may still be delivered by the producer later; the client's
  retry then finds the id in the :class:`DedupeWindow` and is answered as a duplicate,
  so a retried request never publishes twice within the window.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from operator import itemgetter
from typing import TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic_core import PydanticSerializationError

from churnguard.common import envelope, metrics
from churnguard.common.events.base import CloudEvent
from churnguard.common.topics import Topic

T = TypeVar("T")


class PublishFailed(RuntimeError):
    """Kafka did not acknowledge in time, or too much already waits: retry later."""


class InvalidEvent(ValueError):
    """An event that validated but cannot be written as JSON (e.g. a lone surrogate)."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"events[{index}]: {reason}")
        self.index = index
        self.reason = reason


@dataclass(frozen=True)
class Published:
    topic: str
    partition: int
    offset: int
    duplicate: bool = False
    """The id was already published within the dedupe window; nothing was produced now."""


@lru_cache(maxsize=200_000)
def _partition_of(account_id: str, partitions: int) -> int:
    # murmur2 is pure Python in aiokafka (~10 us); accounts repeat, so remember them
    return envelope.partition_for(account_id, partitions)


def _pick(values: Sequence[T], indexes: list[int]) -> list[T]:
    """``[values[i] for i in indexes]``, in C."""
    if len(indexes) == 1:
        return [values[indexes[0]]]
    return list(itemgetter(*indexes)(values))


class DedupeWindow:
    """Ids acknowledged recently, with where they went; oldest forgotten first.

    Ids are remembered in the groups they were acknowledged in (one envelope's worth), so
    remembering and forgetting cost one dict operation per id and one deque operation per
    group. Per process: with several ingest workers a duplicate that lands on another
    worker is published again, and downstream consumers dedupe by the same id.
    """

    def __init__(self, ttl_s: float = 600.0, max_ids: int = 1_000_000) -> None:
        self.ttl_s = ttl_s
        self.max_ids = max_ids
        self._seen: dict[str, Published] = {}
        self._groups: deque[tuple[float, list[str], Published]] = deque()
        self._count = 0

    def get(self, event_id: str) -> Published | None:
        self.expire()
        return self._seen.get(event_id)

    def isdisjoint(self, event_ids: Sequence[str]) -> bool:
        """None of ``event_ids`` is remembered (call :meth:`expire` first)."""
        return self._seen.keys().isdisjoint(event_ids)

    def lookup(self, event_id: str) -> Published | None:
        """Like :meth:`get` without expiring first: for loops that called :meth:`expire`."""
        return self._seen.get(event_id)

    def add(self, event_id: str, published: Published) -> None:
        self.add_many([event_id], published)

    def add_many(self, event_ids: list[str], published: Published) -> None:
        self._seen.update(dict.fromkeys(event_ids, published))
        self._groups.append((time.monotonic() + self.ttl_s, event_ids, published))
        self._count += len(event_ids)
        while self._count > self.max_ids and self._groups:
            self._forget_oldest()

    def __len__(self) -> int:
        return len(self._seen)

    def expire(self) -> None:
        now = time.monotonic()
        while self._groups and self._groups[0][0] <= now:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        _, ids, published = self._groups.popleft()
        self._count -= len(ids)
        seen = self._seen
        for event_id in ids:
            # the id may have been acknowledged again since (a retry after a timeout)
            if seen.get(event_id) is published:
                del seen[event_id]


@dataclass
class _Pending:
    """Events waiting for one (topic, partition) envelope."""

    payloads: list[bytes] = field(default_factory=list)
    subjects: set[str] = field(default_factory=set)
    size: int = 0
    waiters: list[tuple[list[str], asyncio.Future[Published]]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


@dataclass
class PublisherStats:
    envelopes: int = 0
    events: int = 0
    duplicates: int = 0


class EnvelopePublisher:
    """Groups events by target partition into envelopes, across requests; acks=all.

    The partition is murmur2 of the account id against the topic's current partition
    count from broker metadata, so placement matches a Java producer's.
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        prefix: str,
        timeout_s: float,
        *,
        linger_s: float = 0.002,
        max_envelope_events: int = 500,
        max_envelope_bytes: int = 768 * 1024,
        max_pending_events: int = 50_000,
        dedupe: DedupeWindow | None = None,
    ) -> None:
        self.producer = producer
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.linger_s = linger_s
        self.max_envelope_events = max_envelope_events
        self.max_envelope_bytes = max_envelope_bytes
        self.max_pending_events = max_pending_events
        self.dedupe = dedupe or DedupeWindow()
        self.stats = PublisherStats()
        self._pending: dict[tuple[str, int], _Pending] = defaultdict(_Pending)
        self._in_flight: dict[str, asyncio.Future[Published]] = {}
        self._waiting = 0

    async def partitions(self, topic: str) -> int:
        # served from the client's metadata cache; fetched from the broker only when unknown
        return len(await self.producer.partitions_for(topic))

    async def publish(
        self,
        topic: Topic,
        events: Sequence[CloudEvent],
        payloads: Sequence[bytes] | None = None,
    ) -> list[Published]:
        """Publish ``events``; returns once Kafka acknowledged every one (or duplicates).

        ``payloads``, when given, are the events' JSON as the caller already wrote it (one
        per event, decoding to an equal event); otherwise each event is written here.
        """
        # serialise first: an event that cannot be written must fail before anything is
        # registered as in flight, or its id would wait for an acknowledgement forever
        if payloads is None:
            payloads = []
            for index, event in enumerate(events):
                try:
                    payloads.append(event.to_json())
                except PydanticSerializationError as exc:
                    raise InvalidEvent(index, f"cannot be written as JSON: {exc}") from None
        elif len(payloads) != len(events):
            raise ValueError(f"{len(payloads)} payloads for {len(events)} events")
        return await self.publish_json(
            topic, [e.id for e in events], [e.subject for e in events], payloads
        )

    async def publish_json(
        self,
        topic: Topic,
        ids: Sequence[str],
        subjects: Sequence[str],
        payloads: Sequence[bytes],
    ) -> list[Published]:
        """:meth:`publish` for events already written as JSON: ``payloads[i]`` is the
        event with id ``ids[i]`` of account ``subjects[i]`` (validated by the caller)."""
        if not len(ids) == len(subjects) == len(payloads):
            raise ValueError(f"{len(ids)} ids, {len(subjects)} subjects, {len(payloads)} payloads")
        count = len(ids)
        if self._waiting + count > self.max_pending_events:
            raise PublishFailed(
                f"{self._waiting} events already wait for Kafka (limit {self.max_pending_events})"
            )
        name = topic.name_in(self.prefix)
        try:
            n = await asyncio.wait_for(self.partitions(name), self.timeout_s)
        except (TimeoutError, KafkaError) as exc:
            raise PublishFailed(f"no metadata for {name} from Kafka: {exc!r}") from exc
        # one future per chunk of this request's events bound for one envelope, not per
        # event: per-event futures cost more than the rest of publishing together
        outcome: list[Published | None] = [None] * count
        fresh = self._fresh(topic, ids, outcome)
        by_partition: dict[int, list[int]] = defaultdict(list)
        partition_of = _partition_of
        for i in fresh:
            by_partition[partition_of(subjects[i], n)].append(i)
        loop = asyncio.get_running_loop()
        waiting: list[tuple[list[int], asyncio.Future[Published]]] = []
        for partition, indexes in by_partition.items():
            for chunk in self._chunks(indexes, payloads):
                future: asyncio.Future[Published] = loop.create_future()
                chunk_ids = _pick(ids, chunk)
                self._in_flight.update(dict.fromkeys(chunk_ids, future))
                waiting.append((chunk, future))
                self._enqueue(
                    name,
                    partition,
                    chunk_ids,
                    _pick(payloads, chunk),
                    set(_pick(subjects, chunk)),
                    future,
                )
        shared: list[tuple[int, asyncio.Future[Published]]] = []
        if len(fresh) < count:  # ids in flight already, or repeated in this request
            publishing = set(fresh)
            shared = [
                (i, self._in_flight[ids[i]])
                for i in range(count)
                if outcome[i] is None and i not in publishing
            ]
        futures = {id(f): f for _, f in waiting}
        for _, flying in shared:
            futures[id(flying)] = flying
        self._waiting += count
        try:
            async with asyncio.timeout(self.timeout_s):
                await asyncio.gather(*(asyncio.shield(f) for f in futures.values()))
        except TimeoutError as exc:
            raise PublishFailed(
                f"Kafka did not acknowledge {name} within {self.timeout_s} s"
            ) from exc
        except KafkaError as exc:
            raise PublishFailed(f"Kafka refused {name}: {exc!r}") from exc
        finally:
            self._waiting -= count
        if len(fresh) == count and len(waiting) == 1:
            return [waiting[0][1].result()] * count  # all new, all in one envelope
        for chunk, future in waiting:
            published = future.result()
            for i in chunk:
                outcome[i] = published
        for i, flying in shared:
            p = flying.result()
            outcome[i] = Published(p.topic, p.partition, p.offset, duplicate=True)
        return [p for p in outcome if p is not None]

    def _fresh(
        self, topic: Topic, ids: Sequence[str], outcome: list[Published | None]
    ) -> range | list[int]:
        """Indexes of the ids to publish now; duplicates of acknowledged ids get their
        outcome in ``outcome``, and ids in flight (or repeated in ``ids``) are left None
        for :meth:`publish` to share the in-flight outcome."""
        self.dedupe.expire()
        in_flight = self._in_flight
        if (
            self.dedupe.isdisjoint(ids)
            and in_flight.keys().isdisjoint(ids)
            and len(set(ids)) == len(ids)
        ):
            return range(len(ids))  # the usual case, checked in C
        fresh: list[int] = []
        first: dict[str, int] = {}
        for i, event_id in enumerate(ids):
            if (seen := self.dedupe.lookup(event_id)) is not None:
                outcome[i] = Published(seen.topic, seen.partition, seen.offset, duplicate=True)
            elif event_id in in_flight or event_id in first:
                pass  # shares the outcome of the record already on its way
            else:
                first[event_id] = i
                fresh.append(i)
                continue
            self._duplicate(topic)
        return fresh

    def _duplicate(self, topic: Topic) -> None:
        self.stats.duplicates += 1
        metrics.INGEST_DEDUPE_HITS.labels(topic.topic).inc()

    def _chunks(self, indexes: list[int], payloads: Sequence[bytes]) -> Iterator[list[int]]:
        """Split one partition's events into pieces that each fit one envelope."""
        if len(indexes) <= self.max_envelope_events and (
            sum(len(payloads[i]) for i in indexes) + len(indexes) <= self.max_envelope_bytes
        ):
            yield indexes
            return
        chunk: list[int] = []
        size = 0
        for i in indexes:
            if chunk and (
                len(chunk) >= self.max_envelope_events
                or size + len(payloads[i]) > self.max_envelope_bytes
            ):
                yield chunk
                chunk, size = [], 0
            chunk.append(i)
            size += len(payloads[i]) + 1
        if chunk:
            yield chunk

    def _enqueue(
        self,
        topic: str,
        partition: int,
        ids: list[str],
        payloads: list[bytes],
        subjects: set[str],
        future: asyncio.Future[Published],
    ) -> None:
        size = sum(len(p) for p in payloads) + len(payloads)
        pending = self._pending[(topic, partition)]
        if pending.payloads and (
            len(pending.payloads) + len(payloads) > self.max_envelope_events
            or pending.size + size > self.max_envelope_bytes
        ):
            self._flush(topic, partition)
            pending = self._pending[(topic, partition)]
        pending.payloads.extend(payloads)
        pending.subjects |= subjects
        pending.size += size
        pending.waiters.append((ids, future))
        if pending.timer is None:
            pending.timer = asyncio.get_running_loop().call_later(
                self.linger_s, self._flush, topic, partition
            )

    def _flush(self, topic: str, partition: int) -> None:
        pending = self._pending.pop((topic, partition), None)
        if pending is None or not pending.payloads:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        key = next(iter(pending.subjects)).encode() if len(pending.subjects) == 1 else None
        value = envelope.encode_raw(pending.payloads)
        self.stats.envelopes += 1
        self.stats.events += len(pending.payloads)
        metrics.INGEST_ENVELOPE_EVENTS.observe(len(pending.payloads))
        task = asyncio.ensure_future(self._send(topic, partition, key, value))
        task.add_done_callback(lambda t: self._settle(t, pending.waiters))

    async def _send(self, topic: str, partition: int, key: bytes | None, value: bytes) -> Published:
        sent = await self.producer.send(
            topic, value=value, key=key, partition=partition, headers=envelope.headers()
        )
        metadata = await sent
        return Published(metadata.topic, metadata.partition, metadata.offset)

    def _settle(
        self,
        task: asyncio.Future[Published],
        waiters: list[tuple[list[str], asyncio.Future[Published]]],
    ) -> None:
        error = task.exception() if not task.cancelled() else asyncio.CancelledError()
        forget = self._in_flight.pop
        for ids, future in waiters:
            for event_id in ids:
                forget(event_id, None)
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
                future.exception()  # retrieved: the caller may have given up already
            else:
                published = task.result()
                self.dedupe.add_many(ids, published)
                future.set_result(published)

    async def flush_all(self) -> None:
        """Send every waiting envelope now (used at shutdown)."""
        for topic, partition in list(self._pending):
            self._flush(topic, partition)
