"""The outbox relay: commands go to Kafka only after the decision that made them committed.

A decision writes its commands into ``outbox`` in its own transaction; after the commit
the relay sends them, waits for Kafka's acknowledgement (acks=all) and marks them sent.
A crash between the commit and the acknowledgement leaves rows unsent; the sweeper sends
them again at start-up and every few seconds, with the same ids, so nothing is lost and
notify (which delivers each id once) does nothing twice. The cost of that guarantee is
that a command may reach Kafka twice under the same id, never that it is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from aiokafka import AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from churnguard.common.topics import Topic
from churnguard.playbooks import playbooks_metrics as pm
from churnguard.playbooks.commands import Command
from churnguard.playbooks.repository import PlaybooksRepository

log = logging.getLogger(__name__)

HEADERS = [("content-type", b"application/cloudevents+json")]
SWEEP_GRACE = timedelta(seconds=5)
"""Rows younger than this are the direct path's to send; the sweeper leaves them alone."""
SWEEP_BATCH = 500


class OutboxRelay:
    def __init__(
        self, engine: AsyncEngine, producer: AIOKafkaProducer, prefix: str, sweep_interval_s: float
    ) -> None:
        self.engine = engine
        self.producer = producer
        self.prefix = prefix
        self.sweep_interval_s = sweep_interval_s
        self._stopping = asyncio.Event()

    async def _send(self, rows: Sequence[tuple[str, str, str, bytes]], path: str) -> None:
        """(command id, Topic member name, account id, value) → Kafka, acknowledged."""
        futures = []
        for _command_id, topic, account_id, value in rows:
            futures.append(
                await self.producer.send(
                    Topic[topic].name_in(self.prefix),
                    value,
                    key=account_id.encode(),
                    headers=HEADERS,
                )
            )
        await asyncio.gather(*futures)
        for _command_id, topic, _account_id, _value in rows:
            pm.COMMANDS.labels(Topic[topic].topic, path).inc()

    async def publish(self, commands: Sequence[Command]) -> None:
        """Send commands whose decision committed, then mark them sent."""
        if not commands:
            return
        await self._send(
            [(c.command_id, c.topic.name, c.account_id, c.value) for c in commands], "direct"
        )
        acked = time.time()
        for c in commands:
            if c.received_at is not None:
                pm.SIGNAL_TO_COMMAND.observe(max(acked - c.received_at.timestamp(), 0.0))
        async with self.engine.begin() as conn:
            # a mark lost to a PostgreSQL crash only resends a command under its id, which
            # notify delivers once: not worth a disk flush per batch
            await conn.execute(text("SET LOCAL synchronous_commit TO OFF"))
            await PlaybooksRepository(conn).mark_sent(c.command_id for c in commands)

    async def sweep(self, grace: timedelta = SWEEP_GRACE) -> int:
        """Send unsent commands older than ``grace``; how many were sent."""
        total = 0
        while True:
            async with self.engine.begin() as conn:
                repo = PlaybooksRepository(conn)
                rows = await repo.unsent(datetime.now(UTC) - grace, SWEEP_BATCH)
                if not rows:
                    break
                await self._send(
                    [(r["command_id"], r["topic"], r["account_id"], r["value"]) for r in rows],
                    "swept",
                )
                await repo.mark_sent(r["command_id"] for r in rows)
            total += len(rows)
            if len(rows) < SWEEP_BATCH:
                break
        if total:
            log.warning(
                "sent %d commands left unsent (a crash or a Kafka outage)",
                total,
                extra={"commands": total},
            )
        return total

    async def run(self) -> None:
        """Sweep every interval (start-up sweeps once with no grace before this runs)."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.sweep_interval_s)
            if self._stopping.is_set():
                break
            await self.sweep()
            async with self.engine.connect() as conn:
                pm.OUTBOX_UNSENT.set(await PlaybooksRepository(conn).unsent_count())

    def stop(self) -> None:
        self._stopping.set()
