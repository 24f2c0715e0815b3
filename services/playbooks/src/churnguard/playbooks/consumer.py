"""What each consumed record does, in one PostgreSQL transaction per fetched batch.

Two consumer loops (:class:`~churnguard.common.kafka.ConsumerLoop`, two groups) share the
work, so a flood of scores never delays a signal's decision:

* **decisions** (``accounts.signals``, ``actions.outcomes``, ``events.billing``):
  signals become decisions; outcomes move dunning on and record deliveries; paid
  invoices stop dunning; subscription events set the account's status.
* **state** (``events.usage``, ``accounts.scores``, ``revenue.movements``): the account
  profile conditions read (traits and contacts, score and features, MRR).

The order of the steps: each record is decoded (a bad one → the topic's dead-letter twin)
and applied in the batch's transaction (profile writes, decision rows, timers, the
contact ledger, the commands into the outbox; each account under its row lock); then the
loop's ``before_commit`` commits the transaction, publishes the batch's commands and
waits for Kafka; then the loop commits the offsets. A crash anywhere repeats work whose
effects are keyed, so nothing is done twice.

Usage records hold mostly feature-used events that playbooks ignore; records without a
``group`` or ``identify`` event are skipped without being parsed (scoring, which reads
every event, dead-letters the malformed ones).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

from aiokafka import ConsumerRecord
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from churnguard.common.events.billing import (
    InvoicePaid,
    SubscriptionCancelled,
    SubscriptionCreated,
    SubscriptionUpdated,
)
from churnguard.common.events.derived import AccountScored, ActionOutcome, RevenueMovement
from churnguard.common.events.usage import Group, Identify
from churnguard.common.logs import bind_event
from churnguard.common.topics import Topic
from churnguard.playbooks import playbooks_metrics as pm
from churnguard.playbooks.decisions import DecisionEngine, Result
from churnguard.playbooks.outbox import OutboxRelay
from churnguard.playbooks.repository import PlaybooksRepository

log = logging.getLogger(__name__)

DECISION_TOPICS: Final = (Topic.SIGNALS, Topic.OUTCOMES, Topic.BILLING)
STATE_TOPICS: Final = (Topic.USAGE, Topic.SCORES, Topic.REVENUE_MOVEMENTS, Topic.BILLING)
"""Billing is read by both (two groups): paid invoices end dunning (decisions), subscription
events set the account's status (state). Each loop writes only its own tables, so their
batch transactions never wait for each other."""

OWNER_TRAITS: Final = ("owner", "owner_id", "account_owner")
CSM_TRAITS: Final = ("csm", "csm_id", "customer_success_manager")
TIMEZONE_TRAITS: Final = ("timezone", "time_zone", "tz")
_PROFILE_MARKERS: Final = (b"churnguard.usage.group", b"churnguard.usage.identify")


def _trait(traits: Mapping[str, Any], names: tuple[str, ...]) -> str | None:
    for name in names:
        value = traits.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _received(record: ConsumerRecord) -> datetime | None:
    return datetime.fromtimestamp(record.timestamp / 1000, UTC) if record.timestamp else None


class BatchFailed(RuntimeError):
    """A record of the batch failed: the batch's transaction was rolled back."""


class Batch:
    """One transaction for the records of one fetched batch (one loop's), committed by the
    loop's ``before_commit``: commit, then publish the batch's commands, then the loop
    commits the offsets.

    One commit per batch instead of per record: the disk flush of a commit costs more than
    the decision itself, and under load a batch holds hundreds of records. Each record's
    effects are keyed as before, so a batch redone after a crash changes nothing. If a
    record fails, the whole batch is rolled back and the commit refused, so no offset is
    committed for effects that were not; the loop stops and the restart redoes the batch.
    """

    def __init__(self, engine: AsyncEngine, relay: OutboxRelay) -> None:
        self.engine = engine
        self.relay = relay
        self._conn: AsyncConnection | None = None
        self._failed = False
        self._result = Result()

    async def connection(self) -> AsyncConnection:
        if self._conn is None:
            self._conn = await self.engine.connect()
            await self._conn.begin()
        return self._conn

    def add(self, result: Result) -> None:
        self._result.commands += result.commands
        self._result.decisions += result.decisions
        self._result.duplicates += result.duplicates

    def fail(self) -> None:
        self._failed = True

    async def commit(self) -> None:
        conn, result = self._conn, self._result
        self._conn, self._result = None, Result()
        if conn is not None:
            try:
                if self._failed:
                    await conn.rollback()
                    raise BatchFailed("a record failed: its batch was rolled back")
                await conn.commit()
            finally:
                await conn.close()
        for d in result.decisions:
            pm.DECISIONS.labels(d.playbook, d.outcome, d.reason_class).inc()
        if result.duplicates:
            pm.REDELIVERED.inc(result.duplicates)
        await self.relay.publish(result.commands)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


