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
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiokafka import ConsumerRecord
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from churnguard.common.events.derived import NotificationRequested, PaymentRetryRequested
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

    async def process(self, record: ConsumerRecord) -> int:
        topic = self.topics[record.topic]
        commands: list[Command] = topic.codec.decode(record.value)
        now = datetime.now(UTC)
        rows: list[dict[str, Any]] = []
        plans: dict[str, tuple[Command, Variables | None, str | None]] = {}
        seen: set[str] = set()
        for command in commands:
            if command.id in seen:  # the same command twice in one envelope
                continue
            seen.add(command.id)
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
            plans[command.id] = (command, variables, problem)
            lane = lane_of(command)
            if problem is not None:
                rows.append(
                    command_values(
                        command,
                        state="done",
                        status="failed",
                        detail=problem,
                        due_at=now,
                        finished_at=now,
                        **source,
                    )
                )
            elif lane in LOCAL_CHANNELS:
                rows.append(
                    command_values(
                        command,
                        state="done",
                        status="delivered",
                        due_at=now,
                        attempts=1,
                        finished_at=now,
                        **source,
                    )
                )
            else:
                due = (
                    command.data.scheduled_for
                    if isinstance(command, PaymentRetryRequested)
                    else now
                )
                immediate = due <= now
                rows.append(
                    command_values(
                        command,
                        state="queued",
                        due_at=due,
                        locked_by=self.instance if immediate else None,
                        locked_until=now + timedelta(seconds=self.lease_s) if immediate else None,
                        **source,
                    )
                )

        handoff: list[tuple[int, str, int]] = []
        notified = False
        async with self.sessions() as session, session.begin():
            repo = DeliveryRepository(session, self.instance)
            claimed = await repo.claim(rows)
            outbox: list[OutboxRow] = []
            for command_id, delivery_id in claimed.items():
                command, variables, problem = plans[command_id]
                lane = lane_of(command)
                if problem is not None:
                    outbox.append(outcome_row(for_command(command, "failed", problem)))
                    outbox.append(
                        dead_letter_row(
                            command,
                            source_topic=record.topic,
                            partition=record.partition,
                            offset=record.offset,
                            reason=problem,
                            error="TemplateError",
                        )
                    )
                    metrics.DEAD_LETTERS.labels(lane, "invalid_template").inc()
                    metrics.SENDS.labels(lane, "failed").inc()
                    log.warning("command refused: %s", problem, extra={"event_id": command.id})
                elif lane in LOCAL_CHANNELS:
                    assert isinstance(command, NotificationRequested)
                    assert variables is not None
                    await self._deliver_locally(session, repo, delivery_id, command, variables)
                    outbox.append(outcome_row(for_command(command, "delivered")))
                    metrics.SENDS.labels(lane, "delivered").inc()
                    notified = notified or lane == "in_app"
                else:
                    priority = (
                        command.data.priority if isinstance(command, NotificationRequested) else 0
                    )
                    due = (
                        command.data.scheduled_for
                        if isinstance(command, PaymentRetryRequested)
                        else now
                    )
                    if due <= now:
                        handoff.append((delivery_id, lane, priority))
            await repo.add_outbox(outbox)
        duplicates = len(commands) - len(claimed)
        if duplicates:
            metrics.DUPLICATES.labels(topic.topic).inc(duplicates)
        for delivery_id, lane, priority in handoff:
            self.dispatcher.submit(delivery_id, lane, priority)
        if len(claimed) > len(handoff):
            self.wake_outbox()
            self.dispatcher.wake()  # scheduled ones: let the scheduler see them
        return len(commands)

    async def _deliver_locally(
        self,
        session: AsyncSession,
        repo: DeliveryRepository,
        delivery_id: int,
        command: NotificationRequested,
        variables: Variables,
    ) -> None:
        text_ = plain_text(command.data.template, variables)
        inbox = InboxRepository(session)
        values = {
            "command_id": command.id,
            "account_id": command.subject,
            "template": command.data.template,
            "title": text_.title,
            "body": text_.body,
            "link": text_.link,
        }
        if command.data.channel == "in_app":
            message_id = await inbox.add_message({**values, "user_id": command.data.recipient})
            payload = {
                "id": message_id,
                "user_id": command.data.recipient,
                "account_id": command.subject,
            }
            # delivered to LISTENers on commit, not before: a stream never shows a rollback
            await session.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                {"channel": self.notify_channel, "payload": orjson.dumps(payload).decode()},
            )
            response = f"inbox message {message_id}"
        else:
            task_id = await inbox.add_task(
                {**values, "assignee": command.data.recipient, "priority": command.data.priority}
            )
            response = f"csm task {task_id}"
        await repo.record_local_attempt(delivery_id, command.data.channel, "delivered", response)
