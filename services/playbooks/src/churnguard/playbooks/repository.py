"""Every query of playbooks, on a connection whose transaction the caller owns.

The boundary (a consumer's batch, a timer's account) opens the transaction and commits it
once; nothing here commits. A decision reads its account in one query after taking the
account's lock (:meth:`PlaybooksRepository.load_account`) and writes everything it caused
in one statement (:meth:`PlaybooksRepository.flush`). Effects are inserted under their
unique keys (``ON CONFLICT DO NOTHING``), so work redone after a crash adds nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

import orjson
from sqlalchemy import and_, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from churnguard.playbooks.commands import Command, Contact
from churnguard.playbooks.tables import (
    contact_ledger,
    decision_actions,
    decisions,
    dunning_attempts,
    dunning_cases,
    outbox,
    outcomes,
    paid_invoices,
    timers,
)

Row = dict[str, Any]
"""A row as a plain dict (column name → value)."""


@dataclass
class AccountState:
    """Everything a decision reads about one account, loaded (and locked) in one query."""

    row: Row
    in_dunning: bool
    contact_timezone: str | None
    contacts: list[Contact]
    decided: set[str]
    """Playbooks that decided the signal already (its redelivery)."""
    cooldowns: dict[str, datetime]
    touches: dict[str, int]
    """Audience → touches in its budget window ending at the decision's time."""
    dedupe: set[tuple[str, str]]


@dataclass
class Writes:
    """The effects of one boundary, written in one statement at its end (:meth:`flush`)."""

    decisions: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    touches: list[dict[str, Any]] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    cooldowns: dict[tuple[str, str], datetime] = field(default_factory=dict)
    dedupe: list[dict[str, Any]] = field(default_factory=list)
    timers: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any(
            (
                self.decisions,
                self.actions,
                self.touches,
                self.commands,
                self.cooldowns,
                self.dedupe,
                self.timers,
            )
        )


ACCOUNT_LOCK_CLASS: Final = 0x706C6179  # "play": playbooks' own space of advisory locks

# The account's lock: a transaction-scoped advisory lock, not a row lock, so the state
# consumer (which alone writes ``accounts`` and ``contacts``) never waits for a decision
# nor a decision for it. Everything a decision writes is written under this lock.
_LOCK: Final = text("SELECT pg_advisory_xact_lock(:lock_class, hashtext(:account))")

# After the lock, in a statement of its own (a statement reads the snapshot taken when it
# starts, so reads in the locking statement could miss what the previous holder of the
# lock committed): the account and, beside it, everything the guard rails need.
_LOAD: Final = text(
    """
    SELECT a.*,
      EXISTS (SELECT 1 FROM dunning_cases d WHERE d.account_id = :account
              AND d.status IN ('retrying', 'awaiting_card_update')) AS in_dunning,
      (SELECT coalesce(jsonb_agg(jsonb_build_array(c.user_id, c.email, c.role, c.timezone)
                                 ORDER BY c.seen_at, c.user_id), '[]'::jsonb)
         FROM contacts c WHERE c.account_id = :account) AS contacts_json,
      (SELECT coalesce(jsonb_agg(p.playbook), '[]'::jsonb)
         FROM decisions p WHERE p.signal_id = :signal) AS decided_json,
      (SELECT coalesce(jsonb_object_agg(k.playbook, k.last_fired_at), '{}'::jsonb)
         FROM cooldowns k WHERE k.account_id = :account) AS cooldowns_json,
      (SELECT count(*) FROM contact_ledger l WHERE l.account_id = :account
         AND l.audience = 'customer' AND l.at > :customer_since AND l.at <= :at
         AND NOT l.voided) AS customer_touches,
      (SELECT count(*) FROM contact_ledger l WHERE l.account_id = :account
         AND l.audience = 'internal' AND l.at > :internal_since AND l.at <= :at
         AND NOT l.voided) AS internal_touches,
      (SELECT coalesce(jsonb_agg(jsonb_build_array(x.playbook, x.key)), '[]'::jsonb)
         FROM dedupe_keys x WHERE x.account_id = :account) AS dedupe_json
    FROM (SELECT 1) AS one LEFT JOIN accounts a ON a.account_id = :account
    """
)
_EXTRA: Final = (
    "in_dunning",
    "contacts_json",
    "decided_json",
    "cooldowns_json",
    "customer_touches",
    "internal_touches",
    "dedupe_json",
)

