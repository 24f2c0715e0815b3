"""Every query of playbooks, on a connection whose transaction the caller owns.

The message (or timer) boundary opens the transaction and commits it once; nothing here
commits. Effects are inserted under their unique keys with ``ON CONFLICT DO NOTHING
RETURNING``, so the caller learns whether it was the first to record one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from churnguard.playbooks.commands import Command, Contact
from churnguard.playbooks.tables import (
    OPEN_DUNNING,
    accounts,
    contact_ledger,
    contacts,
    cooldowns,
    decision_actions,
    decisions,
    dedupe_keys,
    dunning_attempts,
    dunning_cases,
    outbox,
    outcomes,
    paid_invoices,
    timers,
)

Row = dict[str, Any]
"""A row as a plain dict (column name → value)."""


class PlaybooksRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    # -- accounts -------------------------------------------------------------------------

    async def lock_account(self, account_id: str) -> Row:
        """The account's row, created if new, locked until the transaction ends.

        Every decision about an account runs under this lock, so the consumer, the timer
        loop and a second replica (during a rebalance) never interleave their checks of
        the cool-down and the budget with each other's writes.
        """
        stmt = (
            insert(accounts)
            .values(account_id=account_id)
            .on_conflict_do_update(
                index_elements=[accounts.c.account_id],
                set_={"account_id": accounts.c.account_id},
            )
            .returning(*accounts.c)
        )
        return dict((await self.conn.execute(stmt)).mappings().one())

    async def upsert_account(
        self,
        account_id: str,
        values: Mapping[str, Any],
        newer_than: tuple[str, datetime] | None = None,
    ) -> None:
        """Set ``values`` on the account; with ``newer_than=(column, time)``, only if the
        stored time is older (out-of-order events never overwrite newer ones)."""
        stmt = insert(accounts).values(account_id=account_id, **values)
        where = None
        if newer_than is not None:
            column, at = newer_than
            where = (accounts.c[column].is_(None)) | (accounts.c[column] <= at)
        stmt = stmt.on_conflict_do_update(
            index_elements=[accounts.c.account_id],
            set_={k: stmt.excluded[k] for k in values},
            where=where,
        )
        await self.conn.execute(stmt)

    async def set_subscription_start(self, account_id: str, started_at: datetime) -> None:
        stmt = insert(accounts).values(account_id=account_id, subscription_started_at=started_at)
        stmt = stmt.on_conflict_do_update(
            index_elements=[accounts.c.account_id],
            set_={"subscription_started_at": stmt.excluded.subscription_started_at},
            where=accounts.c.subscription_started_at.is_(None)
            | (accounts.c.subscription_started_at > started_at),
        )
        await self.conn.execute(stmt)

    async def upsert_contact(
        self, account_id: str, user_id: str, values: Mapping[str, Any], seen_at: datetime
    ) -> None:
        stmt = insert(contacts).values(
            account_id=account_id, user_id=user_id, seen_at=seen_at, **values
        )
        update_set: dict[str, Any] = {
            k: func.coalesce(stmt.excluded[k], contacts.c[k]) for k in values
        }
        update_set["seen_at"] = func.greatest(stmt.excluded.seen_at, contacts.c.seen_at)
        await self.conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[contacts.c.account_id, contacts.c.user_id], set_=update_set
            )
        )

    async def contacts(self, account_id: str) -> list[Contact]:
        rows = await self.conn.execute(
            select(contacts.c.user_id, contacts.c.email, contacts.c.role)
            .where(contacts.c.account_id == account_id)
            .order_by(contacts.c.seen_at, contacts.c.user_id)
        )
        return [Contact(r.user_id, r.email, r.role) for r in rows]

    async def admin_timezone(self, account_id: str) -> str | None:
        row = await self.conn.execute(
            select(contacts.c.timezone)
            .where(contacts.c.account_id == account_id, contacts.c.timezone.is_not(None))
            .order_by(contacts.c.seen_at)
            .limit(1)
        )
        return row.scalar()

    # -- decisions ------------------------------------------------------------------------

    async def decided_playbooks(self, signal_id: str) -> set[str]:
        rows = await self.conn.execute(
            select(decisions.c.playbook).where(decisions.c.signal_id == signal_id)
        )
        return set(rows.scalars())

    async def insert_decision(self, row: Mapping[str, Any]) -> bool:
        stmt = (
            insert(decisions)
            .values(**row)
            .on_conflict_do_nothing(index_elements=[decisions.c.signal_id, decisions.c.playbook])
            .returning(decisions.c.decision_id)
        )
        return (await self.conn.execute(stmt)).scalar() is not None

    async def upsert_actions(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        stmt = insert(decision_actions).values(list(rows))
        await self.conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[decision_actions.c.decision_id, decision_actions.c.action_index],
                set_={
                    k: stmt.excluded[k]
                    for k in ("status", "reason", "command_ids", "due_at", "updated_at")
                },
            )
        )

    async def action(self, decision: str, index: int) -> Row | None:
        row = await self.conn.execute(
            select(decision_actions).where(
                decision_actions.c.decision_id == decision,
                decision_actions.c.action_index == index,
            )
        )
        return _first(row.mappings().first())

    async def set_delivery(self, decision: str, index: int, status: str, at: datetime) -> None:
        await self.conn.execute(
            update(decision_actions)
            .where(
                decision_actions.c.decision_id == decision,
                decision_actions.c.action_index == index,
            )
            .values(delivery=status, updated_at=at)
        )

    async def decisions_of(self, account_id: str, limit: int = 100) -> list[Row]:
        rows = await self.conn.execute(
            select(decisions)
            .where(decisions.c.account_id == account_id)
            .order_by(decisions.c.decided_at.desc(), decisions.c.created_at.desc())
            .limit(limit)
        )
        return [dict(r) for r in rows.mappings()]

    async def actions_of(self, decision_ids: Sequence[str]) -> list[Row]:
        rows = await self.conn.execute(
            select(decision_actions)
            .where(decision_actions.c.decision_id.in_(decision_ids))
            .order_by(decision_actions.c.decision_id, decision_actions.c.action_index)
        )
        return [dict(r) for r in rows.mappings()]

    # -- cool-downs and dedupe ----------------------------------------------------------

    async def last_fired(self, account_id: str, playbook: str) -> datetime | None:
        row = await self.conn.execute(
            select(cooldowns.c.last_fired_at).where(
                cooldowns.c.account_id == account_id, cooldowns.c.playbook == playbook
            )
        )
        return row.scalar()

    async def set_fired(self, account_id: str, playbook: str, at: datetime) -> None:
        stmt = insert(cooldowns).values(account_id=account_id, playbook=playbook, last_fired_at=at)
        await self.conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[cooldowns.c.account_id, cooldowns.c.playbook],
                set_={"last_fired_at": func.greatest(cooldowns.c.last_fired_at, at)},
            )
        )

    async def claim_dedupe(self, playbook: str, account_id: str, key: str, decision: str) -> bool:
        stmt = (
            insert(dedupe_keys)
            .values(playbook=playbook, account_id=account_id, key=key, decision_id=decision)
            .on_conflict_do_nothing()
            .returning(dedupe_keys.c.key)
        )
        return (await self.conn.execute(stmt)).scalar() is not None

    # -- contact budget -------------------------------------------------------------------

    async def touches(
        self, account_id: str, audience: str, since: datetime, until: datetime
    ) -> int:
        row = await self.conn.execute(
            select(func.count()).where(
                contact_ledger.c.account_id == account_id,
                contact_ledger.c.audience == audience,
                contact_ledger.c.at > since,
                contact_ledger.c.at <= until,
                contact_ledger.c.voided.is_(False),
            )
        )
        return int(row.scalar_one())

    async def add_touch(self, row: Mapping[str, Any]) -> bool:
        stmt = (
            insert(contact_ledger)
            .values(**row)
            .on_conflict_do_nothing()
            .returning(contact_ledger.c.touch_id)
        )
        return (await self.conn.execute(stmt)).scalar() is not None

    async def void_touch(self, touch_id: str) -> None:
        await self.conn.execute(
            update(contact_ledger).where(contact_ledger.c.touch_id == touch_id).values(voided=True)
        )

    # -- outbox -------------------------------------------------------------------------

    async def add_commands(self, commands: Sequence[Command]) -> list[Command]:
        """Insert commands; the ones that were not there already (a replayed timer or
        decision finds its commands recorded and adds nothing)."""
        if not commands:
            return []
        stmt = (
            insert(outbox)
            .values(
                [
                    {
                        "command_id": c.command_id,
                        "topic": c.topic.name,
                        "account_id": c.account_id,
                        "value": c.value,
                        "decision_id": c.decision_id,
                        "received_at": c.received_at,
                    }
                    for c in commands
                ]
            )
            .on_conflict_do_nothing()
            .returning(outbox.c.command_id)
        )
        new = set((await self.conn.execute(stmt)).scalars())
        return [c for c in commands if c.command_id in new]

    async def unsent(self, older_than: datetime, limit: int) -> list[Row]:
        rows = await self.conn.execute(
            select(outbox)
            .where(outbox.c.sent_at.is_(None), outbox.c.created_at <= older_than)
            .order_by(outbox.c.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return [dict(r) for r in rows.mappings()]

    async def mark_sent(self, command_ids: Iterable[str]) -> None:
        ids = list(command_ids)
        if ids:
            await self.conn.execute(
                update(outbox)
                .where(outbox.c.command_id.in_(ids), outbox.c.sent_at.is_(None))
                .values(sent_at=func.now())
            )

    async def unsent_count(self) -> int:
        row = await self.conn.execute(select(func.count()).where(outbox.c.sent_at.is_(None)))
        return int(row.scalar_one())

    # -- timers -------------------------------------------------------------------------

    async def add_timer(
        self,
        *,
        dedupe_key: str,
        kind: str,
        account_id: str,
        due_at: datetime,
        payload: Mapping[str, Any],
    ) -> bool:
        stmt = (
            insert(timers)
            .values(
                dedupe_key=dedupe_key,
                kind=kind,
                account_id=account_id,
                due_at=due_at,
                payload=dict(payload),
            )
            .on_conflict_do_nothing(index_elements=[timers.c.dedupe_key])
            .returning(timers.c.timer_id)
        )
        return (await self.conn.execute(stmt)).scalar() is not None

    async def due_timers(self, now: datetime, limit: int) -> list[Row]:
        rows = await self.conn.execute(
            select(timers.c.timer_id, timers.c.account_id, timers.c.due_at)
            .where(
                timers.c.fired_at.is_(None), timers.c.cancelled_at.is_(None), timers.c.due_at <= now
            )
            .order_by(timers.c.due_at, timers.c.timer_id)
            .limit(limit)
        )
        return [dict(r) for r in rows.mappings()]

    async def claim_timer(self, timer_id: int) -> Row | None:
        """The timer, locked, if still pending (another replica may have fired it)."""
        row = await self.conn.execute(
            select(timers)
            .where(
                timers.c.timer_id == timer_id,
                timers.c.fired_at.is_(None),
                timers.c.cancelled_at.is_(None),
            )
            .with_for_update(skip_locked=True)
        )
        return _first(row.mappings().first())

    async def finish_timer(self, timer_id: int, at: datetime) -> None:
        await self.conn.execute(
            update(timers).where(timers.c.timer_id == timer_id).values(fired_at=at)
        )

    async def cancel_timers(
        self,
        account_id: str,
        *,
        case_id: str | None = None,
        kinds: Sequence[str] = (),
        reason: str,
        at: datetime,
    ) -> int:
        conditions = [
            timers.c.account_id == account_id,
            timers.c.fired_at.is_(None),
            timers.c.cancelled_at.is_(None),
        ]
        if case_id is not None:
            conditions.append(timers.c.payload["case_id"].astext == case_id)
        if kinds:
            conditions.append(timers.c.kind.in_(kinds))
        result = await self.conn.execute(
            update(timers).where(and_(*conditions)).values(cancelled_at=at, cancel_reason=reason)
        )
        return int(result.rowcount or 0)

    async def cancel_timer(self, timer_id: int, reason: str, at: datetime) -> None:
        await self.conn.execute(
            update(timers)
            .where(timers.c.timer_id == timer_id)
            .values(cancelled_at=at, cancel_reason=reason)
        )

    async def pending_timers(self) -> list[Row]:
        rows = await self.conn.execute(
            select(
                timers.c.kind, func.count().label("count"), func.min(timers.c.due_at).label("min")
            )
            .where(timers.c.fired_at.is_(None), timers.c.cancelled_at.is_(None))
            .group_by(timers.c.kind)
        )
        return [dict(r) for r in rows.mappings()]

    # -- dunning ------------------------------------------------------------------------

    async def has_open_case(self, account_id: str) -> bool:
        row = await self.conn.execute(
            select(dunning_cases.c.case_id)
            .where(
                dunning_cases.c.account_id == account_id, dunning_cases.c.status.in_(OPEN_DUNNING)
            )
            .limit(1)
        )
        return row.scalar() is not None

    async def case_for_invoice(self, account_id: str, invoice_id: str) -> Row | None:
        row = await self.conn.execute(
            select(dunning_cases).where(
                dunning_cases.c.account_id == account_id, dunning_cases.c.invoice_id == invoice_id
            )
        )
        return _first(row.mappings().first())

    async def case(self, case_id: str) -> Row | None:
        row = await self.conn.execute(
            select(dunning_cases).where(dunning_cases.c.case_id == case_id)
        )
        return _first(row.mappings().first())

    async def insert_case(self, row: Mapping[str, Any]) -> bool:
        stmt = (
            insert(dunning_cases)
            .values(**row)
            .on_conflict_do_nothing()
            .returning(dunning_cases.c.case_id)
        )
        return (await self.conn.execute(stmt)).scalar() is not None

    async def update_case(self, case_id: str, values: Mapping[str, Any]) -> None:
        await self.conn.execute(
            update(dunning_cases).where(dunning_cases.c.case_id == case_id).values(**values)
        )

    async def insert_attempt(self, row: Mapping[str, Any]) -> bool:
        stmt = (
            insert(dunning_attempts)
            .values(**row)
            .on_conflict_do_nothing()
            .returning(dunning_attempts.c.command_id)
        )
        return (await self.conn.execute(stmt)).scalar() is not None

    async def attempt(self, command_id: str) -> Row | None:
        row = await self.conn.execute(
            select(dunning_attempts).where(dunning_attempts.c.command_id == command_id)
        )
        return _first(row.mappings().first())

    async def set_attempt_outcome(
        self, command_id: str, outcome: str, decline_code: str | None, at: datetime
    ) -> bool:
        """Record the attempt's outcome; False if one was recorded already."""
        result = await self.conn.execute(
            update(dunning_attempts)
            .where(
                dunning_attempts.c.command_id == command_id, dunning_attempts.c.outcome.is_(None)
            )
            .values(outcome=outcome, decline_code=decline_code, outcome_at=at)
        )
        return bool(result.rowcount)

    async def mark_paid(self, account_id: str, invoice_id: str, at: datetime) -> None:
        await self.conn.execute(
            insert(paid_invoices)
            .values(account_id=account_id, invoice_id=invoice_id, paid_at=at)
            .on_conflict_do_nothing()
        )

    async def is_paid(self, account_id: str, invoice_id: str) -> bool:
        row = await self.conn.execute(
            select(paid_invoices.c.paid_at).where(
                paid_invoices.c.account_id == account_id, paid_invoices.c.invoice_id == invoice_id
            )
        )
        return row.scalar() is not None

    # -- outcomes -----------------------------------------------------------------------

    async def claim_outcome(
        self, outcome_id: str, action_id: str, status: str, at: datetime
    ) -> bool:
        stmt = (
            insert(outcomes)
            .values(outcome_id=outcome_id, action_id=action_id, status=status, at=at)
            .on_conflict_do_nothing()
            .returning(outcomes.c.outcome_id)
        )
        return (await self.conn.execute(stmt)).scalar() is not None

    async def failed_commands(self, command_ids: Sequence[str]) -> int:
        row = await self.conn.execute(
            select(func.count(func.distinct(outcomes.c.action_id))).where(
                outcomes.c.action_id.in_(command_ids), outcomes.c.status == "failed"
            )
        )
        return int(row.scalar_one())


def _first(row: Any) -> Row | None:
    return None if row is None else dict(row)
