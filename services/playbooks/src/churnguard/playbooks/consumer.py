"""What each consumed record does: one PostgreSQL transaction per record.

Two consumer loops (:class:`~churnguard.common.kafka.ConsumerLoop`, two groups) share the
work, so a flood of scores never delays a signal's decision:

* **decisions** (``accounts.signals``, ``actions.outcomes``, ``events.billing``):
  signals become decisions; outcomes move dunning on and record deliveries; paid
  invoices stop dunning; subscription events set the account's status.
* **state** (``events.usage``, ``accounts.scores``, ``revenue.movements``): the account
  profile conditions read (traits and contacts, score and features, MRR).

The order of a record's steps: decode (a bad record → the topic's dead-letter twin) →
one transaction (profile writes, decision rows, timers, the contact ledger and the
commands into the outbox) → commit → the loop's ``before_commit`` publishes the staged
commands and waits for Kafka → the loop commits the offsets. A crash anywhere repeats
work whose effects are keyed, so nothing is done twice.

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
from sqlalchemy.ext.asyncio import AsyncEngine

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
from churnguard.playbooks.outbox import Staged
from churnguard.playbooks.repository import PlaybooksRepository

log = logging.getLogger(__name__)

DECISION_TOPICS: Final = (Topic.SIGNALS, Topic.OUTCOMES, Topic.BILLING)
STATE_TOPICS: Final = (Topic.USAGE, Topic.SCORES, Topic.REVENUE_MOVEMENTS)

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


class RecordProcessor:
    """Processes records of every topic playbooks read (see the module docstring)."""

    def __init__(self, engine: AsyncEngine, decisions: DecisionEngine, prefix: str) -> None:
        self.engine = engine
        self.decisions = decisions
        self.topic_of = {t.name_in(prefix): t for t in (*DECISION_TOPICS, *STATE_TOPICS)}

    def processor(self, staged: Staged) -> Any:
        async def process(record: ConsumerRecord) -> int:
            return await self.process(record, staged)

        return process

    async def process(self, record: ConsumerRecord, staged: Staged) -> int:
        topic = self.topic_of[record.topic]
        if topic is Topic.USAGE and (
            record.value is None or not any(m in record.value for m in _PROFILE_MARKERS)
        ):
            return 0
        events = topic.codec.decode(record.value)  # InvalidEnvelope → dead letter
        result = Result()
        received = _received(record)
        async with self.engine.begin() as conn:
            repo = PlaybooksRepository(conn)
            for event in events:
                with bind_event(event.id, event.subject):
                    await self.apply(repo, topic, event, received, result)
        # committed: the decisions are durable and their commands in the outbox
        for d in result.decisions:
            pm.DECISIONS.labels(d.playbook, d.outcome, d.reason_class).inc()
        if result.duplicates:
            pm.REDELIVERED.inc(result.duplicates)
        staged.add(result.commands)
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
            await repo.upsert_account(
                event.subject,
                {
                    "mrr": event.data.mrr_after,
                    "currency": event.data.currency,
                    "mrr_at": event.time,
                },
                newer_than=("mrr_at", event.time),
            )

    async def _billing(self, repo: PlaybooksRepository, event: Any) -> None:
        if isinstance(event, InvoicePaid):
            await self.decisions.on_invoice_paid(
                repo, event.subject, event.data.invoice_id, event.time
            )
        elif isinstance(event, SubscriptionCreated | SubscriptionUpdated | SubscriptionCancelled):
            await repo.upsert_account(
                event.subject,
                {
                    "subscription_status": event.data.status,
                    "subscription_at": event.time,
                    "currency": event.data.currency,
                },
                newer_than=("subscription_at", event.time),
            )
            if isinstance(event, SubscriptionCreated):
                await repo.set_subscription_start(event.subject, event.time)

    async def _usage(self, repo: PlaybooksRepository, event: Any) -> None:
        if isinstance(event, Group):
            traits = event.data.traits
            values = {
                "name": traits.get("name") if isinstance(traits.get("name"), str) else None,
                "plan": traits.get("plan") if isinstance(traits.get("plan"), str) else None,
                "segment": traits.get("segment")
                if isinstance(traits.get("segment"), str)
                else None,
                "owner": _trait(traits, OWNER_TRAITS),
                "csm": _trait(traits, CSM_TRAITS),
                "timezone": _trait(traits, TIMEZONE_TRAITS),
            }
            # a group call names only what it knows: never erase a trait it left out
            known = {k: v for k, v in values.items() if v is not None}
            known["traits_at"] = event.time
            await repo.upsert_account(event.subject, known, newer_than=("traits_at", event.time))
            await repo.upsert_contact(event.subject, event.data.user_id, {}, event.time)
        elif isinstance(event, Identify):
            traits = event.data.traits
            email = traits.get("email")
            role = traits.get("role")
            await repo.upsert_contact(
                event.subject,
                event.data.user_id,
                {
                    "email": email if isinstance(email, str) and "@" in email else None,
                    "role": role if isinstance(role, str) else None,
                    "timezone": _trait(traits, TIMEZONE_TRAITS),
                },
                event.time,
            )

    async def _score(self, repo: PlaybooksRepository, event: AccountScored) -> None:
        data = event.data
        features = data.features or {}
        renewal: date | None = None
        days_to_renewal = features.get("days_to_renewal", -1)
        if days_to_renewal >= 0:
            renewal = event.time.date() + timedelta(days=int(days_to_renewal))
        values: dict[str, Any] = {
            "churn_probability": data.churn_probability,
            "health": data.health,
            "tier": data.tier,
            "reasons": [r.model_dump(mode="json") for r in data.reasons],
            "scored_at": event.time,
        }
        if data.features is not None:
            values["features"] = data.features
        if data.unadopted_sticky_features is not None:
            values["unadopted_sticky"] = list(data.unadopted_sticky_features)
        if renewal is not None:
            values["renewal_date"] = renewal
        await repo.upsert_account(event.subject, values, newer_than=("scored_at", event.time))
        if renewal is not None:
            await self.decisions.schedule_renewals(
                repo, event.subject, renewal, event.time, int(days_to_renewal)
            )
