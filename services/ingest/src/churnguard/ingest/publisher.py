"""Publishing events as partition envelopes, acknowledged by Kafka before anyone is told."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from churnguard.common import envelope
from churnguard.common.events.base import CloudEvent
from churnguard.common.topics import Topic


class PublishFailed(RuntimeError):
    """Kafka did not acknowledge in time; the caller must not report success."""


@dataclass(frozen=True)
class Published:
    topic: str
    partition: int
    offset: int
    events: int


class EnvelopePublisher:
    """Groups events by target partition, one envelope record per partition, acks=all.

    The partition is computed from the account id (Kafka's murmur2) against the topic's
    *current* partition count from broker metadata, so an operator who adds partitions
    changes placement the same way a Java producer would.
    """

    def __init__(self, producer: AIOKafkaProducer, prefix: str, timeout_s: float) -> None:
        self.producer = producer
        self.prefix = prefix
        self.timeout_s = timeout_s

    async def partitions(self, topic: str) -> int:
        # served from the client's metadata cache; fetched from the broker only when unknown
        return len(await self.producer.partitions_for(topic))

    async def publish(self, topic: Topic, events: Sequence[CloudEvent]) -> list[Published]:
        name = topic.name_in(self.prefix)
        n = await self.partitions(name)
        by_partition: dict[int, list[CloudEvent]] = defaultdict(list)
        for event in events:
            by_partition[envelope.partition_for(event.subject, n)].append(event)
        try:
            async with asyncio.timeout(self.timeout_s):
                futures = [
                    (
                        len(group),
                        await self.producer.send(
                            name,
                            value=envelope.encode(group),
                            key=envelope.record_key(group),
                            partition=partition,
                            headers=envelope.headers(),
                        ),
                    )
                    for partition, group in by_partition.items()
                ]
                results = [(count, await fut) for count, fut in futures]
        except (TimeoutError, KafkaError) as exc:
            raise PublishFailed(f"Kafka did not acknowledge {name}: {exc!r}") from exc
        return [Published(md.topic, md.partition, md.offset, count) for count, md in results]