# One round trip for every effect of a boundary: data-modifying CTEs, fed JSON arrays.
_FLUSH: Final = text(
    """
    WITH
    d AS (
      INSERT INTO decisions (decision_id, signal_id, signal_type, playbook, playbook_version,
                             account_id, decided_at, outcome, reason, holdout, detail,
                             created_at)
      -- the moment it was taken, not its batch transaction's start (now())
      SELECT *, clock_timestamp() FROM jsonb_to_recordset(CAST(:decisions AS jsonb)) AS r(
        decision_id text, signal_id text, signal_type text, playbook text,
        playbook_version text, account_id text, decided_at timestamptz, outcome text,
        reason text, holdout boolean, detail jsonb)
      ON CONFLICT (signal_id, playbook) DO NOTHING RETURNING 1),
    a AS (
      INSERT INTO decision_actions (decision_id, action_index, channel, audience, status,
                                    reason, command_ids, due_at, updated_at)
      SELECT * FROM jsonb_to_recordset(CAST(:actions AS jsonb)) AS r(
        decision_id text, action_index int, channel text, audience text, status text,
        reason text, command_ids jsonb, due_at timestamptz, updated_at timestamptz)
      ON CONFLICT (decision_id, action_index) DO UPDATE SET status = EXCLUDED.status,
        reason = EXCLUDED.reason, command_ids = EXCLUDED.command_ids,
        due_at = EXCLUDED.due_at, updated_at = EXCLUDED.updated_at
      RETURNING 1),
    t AS (
      INSERT INTO contact_ledger (touch_id, account_id, audience, channel, playbook, at,
                                  transactional)
      SELECT * FROM jsonb_to_recordset(CAST(:touches AS jsonb)) AS r(
        touch_id text, account_id text, audience text, channel text, playbook text,
        at timestamptz, transactional boolean)
      ON CONFLICT DO NOTHING RETURNING 1),
    o AS (
      INSERT INTO outbox (command_id, topic, account_id, value, decision_id, received_at)
      SELECT r.command_id, r.topic, r.account_id, convert_to(r.value, 'UTF8'), r.decision_id,
             r.received_at
      FROM jsonb_to_recordset(CAST(:commands AS jsonb)) AS r(
        command_id text, topic text, account_id text, value text, decision_id text,
        received_at timestamptz)
      ON CONFLICT DO NOTHING RETURNING 1),
    c AS (
      INSERT INTO cooldowns (account_id, playbook, last_fired_at)
      SELECT * FROM jsonb_to_recordset(CAST(:cooldowns AS jsonb)) AS r(
        account_id text, playbook text, last_fired_at timestamptz)
      ON CONFLICT (account_id, playbook) DO UPDATE
        SET last_fired_at = GREATEST(cooldowns.last_fired_at, EXCLUDED.last_fired_at)
      RETURNING 1),
    k AS (
      INSERT INTO dedupe_keys (playbook, account_id, key, decision_id)
      SELECT * FROM jsonb_to_recordset(CAST(:dedupe AS jsonb)) AS r(
        playbook text, account_id text, key text, decision_id text)
      ON CONFLICT DO NOTHING RETURNING 1),
    m AS (
      INSERT INTO timers (dedupe_key, kind, account_id, due_at, payload)
      SELECT * FROM jsonb_to_recordset(CAST(:timers AS jsonb)) AS r(
        dedupe_key text, kind text, account_id text, due_at timestamptz, payload jsonb)
      ON CONFLICT (dedupe_key) DO NOTHING RETURNING 1)
    SELECT (SELECT count(*) FROM d) AS decisions
    """
)


