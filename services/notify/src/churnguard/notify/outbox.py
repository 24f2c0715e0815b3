"""The outbox publisher: outcomes and dead letters from PostgreSQL to Kafka.

Rows are written in the transaction that records what they report, so neither can exist
without the other; this loop sends them, waits for Kafka's acknowledgement (acks=all)
and only then marks them published. A crash in between sends them again: outcome ids
are deterministic (action id + status), so a consumer drops the repeat by id.

Outcomes bound for one partition go out as one partition envelope (the account id's
murmur2 partition, set explicitly, as ingest does), in outbox order, so one account's
outcomes keep their order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from typing import Any

from aiokafka import AIOKafkaProducer
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from churnguard.common import envelope
from churnguard.common.topics import Topic
from churnguard.notify import metrics
from churnguard.notify.repository import OutboxRepository

log = logging.getLogger(__name__)

BATCH = 500
KEEP_PUBLISHED_S = 24 * 3600.0
LINGER_S = 0.005


class OutboxPublisher:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        producer: AIOKafkaProducer,
        prefix: str,
        idle_s: float = 0.5,
    ) -> None:
        self.sessions = sessions
        self.producer = producer
        self.prefix = prefix
        self.idle_s = idle_s
        self._wake = asyncio.Event()
        self._partitions: dict[str, int] = {}
        self.published = 0

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        last_prune = time.monotonic()
        while True:
            sent = await self.publish_once()
            if time.monotonic() - last_prune > 60:
                async with self.sessions() as session, session.begin():
                    await OutboxRepository(session).prune(KEEP_PUBLISHED_S)
                    metrics.OUTBOX_PENDING.set(await OutboxRepository(session).pending())
                last_prune = time.monotonic()
            if sent < BATCH:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.idle_s)

    async def _partition_count(self, topic: str) -> int:
        if topic not in self._partitions:
            parts = await self.producer.partitions_for(topic)
            self._partitions[topic] = len(parts)
        return self._partitions[topic]

    async def publish_once(self) -> int:
        async with self.sessions() as session, session.begin():
            repo = OutboxRepository(session)
            rows = await repo.take(BATCH)
            if not rows:
                metrics.OUTBOX_PENDING.set(0)
                return 0
            futures: list[Any] = []
            groups: dict[tuple[str, int], list[Any]] = defaultdict(list)
            for row in rows:
                registry = Topic[row.topic]
                if row.dead_letter:
                    futures.append(
                        await self.producer.send(
                            registry.dead_letter_in(self.prefix),
                            value=row.value,
                            key=row.key,
                            headers=[(k, v.encode()) for k, v in row.headers],
                        )
                    )
                    continue
                topic = registry.name_in(self.prefix)
                partitions = await self._partition_count(topic)
                partition = envelope.partition_for((row.key or b"").decode(), partitions)
                groups[(topic, partition)].append(row)
            for (topic, partition), group in groups.items():
                keys = {r.key for r in group}
                futures.append(
                    await self.producer.send(
                        topic,
                        value=envelope.encode_raw(r.value for r in group),
                        key=keys.pop() if len(keys) == 1 else None,
                        partition=partition,
                        headers=envelope.headers(),
                    )
                )
            await asyncio.gather(*futures)
            await repo.mark_published([r.id for r in rows])
        self.published += len(rows)
        return len(rows)
