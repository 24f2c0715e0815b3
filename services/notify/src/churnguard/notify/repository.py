"""Every query notify runs. Repositories add, query and flush; the caller's boundary commits.

Liveness of a notify process is a PostgreSQL advisory lock: each process holds
``pg_advisory_lock(INSTANCE_LOCK_CLASS, <its instance key>)`` on a connection of its own
for as long as it lives, and a delivery it leased records that key in ``locked_by``.
When the process dies, PostgreSQL drops the connection and the lock with it at once, so
another process (or the restarted one) can tell "leased by a live instance, leave it"
from "leased by a dead one, take it over" without waiting for a lease to run out.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from churnguard.notify.outcomes import OutboxRow
from churnguard.notify.tables import (
    csm_tasks,
    deliveries,
    delivery_attempts,
    inbox_messages,
    outbox,
    unsubscribes,
)

INSTANCE_LOCK_CLASS = 0x4E4F5446  # "NOTF": the first key of notify's advisory locks

_CLAIM = (
    insert(deliveries)
    .on_conflict_do_nothing(index_elements=[deliveries.c.command_id])
    .returning(deliveries.c.command_id, deliveries.c.id)
)

_OUTBOX = insert(outbox).on_conflict_do_nothing(index_elements=[outbox.c.dedupe_key])

_DEAD = """NOT EXISTS (
    SELECT 1 FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
      AND l.classid::bigint = :lock_class AND l.objid::bigint = d.locked_by
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
)"""


@dataclass(frozen=True)
class Leased:
    id: int
    channel: str
    priority: int


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    command: dict[str, Any]
    channel: str
    attempts: int
    in_doubt: bool
    last_started_at: datetime | None
    source_topic: str | None
    source_partition: int | None
    source_offset: int | None


class DeliveryRepository:
    def __init__(self, session: AsyncSession, instance: int) -> None:
        self.session = session
        self.instance = instance

    # -- intake ---------------------------------------------------------------------------

    async def claim(self, rows: Sequence[dict[str, Any]]) -> dict[str, int]:
        """Insert the commands not seen before; {command id: delivery id} of those claimed."""
        if not rows:
            return {}
        # executemany: one cached statement, which SQLAlchemy sends as multi-row VALUES
        result = await self.session.execute(_CLAIM, list(rows))
        return {cid: did for cid, did in result.all()}

    # -- scheduling -----------------------------------------------------------------------

    async def lease_due(self, lease_s: float, limit: int) -> list[Leased]:
        """Lease queued deliveries that are due and not held by a live instance."""
        statement = text(
            f"""
            UPDATE deliveries SET locked_by = :me,
                   locked_until = now() + make_interval(secs => :lease)
            WHERE id IN (
                SELECT d.id FROM deliveries d
                WHERE d.state = 'queued' AND d.due_at <= now()
                  AND (d.locked_by IS NULL OR d.locked_until < now() OR {_DEAD})
                ORDER BY d.priority DESC, d.due_at
                LIMIT :limit
                FOR UPDATE SKIP LOCKED
            )
            RETURNING id, channel, priority
            """
        )
        result = await self.session.execute(
            statement,
            {
                "me": self.instance,
                "lease": lease_s,
                "limit": limit,
                "lock_class": INSTANCE_LOCK_CLASS,
            },
        )
        return [Leased(*row) for row in result.all()]

    async def recover_in_doubt(self, lease_s: float, limit: int) -> list[Leased]:
        """Deliveries whose attempt was in flight in a process that died (or overran its
        lease): mark the attempt and the delivery in doubt and lease them to this process."""
        statement = text(
            f"""
            UPDATE deliveries SET state = 'queued', in_doubt = true, due_at = now(),
                   locked_by = :me, locked_until = now() + make_interval(secs => :lease)
            WHERE id IN (
                SELECT d.id FROM deliveries d
                WHERE d.state = 'sending'
                  AND (d.locked_until < now() OR d.locked_by IS NULL OR {_DEAD})
                LIMIT :limit
                FOR UPDATE SKIP LOCKED
            )
            RETURNING id, channel, priority
            """
        )
        result = await self.session.execute(
            statement,
            {
                "me": self.instance,
                "lease": lease_s,
                "limit": limit,
                "lock_class": INSTANCE_LOCK_CLASS,
            },
        )
        leased = [Leased(*row) for row in result.all()]
        if leased:
            await self.session.execute(
                text(
                    "UPDATE delivery_attempts SET status = 'in_doubt', finished_at = now() "
                    "WHERE delivery_id = ANY(:ids) AND status = 'sending'"
                ),
                {"ids": [r.id for r in leased]},
            )
        return leased

    # -- attempts -------------------------------------------------------------------------

    async def load(self, delivery_id: int) -> DeliveryRow | None:
        """The delivery, if it is queued and leased to this process."""
        statement = text(
            """
            SELECT d.id, d.command, d.channel, d.attempts, d.in_doubt,
                   (SELECT max(a.started_at) FROM delivery_attempts a
                    WHERE a.delivery_id = d.id),
                   d.source_topic, d.source_partition, d.source_offset
            FROM deliveries d
            WHERE d.id = :id AND d.state = 'queued' AND d.locked_by = :me
            """
        )
        row = (
            await self.session.execute(statement, {"id": delivery_id, "me": self.instance})
        ).one_or_none()
        return None if row is None else DeliveryRow(*row)

    async def start_attempt(self, delivery_id: int, channel: str, lease_s: float) -> int | None:
        """Claim-before-send: the delivery is ``sending`` and the attempt row exists before
        the provider is called. Returns the attempt number, or None if no longer ours.
        One statement (a data-modifying CTE): this runs once per provider call."""
        statement = text(
            """
            WITH d AS (
                UPDATE deliveries SET state = 'sending', attempts = attempts + 1,
                       in_doubt = false, locked_until = now() + make_interval(secs => :lease)
                WHERE id = :id AND state = 'queued' AND locked_by = :me
                RETURNING id, attempts
            )
            INSERT INTO delivery_attempts (delivery_id, attempt, channel, instance, status)
            SELECT id, attempts, :channel, :me, 'sending' FROM d
            RETURNING attempt
            """
        )
        attempt = (
            await self.session.execute(
                statement,
                {"id": delivery_id, "me": self.instance, "lease": lease_s, "channel": channel},
            )
        ).scalar_one_or_none()
        return None if attempt is None else int(attempt)

    async def finish_sent(
        self,
        delivery_id: int,
        attempt: int,
        status: str,
        response: str,
        latency_ms: float,
        detail: str | None,
        outcome: OutboxRow,
    ) -> None:
        """Record a successful provider call: the attempt, the delivery and its outcome
        in one statement (the common path: once per delivered command)."""
        statement = text(
            """
            WITH a AS (
                UPDATE delivery_attempts SET status = :status, provider_response = :response,
                       latency_ms = :latency, finished_at = now()
                WHERE delivery_id = :id AND attempt = :attempt
            ), d AS (
                UPDATE deliveries SET state = 'done', status = :status, detail = :detail,
                       in_doubt = false, locked_by = NULL, locked_until = NULL,
                       finished_at = now()
                WHERE id = :id
            )
            INSERT INTO outbox (dedupe_key, topic, dead_letter, key, value, headers)
            VALUES (:dedupe_key, :topic, 0, :key, :value, '[]'::jsonb)
            ON CONFLICT (dedupe_key) DO NOTHING
            """
        )
        await self.session.execute(
            statement,
            {
                "id": delivery_id,
                "attempt": attempt,
                "status": status,
                "response": response[:4000],
                "latency": latency_ms,
                "detail": detail[:2000] if detail else None,
                "dedupe_key": outcome.dedupe_key,
                "topic": outcome.topic,
                "key": outcome.key,
                "value": outcome.value,
            },
        )

    async def clear_in_doubt(self, delivery_id: int) -> None:
        await self.session.execute(
            deliveries.update().where(deliveries.c.id == delivery_id).values(in_doubt=False)
        )

    async def finish_attempt(
        self,
        delivery_id: int,
        attempt: int,
        status: str,
        response: str | None,
        latency_ms: float | None,
    ) -> None:
        await self.session.execute(
            delivery_attempts.update()
            .where(
                delivery_attempts.c.delivery_id == delivery_id,
                delivery_attempts.c.attempt == attempt,
            )
            .values(
                status=status,
                provider_response=(response or "")[:4000],
                latency_ms=latency_ms,
                finished_at=text("now()"),
            )
        )

    async def record_local_attempt(
        self,
        delivery_id: int,
        channel: str,
        status: str,
        response: str,
        latency_ms: float | None = None,
    ) -> None:
        """An attempt that called no provider (suppressed, stored in-app, in-doubt resolution)."""
        await self.session.execute(
            text(
                """
                INSERT INTO delivery_attempts
                    (delivery_id, attempt, channel, instance, status, provider_response,
                     latency_ms, finished_at)
                SELECT :id, coalesce(max(attempt), 0) + 1, :channel, :me, :status, :response,
                       :latency, now()
                FROM delivery_attempts WHERE delivery_id = :id
                """
            ),
            {
                "id": delivery_id,
                "channel": channel,
                "me": self.instance,
                "status": status,
                "response": response[:4000],
                "latency": latency_ms,
            },
        )

    async def record_local_attempts(self, attempts: Sequence[tuple[int, str, str, str]]) -> None:
        """First (and only) attempts that called no provider: (delivery, channel, status,
        response) each, e.g. in-app messages stored at intake."""
        if attempts:
            now = datetime.now(UTC)
            await self.session.execute(
                insert(delivery_attempts),
                [
                    {
                        "delivery_id": d,
                        "attempt": 1,
                        "channel": channel,
                        "instance": self.instance,
                        "status": status,
                        "provider_response": response,
                        "finished_at": now,
                    }
                    for d, channel, status, response in attempts
                ],
            )

    async def finish(self, delivery_id: int, status: str, detail: str | None) -> None:
        await self.session.execute(
            deliveries.update()
            .where(deliveries.c.id == delivery_id)
            .values(
                state="done",
                status=status,
                detail=detail[:2000] if detail else None,
                in_doubt=False,
                locked_by=None,
                locked_until=None,
                finished_at=text("now()"),
            )
        )

    async def reschedule(
        self, delivery_id: int, delay_s: float, detail: str | None, *, in_doubt: bool = False
    ) -> None:
        """Back to the queue, due in ``delay_s``, leased to nobody (any instance may take it);
        ``in_doubt`` when the failed attempt may have taken effect."""
        await self.session.execute(
            text(
                """
                UPDATE deliveries SET state = 'queued',
                       due_at = now() + make_interval(secs => :delay),
                       locked_by = NULL, locked_until = NULL, detail = :detail,
                       in_doubt = :in_doubt
                WHERE id = :id
                """
            ),
            {
                "id": delivery_id,
                "delay": delay_s,
                "detail": detail[:2000] if detail else None,
                "in_doubt": in_doubt,
            },
        )

    async def attempts_of(self, command_id: str) -> builtins.list[dict[str, Any]]:
        statement = (
            select(delivery_attempts)
            .join(deliveries, deliveries.c.id == delivery_attempts.c.delivery_id)
            .where(deliveries.c.command_id == command_id)
            .order_by(delivery_attempts.c.attempt)
        )
        return [dict(r._mapping) for r in (await self.session.execute(statement)).all()]

    async def delivery(self, command_id: str) -> dict[str, Any] | None:
        statement = select(
            *[c for c in deliveries.c if c.name not in ("locked_by", "locked_until")]
        ).where(deliveries.c.command_id == command_id)
        row = (await self.session.execute(statement)).one_or_none()
        return None if row is None else dict(row._mapping)

    # -- outbox ---------------------------------------------------------------------------

    async def add_outbox(self, rows: Sequence[OutboxRow]) -> None:
        if rows:
            await self.session.execute(_OUTBOX, [r.values() for r in rows])


class OutboxRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def take(self, limit: int) -> list[Any]:
        """The oldest unpublished rows, or none while another process publishes: one
        publisher at a time keeps each account's outcomes in the order they happened."""
        locked = await self.session.execute(
            text("SELECT pg_try_advisory_xact_lock(:cls, 0)"), {"cls": INSTANCE_LOCK_CLASS}
        )
        if not locked.scalar_one():
            return []
        statement = (
            select(
                outbox.c.id,
                outbox.c.topic,
                outbox.c.dead_letter,
                outbox.c.key,
                outbox.c.value,
                outbox.c.headers,
            )
            .where(outbox.c.published_at.is_(None))
            .order_by(outbox.c.id)
            .limit(limit)
        )
        return list((await self.session.execute(statement)).all())

    async def mark_published(self, ids: Sequence[int]) -> None:
        await self.session.execute(
            text("UPDATE outbox SET published_at = now() WHERE id = ANY(:ids)"), {"ids": list(ids)}
        )

    async def pending(self) -> int:
        return int(
            (
                await self.session.execute(
                    text("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                )
            ).scalar_one()
        )

    async def prune(self, keep_s: float) -> int:
        result = await self.session.execute(
            text("DELETE FROM outbox WHERE published_at < now() - make_interval(secs => :keep)"),
            {"keep": keep_s},
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


class InboxRepository:
    """The in-app inbox and CSM tasks."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add_messages(self, rows: Sequence[dict[str, Any]]) -> dict[str, int]:
        """Store messages (once per command id); {command id: message id} of new ones."""
        statement = (
            insert(inbox_messages)
            .on_conflict_do_nothing(index_elements=[inbox_messages.c.command_id])
            .returning(inbox_messages.c.command_id, inbox_messages.c.id)
        )
        return {
            cid: int(mid) for cid, mid in (await self.session.execute(statement, list(rows))).all()
        }

    async def add_tasks(self, rows: Sequence[dict[str, Any]]) -> dict[str, int]:
        statement = (
            insert(csm_tasks)
            .on_conflict_do_nothing(index_elements=[csm_tasks.c.command_id])
            .returning(csm_tasks.c.command_id, csm_tasks.c.id)
        )
        return {
            cid: int(tid) for cid, tid in (await self.session.execute(statement, list(rows))).all()
        }

    async def messages(
        self,
        *,
        user_id: str | None,
        account_id: str | None,
        unread_only: bool,
        after_id: int | None = None,
        limit: int = 50,
    ) -> builtins.list[dict[str, Any]]:
        m = inbox_messages.c
        statement = select(inbox_messages).where(m.dismissed_at.is_(None))
        if user_id is not None:
            statement = statement.where(m.user_id == user_id)
        if account_id is not None:
            statement = statement.where(m.account_id == account_id)
        if unread_only:
            statement = statement.where(m.read_at.is_(None))
        if after_id is not None:
            statement = statement.where(m.id > after_id).order_by(m.id)
        else:
            statement = statement.order_by(m.id.desc())
        statement = statement.limit(limit)
        return [dict(r._mapping) for r in (await self.session.execute(statement)).all()]

    async def message(self, message_id: int) -> dict[str, Any] | None:
        row = (
            await self.session.execute(
                select(inbox_messages).where(inbox_messages.c.id == message_id)
            )
        ).one_or_none()
        return None if row is None else dict(row._mapping)

    async def mark(self, message_id: int, column: str) -> dict[str, Any] | None:
        """Set ``read_at`` or ``dismissed_at`` (the first time only); the message after."""
        assert column in ("read_at", "dismissed_at")
        statement = text(
            f"UPDATE inbox_messages SET {column} = coalesce({column}, now()) "
            "WHERE id = :id RETURNING *"
        )
        row = (await self.session.execute(statement, {"id": message_id})).one_or_none()
        return None if row is None else dict(row._mapping)

    async def tasks(
        self, *, assignee: str | None, account_id: str | None, open_only: bool, limit: int = 100
    ) -> builtins.list[dict[str, Any]]:
        t = csm_tasks.c
        statement = select(csm_tasks)
        if assignee is not None:
            statement = statement.where(t.assignee == assignee)
        if account_id is not None:
            statement = statement.where(t.account_id == account_id)
        if open_only:
            statement = statement.where(t.done_at.is_(None))
        statement = statement.order_by(t.priority.desc(), t.id.desc()).limit(limit)
        return [dict(r._mapping) for r in (await self.session.execute(statement)).all()]

    async def complete_task(self, task_id: int) -> dict[str, Any] | None:
        row = (
            await self.session.execute(
                text(
                    "UPDATE csm_tasks SET done_at = coalesce(done_at, now()) "
                    "WHERE id = :id RETURNING *"
                ),
                {"id": task_id},
            )
        ).one_or_none()
        return None if row is None else dict(row._mapping)


class SuppressionRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def unsubscribe(self, email: str, via: str) -> bool:
        """True if newly unsubscribed."""
        statement = (
            insert(unsubscribes)
            .values(email=email.strip().lower(), via=via)
            .on_conflict_do_nothing(index_elements=[unsubscribes.c.email])
            .returning(unsubscribes.c.email)
        )
        return (await self.session.execute(statement)).scalar_one_or_none() is not None

    async def is_unsubscribed(self, email: str) -> bool:
        statement = select(unsubscribes.c.email).where(
            unsubscribes.c.email == email.strip().lower()
        )
        return (await self.session.execute(statement)).scalar_one_or_none() is not None
