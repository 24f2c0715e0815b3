"""Intake: commands from Kafka into ``deliveries``, each claimed exactly once.

The processor of notify's :class:`~churnguard.common.kafka.ConsumerLoop`. For one record
(one command or a partition envelope of many) it runs one transaction:

* every command is inserted with ``ON CONFLICT (command_id) DO NOTHING RETURNING``; a
  command already there (redelivered record, replayed topic, a second notify replica)
  returns nothing and is a no-op;
* a command whose template or variables are unusable is recorded ``failed`` with the
  reason, its ``failed`` outcome and a dead letter of it go to the outbox;
* ``in_app`` and ``csm_task`` are delivered right there: the inbox message or task row
  is written in the same transaction as the claim, so they exist exactly once;
* everything else is queued: due now (leased to this process and handed to its lane)
  or, for a payment retry, at ``scheduled_for``.

Only after that transaction commits does the consumer loop commit the record's offset,
so a crash before it redelivers the record, which the claim then makes a no-op.
A record that is not a valid envelope of the topic's events goes to the dead-letter twin
(raised as InvalidEnvelope to the consumer loop).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiokafka import ConsumerRecord, TopicPartition
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from churnguard.common import metrics as common_metrics
from churnguard.common.envelope import InvalidEnvelope
from churnguard.common.events.derived import NotificationRequested, PaymentRetryRequested
from churnguard.common.kafka import ConsumerLoop, InvalidRecord
from churnguard.common.topics import Topic
from churnguard.notify import metrics
from churnguard.notify.dispatcher import Command, Dispatcher, command_values, lane_of
from churnguard.notify.outcomes import OutboxRow, dead_letter_row, for_command, outcome_row
from churnguard.notify.repository import DeliveryRepository, InboxRepository
from churnguard.notify.templates import TemplateError, Variables, plain_text, validate

log = logging.getLogger(__name__)

LOCAL_CHANNELS = frozenset({"in_app", "csm_task"})


def inbox_channel(schema: str) -> str:
    """The PostgreSQL NOTIFY channel of new inbox messages (one per schema)."""
    return f"{schema}_inbox"


class Intake:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        dispatcher: Dispatcher,
        instance: int,
        prefix: str,
        lease_s: float,
        schema: str,
        wake_outbox: Callable[[], None],
    ) -> None:
        self.sessions = sessions
        self.dispatcher = dispatcher
        self.instance = instance
        self.lease_s = lease_s
        self.notify_channel = inbox_channel(schema)
        self.wake_outbox = wake_outbox
        self.topics = {
            Topic.NOTIFICATIONS.name_in(prefix): Topic.NOTIFICATIONS,
            Topic.PAYMENT_RETRIES.name_in(prefix): Topic.PAYMENT_RETRIES,
        }

    def decode(self, record: ConsumerRecord) -> list[Command]:
        """The record's commands; InvalidEnvelope (to the dead-letter twin) if unreadable."""
        commands: list[Command] = self.topics[record.topic].codec.decode(record.value)
        return commands

    async def process(self, record: ConsumerRecord) -> int:
        """One record (the plain ConsumerLoop processor); :meth:`claim` does the work."""
        commands = self.decode(record)
        await self.claim([(record, commands)])
        return len(commands)

    async def claim(self, records: list[tuple[ConsumerRecord, list[Command]]]) -> None:
        """Claim every command of ``records`` in one transaction (see the module docstring)."""
        now = datetime.now(UTC)
        rows: list[dict[str, Any]] = []
        plans: dict[str, _Plan] = {}
        total = 0
        for record, commands in records:
            total += len(commands)
            for command in commands:
                if command.id in plans:  # the same command twice in one batch
                    continue
                plan = self._plan(record, command, now)
                plans[command.id] = plan
                rows.append(plan.row)
        if not rows:
            return

        handoff: list[tuple[int, str, int]] = []
        scheduled = False
        async with self.sessions() as session, session.begin():
            repo = DeliveryRepository(session, self.instance)
            claimed = await repo.claim(rows)
            outbox: list[OutboxRow] = []
            local: list[tuple[int, NotificationRequested, Variables]] = []
            for command_id, delivery_id in claimed.items():
                plan = plans[command_id]
                command, lane = plan.command, plan.lane
                if plan.problem is not None:
                    outbox.append(outcome_row(for_command(command, "failed", plan.problem)))
                    outbox.append(
                        dead_letter_row(
                            command,
                            source_topic=plan.row["source_topic"],
                            partition=plan.row["source_partition"],
                            offset=plan.row["source_offset"],
                            reason=plan.problem,
                            error="TemplateError",
                        )
                    )
                    metrics.DEAD_LETTERS.labels(lane, "invalid_template").inc()
                    metrics.SENDS.labels(lane, "failed").inc()
                    log.warning("command refused: %s", plan.problem, extra={"event_id": command.id})
                elif lane in LOCAL_CHANNELS:
                    assert isinstance(command, NotificationRequested)
                    assert plan.variables is not None
                    local.append((delivery_id, command, plan.variables))
                    outbox.append(outcome_row(for_command(command, "delivered")))
                    metrics.SENDS.labels(lane, "delivered").inc()
                    metrics.DELIVERY_SECONDS.labels(lane).observe(
                        (now - command.time).total_seconds()
                    )
                elif plan.row["locked_by"] is not None:
                    handoff.append((delivery_id, lane, plan.row["priority"]))
                else:
                    scheduled = True
            if local:
                await self._deliver_locally(session, repo, local)
            await repo.add_outbox(outbox)
        duplicates = total - len(claimed)
        if duplicates:
            metrics.DUPLICATES.labels(records[0][0].topic).inc(duplicates)
        for delivery_id, lane, priority in handoff:
            self.dispatcher.submit(delivery_id, lane, priority)
        if outbox:
            self.wake_outbox()
        if scheduled:
            self.dispatcher.wake()  # let the scheduler see the new due times

    def _plan(self, record: ConsumerRecord, command: Command, now: datetime) -> _Plan:
        source = {
            "source_topic": record.topic,
            "source_partition": record.partition,
            "source_offset": record.offset,
        }
        variables, problem = None, None
        if isinstance(command, NotificationRequested):
            try:
                variables = validate(
                    command.data.template, command.data.channel, command.data.variables
                )
            except TemplateError as exc:
                problem = exc.reason
        lane = lane_of(command)
        if problem is not None:
            row = command_values(
                command,
                state="done",
                status="failed",
                detail=problem,
                due_at=now,
                finished_at=now,
                **source,
            )
        elif lane in LOCAL_CHANNELS:
            row = command_values(
                command,
                state="done",
                status="delivered",
                due_at=now,
                attempts=1,
                finished_at=now,
                **source,
            )
        else:
            due = command.data.scheduled_for if isinstance(command, PaymentRetryRequested) else now
            immediate = due <= now
            row = command_values(
                command,
                state="queued",
                due_at=due,
                locked_by=self.instance if immediate else None,
                locked_until=now + timedelta(seconds=self.lease_s) if immediate else None,
                **source,
            )
        return _Plan(command, lane, variables, problem, row)

    async def _deliver_locally(
        self,
        session: AsyncSession,
        repo: DeliveryRepository,
        items: list[tuple[int, NotificationRequested, Variables]],
    ) -> None:
        inbox = InboxRepository(session)
        messages, tasks, attempts = [], [], []
        for delivery_id, command, variables in items:
            text_ = plain_text(command.data.template, variables)
            values = {
                "command_id": command.id,
                "account_id": command.subject,
                "template": command.data.template,
                "title": text_.title,
                "body": text_.body,
                "link": text_.link,
            }
            if command.data.channel == "in_app":
                messages.append({**values, "user_id": command.data.recipient})
            else:
                tasks.append(
                    {
                        **values,
                        "assignee": command.data.recipient,
                        "priority": command.data.priority,
                    }
                )
            attempts.append((delivery_id, command.data.channel))
        stored: dict[str, str] = {}
        if messages:
            ids = await inbox.add_messages(messages)
            stored |= {cid: f"inbox message {mid}" for cid, mid in ids.items()}
            payload = [
                {"id": ids[m["command_id"]], "user_id": m["user_id"], "account_id": m["account_id"]}
                for m in messages
                if m["command_id"] in ids
            ]
            # delivered to LISTENers on commit, not before: a stream never shows a rollback.
            # One notification per message: a payload is limited to 8000 bytes.
            for item in payload:
                await session.execute(
                    text("SELECT pg_notify(:channel, :payload)"),
                    {"channel": self.notify_channel, "payload": orjson.dumps(item).decode()},
                )
        if tasks:
            ids = await inbox.add_tasks(tasks)
            stored |= {cid: f"csm task {tid}" for cid, tid in ids.items()}
        by_delivery = {d: c.id for d, c, _ in items}
        await repo.record_local_attempts(
            [(d, channel, "delivered", stored.get(by_delivery[d], "")) for d, channel in attempts]
        )