class RecordProcessor:
    """Processes records of every topic playbooks read (see the module docstring)."""

    def __init__(
        self, engine: AsyncEngine, decisions: DecisionEngine, prefix: str, *, role: str
    ) -> None:
        if role not in ("decisions", "state"):
            raise ValueError(f"role {role!r}: decisions or state")
        self.engine = engine
        self.decisions = decisions
        self.role = role
        self.topic_of = {t.name_in(prefix): t for t in (*DECISION_TOPICS, *STATE_TOPICS)}

    def processor(self, batch: Batch) -> Any:
        async def process(record: ConsumerRecord) -> int:
            return await self.process(record, batch)

        return process

    async def process(self, record: ConsumerRecord, batch: Batch) -> int:
        topic = self.topic_of[record.topic]
        if topic is Topic.USAGE and (
            record.value is None or not any(m in record.value for m in _PROFILE_MARKERS)
        ):
            return 0
        events = topic.codec.decode(record.value)  # InvalidEnvelope → dead letter
        received = _received(record)
        repo = PlaybooksRepository(await batch.connection())
        result = Result()
        try:
            for event in events:
                with bind_event(event.id, event.subject):
                    await self.apply(repo, topic, event, received, result)
        except BaseException:
            batch.fail()
            raise
        batch.add(result)
        return len(events)

    async def apply(
        self,
        repo: PlaybooksRepository,
        topic: Topic,
        event: Any,
        received_at: datetime | None,
        result: Result,
    ) -> None:
        """One event of ``topic``, inside the caller's transaction."""
        if topic is Topic.SIGNALS:
            decided = await self.decisions.decide_signal(repo, event, received_at)
            result.commands += decided.commands
            result.decisions += decided.decisions
            result.duplicates += decided.duplicates
        elif topic is Topic.OUTCOMES:
            assert isinstance(event, ActionOutcome)
            outcome = await self.decisions.on_outcome(repo, event)
            result.commands += outcome.commands
            result.duplicates += outcome.duplicates
        elif topic is Topic.BILLING:
            await self._billing(repo, event)
        elif topic is Topic.USAGE:
            await self._usage(repo, event)
        elif topic is Topic.SCORES:
            await self._score(repo, event)
        elif topic is Topic.REVENUE_MOVEMENTS:
            assert isinstance(event, RevenueMovement)
            await repo.apply_revenue(
                event.subject, event.data.mrr_after, event.data.currency, event.time
            )

    async def _billing(self, repo: PlaybooksRepository, event: Any) -> None:
        if isinstance(event, InvoicePaid):
            if self.role == "decisions":
                await self.decisions.on_invoice_paid(
                    repo, event.subject, event.data.invoice_id, event.time
                )
        elif self.role == "state" and isinstance(
            event, SubscriptionCreated | SubscriptionUpdated | SubscriptionCancelled
        ):
            await repo.apply_subscription(
                event.subject,
                event.data.status,
                event.data.currency,
                event.time,
                started=isinstance(event, SubscriptionCreated),
            )

    async def _usage(self, repo: PlaybooksRepository, event: Any) -> None:
        if isinstance(event, Group):
            traits = event.data.traits
            await repo.apply_group(
                event.subject,
                {
                    "name": _trait(traits, ("name",)),
                    "plan": _trait(traits, ("plan",)),
                    "segment": _trait(traits, ("segment",)),
                    "owner": _trait(traits, OWNER_TRAITS),
                    "csm": _trait(traits, CSM_TRAITS),
                    "timezone": _trait(traits, TIMEZONE_TRAITS),
                },
                event.time,
            )
            await repo.upsert_contact(
                event.subject,
                event.data.user_id,
                email=None,
                role=None,
                timezone=None,
                seen_at=event.time,
            )
        elif isinstance(event, Identify):
            traits = event.data.traits
            email = traits.get("email")
            await repo.upsert_contact(
                event.subject,
                event.data.user_id,
                email=email if isinstance(email, str) and "@" in email else None,
                role=_trait(traits, ("role",)),
                timezone=_trait(traits, TIMEZONE_TRAITS),
                seen_at=event.time,
            )

    async def _score(self, repo: PlaybooksRepository, event: AccountScored) -> None:
        data = event.data
        features = data.features or {}
        renewal: date | None = None
        days_to_renewal = features.get("days_to_renewal", -1)
        if days_to_renewal >= 0:
            renewal = event.time.date() + timedelta(days=int(days_to_renewal))
        await repo.apply_score(
            event.subject,
            {
                "churn_probability": data.churn_probability,
                "health": data.health,
                "tier": data.tier,
                "reasons": [r.model_dump(mode="json") for r in data.reasons],
                "features": data.features,
                "unadopted": None
                if data.unadopted_sticky_features is None
                else list(data.unadopted_sticky_features),
                "renewal_date": renewal,
            },
            event.time,
        )
        if renewal is not None:
            await self.decisions.schedule_renewals(
                repo, event.subject, renewal, event.time, int(days_to_renewal)
            )