_GROUP: Final = text(
    """
    INSERT INTO accounts AS a (account_id, name, plan, segment, owner, csm, timezone, traits_at)
    VALUES (:account, :name, :plan, :segment, :owner, :csm, :timezone, :at)
    ON CONFLICT (account_id) DO UPDATE SET
      name = coalesce(EXCLUDED.name, a.name), plan = coalesce(EXCLUDED.plan, a.plan),
      segment = coalesce(EXCLUDED.segment, a.segment), owner = coalesce(EXCLUDED.owner, a.owner),
      csm = coalesce(EXCLUDED.csm, a.csm), timezone = coalesce(EXCLUDED.timezone, a.timezone),
      traits_at = EXCLUDED.traits_at
    WHERE a.traits_at IS NULL OR a.traits_at <= EXCLUDED.traits_at
    """
)
_REVENUE: Final = text(
    """
    INSERT INTO accounts AS a (account_id, mrr, currency, mrr_at)
    VALUES (:account, :mrr, :currency, :at)
    ON CONFLICT (account_id) DO UPDATE SET
      mrr = EXCLUDED.mrr, currency = EXCLUDED.currency, mrr_at = EXCLUDED.mrr_at
    WHERE a.mrr_at IS NULL OR a.mrr_at <= EXCLUDED.mrr_at
    """
)
_SUBSCRIPTION: Final = text(
    """
    INSERT INTO accounts AS a (account_id, subscription_status, currency, subscription_at,
                               subscription_started_at)
    VALUES (:account, :status, :currency, :at, :started)
    ON CONFLICT (account_id) DO UPDATE SET
      subscription_status = CASE WHEN a.subscription_at IS NULL
        OR a.subscription_at <= EXCLUDED.subscription_at THEN EXCLUDED.subscription_status
        ELSE a.subscription_status END,
      subscription_at = GREATEST(a.subscription_at, EXCLUDED.subscription_at),
      currency = coalesce(a.currency, EXCLUDED.currency),
      subscription_started_at = LEAST(a.subscription_started_at,
                                      EXCLUDED.subscription_started_at)
    """
)
_SCORE: Final = text(
    """
    INSERT INTO accounts AS a (account_id, churn_probability, health, tier, reasons, features,
                               unadopted_sticky, scored_at, renewal_date)
    VALUES (:account, :churn_probability, :health, :tier, CAST(:reasons AS jsonb),
            CAST(:features AS jsonb), CAST(:unadopted AS jsonb), :at, :renewal_date)
    ON CONFLICT (account_id) DO UPDATE SET
      churn_probability = EXCLUDED.churn_probability, health = EXCLUDED.health,
      tier = EXCLUDED.tier, reasons = EXCLUDED.reasons,
      features = coalesce(EXCLUDED.features, a.features),
      unadopted_sticky = coalesce(EXCLUDED.unadopted_sticky, a.unadopted_sticky),
      scored_at = EXCLUDED.scored_at,
      renewal_date = coalesce(EXCLUDED.renewal_date, a.renewal_date)
    WHERE a.scored_at IS NULL OR a.scored_at <= EXCLUDED.scored_at
    """
)
_CONTACT: Final = text(
    """
    INSERT INTO contacts AS c (account_id, user_id, email, role, timezone, seen_at)
    VALUES (:account, :user, :email, :role, :timezone, :at)
    ON CONFLICT (account_id, user_id) DO UPDATE SET
      email = coalesce(EXCLUDED.email, c.email), role = coalesce(EXCLUDED.role, c.role),
      timezone = coalesce(EXCLUDED.timezone, c.timezone),
      seen_at = GREATEST(c.seen_at, EXCLUDED.seen_at)
    """
)


def _json(rows: Any) -> str:
    return orjson.dumps(rows, option=orjson.OPT_NAIVE_UTC).decode()


class PlaybooksRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def load_account(
        self, account_id: str, *, signal_id: str, at: datetime, windows: Mapping[str, timedelta]
    ) -> AccountState:
        """Lock the account and read its guard-rail state (see ``_LOCK`` and ``_LOAD``).

        Every decision about an account runs under this lock, so the decision consumer, the
        timer loop and a second replica (during a rebalance) never interleave their checks
        of the cool-down and the budget with each other's writes.
        """
        await self.lock(account_id)
        row = dict(
            (
                await self.conn.execute(
                    _LOAD,
                    {
                        "account": account_id,
                        "signal": signal_id,
                        "at": at,
                        "customer_since": at - windows["customer"],
                        "internal_since": at - windows["internal"],
                    },
                )
            )
            .mappings()
            .one()
        )
        extra = {k: row.pop(k) for k in _EXTRA}
        row["account_id"] = account_id  # no row yet: nothing known of the account
        contacts_raw = extra["contacts_json"]
        return AccountState(
            row=row,
            in_dunning=bool(extra["in_dunning"]),
            contact_timezone=next((c[3] for c in contacts_raw if c[3]), None),
            contacts=[Contact(c[0], c[1], c[2]) for c in contacts_raw],
            decided=set(extra["decided_json"]),
            cooldowns={k: datetime.fromisoformat(v) for k, v in extra["cooldowns_json"].items()},
            touches={
                "customer": int(extra["customer_touches"]),
                "internal": int(extra["internal_touches"]),
            },
            dedupe={(p, k) for p, k in extra["dedupe_json"]},
        )

    async def lock(self, account_id: str) -> None:
        await self.conn.execute(_LOCK, {"lock_class": ACCOUNT_LOCK_CLASS, "account": account_id})

    async def flush(self, writes: Writes) -> int:
        """Write a boundary's effects in one statement; how many decisions were new."""
        if not writes:
            return 0
        params = {
            "decisions": _json(writes.decisions),
            "actions": _json(writes.actions),
            "touches": _json(writes.touches),
            "commands": _json(
                [
                    {
                        "command_id": c.command_id,
                        "topic": c.topic.name,
                        "account_id": c.account_id,
                        "value": c.value.decode(),
                        "decision_id": c.decision_id,
                        "received_at": c.received_at,
                    }
                    for c in writes.commands
                ]
            ),
            "cooldowns": _json(
                [
                    {"account_id": a, "playbook": p, "last_fired_at": t}
                    for (a, p), t in writes.cooldowns.items()
                ]
            ),
            "dedupe": _json(writes.dedupe),
            "timers": _json(writes.timers),
        }
        return int((await self.conn.execute(_FLUSH, params)).scalar_one())

    # -- accounts -------------------------------------------------------------------------

    # -- the account profile (the state consumer's tables) -------------------------------
    # Fixed statements, not built per call: the state consumer runs one per profile event.
    # Each changes the row only if the event is not older than what the row holds, and a
    # group call names only what it knows, so an absent trait never erases a known one.

    async def apply_group(
        self, account_id: str, traits: Mapping[str, str | None], at: datetime
    ) -> None:
        await self.conn.execute(_GROUP, {"account": account_id, "at": at, **traits})

    async def apply_revenue(self, account_id: str, mrr: int, currency: str, at: datetime) -> None:
        await self.conn.execute(
            _REVENUE, {"account": account_id, "mrr": mrr, "currency": currency, "at": at}
        )

    async def apply_subscription(
        self, account_id: str, status: str, currency: str, at: datetime, started: bool
    ) -> None:
        await self.conn.execute(
            _SUBSCRIPTION,
            {
                "account": account_id,
                "status": status,
                "currency": currency,
                "at": at,
                "started": at if started else None,
            },
        )

    async def apply_score(self, account_id: str, values: Mapping[str, Any], at: datetime) -> None:
        await self.conn.execute(
            _SCORE,
            {
                "account": account_id,
                "at": at,
                "churn_probability": values["churn_probability"],
                "health": values["health"],
                "tier": values["tier"],
                "reasons": _json(values["reasons"]),
                "features": None if values["features"] is None else _json(values["features"]),
                "unadopted": None if values["unadopted"] is None else _json(values["unadopted"]),
                "renewal_date": values["renewal_date"],
            },
        )

    async def upsert_contact(
        self,
        account_id: str,
        user_id: str,
        *,
        email: str | None,
        role: str | None,
        timezone: str | None,
        seen_at: datetime,
    ) -> None:
        await self.conn.execute(
            _CONTACT,
            {
                "account": account_id,
                "user": user_id,
                "email": email,
                "role": role,
                "timezone": timezone,
                "at": seen_at,
            },
        )

    async def decided_playbooks(self, signal_id: str) -> set[str]:
        rows = await self.conn.execute(
            select(decisions.c.playbook).where(decisions.c.signal_id == signal_id)
        )
        return set(rows.scalars())

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

    # -- contact budget -------------------------------------------------------------------

    async def void_touch(self, touch_id: str) -> None:
        await self.conn.execute(
            update(contact_ledger).where(contact_ledger.c.touch_id == touch_id).values(voided=True)
        )

    # -- outbox -------------------------------------------------------------------------

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

    async def accounts_with_due_timers(self, now: datetime, limit: int) -> list[str]:
        """Accounts with timers due, the most overdue first (no locks taken)."""
        rows = await self.conn.execute(
            select(timers.c.account_id)
            .where(
                timers.c.fired_at.is_(None),
                timers.c.cancelled_at.is_(None),
                timers.c.due_at <= now,
            )
            .group_by(timers.c.account_id)
            .order_by(func.min(timers.c.due_at))
            .limit(limit)
        )
        return list(rows.scalars())

    async def claim_due_timers(self, account_id: str, now: datetime) -> list[Row]:
        """The account's due timers, locked (``SKIP LOCKED``: another replica has them);
        call under the account's lock."""
        rows = await self.conn.execute(
            select(timers)
            .where(
                timers.c.account_id == account_id,
                timers.c.fired_at.is_(None),
                timers.c.cancelled_at.is_(None),
                timers.c.due_at <= now,
            )
            .order_by(timers.c.due_at, timers.c.timer_id)
            .with_for_update(skip_locked=True)
        )
        return [dict(r) for r in rows.mappings()]

    async def finish_timers(self, timer_ids: Sequence[int], at: datetime) -> None:
        if timer_ids:
            await self.conn.execute(
                update(timers).where(timers.c.timer_id.in_(timer_ids)).values(fired_at=at)
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

    async def attempt_outcome(self, case_id: str, attempt: int) -> str | None:
        row = await self.conn.execute(
            select(dunning_attempts.c.outcome).where(
                dunning_attempts.c.case_id == case_id, dunning_attempts.c.attempt == attempt
            )
        )
        return row.scalar()

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