@dataclass(frozen=True)
class _Plan:
    command: Command
    lane: str
    variables: Variables | None
    problem: str | None
    row: dict[str, Any]


class IntakeLoop(ConsumerLoop):
    """The shared consume → process → dead-letter → commit loop, with each fetched batch
    claimed in one PostgreSQL transaction instead of one per record.

    Order within a batch: every record is decoded; unreadable ones are dead-lettered
    (acknowledged by Kafka); the rest are claimed in one transaction; then the batch's
    offsets are committed; then the breaker is checked (so a record that trips it is
    already in the dead-letter topic and committed, never sent there twice).
    """

    def __init__(self, *, intake: Intake, **kwargs: Any) -> None:
        super().__init__(process=intake.process, **kwargs)
        self.intake = intake

    async def _process_batches(self, batches: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        started = time.perf_counter()
        good: list[tuple[ConsumerRecord, list[Command]]] = []
        for records in batches.values():
            for record in records:
                try:
                    good.append((record, self.intake.decode(record)))
                except (InvalidRecord, InvalidEnvelope) as exc:
                    await self.dead_letters.reject(
                        record,
                        dead_letter_topic=self.dead_letter_topic(record.topic),
                        reason=exc.reason,
                        error=type(exc).__name__,
                    )
        await self.intake.claim(good)
        for record, commands in good:
            self.dead_letters.accept()
            common_metrics.CONSUMER_RECORDS.labels(self.name, record.topic).inc()
            common_metrics.CONSUMER_EVENTS.labels(self.name, record.topic).inc(len(commands))
        await self.consumer.commit({tp: records[-1].offset + 1 for tp, records in batches.items()})
        common_metrics.CONSUMER_BATCH_SECONDS.labels(self.name).observe(
            time.perf_counter() - started
        )
        self.dead_letters.raise_if_tripped()
