"""The topic registry: every Kafka topic churnguard uses, in one enum.

Each entry says what the topic is for, what its record key is, which event models its
values hold, how many partitions it has, its cleanup policy and its dead-letter twin.
Nothing else in the code base spells a topic name.

Deployments (and tests) may put every topic under a prefix (``CHURNGUARD_TOPIC_PREFIX``,
e.g. ``staging.``); :meth:`Topic.name_in` applies it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import TypeAdapter

from churnguard.common.envelope import EnvelopeCodec
from churnguard.common.events.billing import BillingEvent
from churnguard.common.events.derived import (
    DecisionEvent,
    NotificationEvent,
    OutcomeEvent,
    PaymentRetryEvent,
    RevenueMovementEvent,
    ScoreEvent,
    SignalEvent,
)
from churnguard.common.events.feedback import FeedbackEvent
from churnguard.common.events.usage import UsageEvent

DEAD_LETTER_SUFFIX = ".dlq"
DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    description: str
    value: Any
    """The event model (or discriminated union of models) of the topic's events."""
    key: str = "account id"
    partitions: int = 4
    cleanup_policy: Literal["delete", "compact"] = "delete"
    retention_ms: int | None = 30 * DAY_MS
    dead_letter: bool = True
    codec: EnvelopeCodec[Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "codec", EnvelopeCodec(self.value))


class Topic(enum.Enum):
    """All topics. ``Topic.USAGE.topic`` is the name, ``.spec`` the rest."""

    USAGE = TopicSpec(
        "events.usage",
        "Product usage from apps and SDKs: track, identify, group, feature used, seats",
        UsageEvent,
    )
    BILLING = TopicSpec(
        "events.billing",
        "Invoices, payments and subscriptions (with MRR) from the billing system",
        BillingEvent,
    )
    FEEDBACK = TopicSpec(
        "events.feedback",
        "NPS, CSAT and support tickets from survey and help-desk tools",
        FeedbackEvent,
    )
    SCORES = TopicSpec(
        "accounts.scores",
        "Latest churn risk and health per account (compacted: one live value per key)",
        ScoreEvent,
        cleanup_policy="compact",
        retention_ms=None,
    )
    SIGNALS = TopicSpec(
        "accounts.signals",
        "Threshold crossings: risk tier crossed, usage drop, expansion",
        SignalEvent,
    )
    REVENUE_MOVEMENTS = TopicSpec(
        "revenue.movements",
        "MRR movements per customer: new, expansion, contraction, churn",
        RevenueMovementEvent,
        retention_ms=None,
    )
    NOTIFICATIONS = TopicSpec(
        "actions.notifications",
        "Commands to notify: Slack, email, in-app, CSM task, webhook",
        NotificationEvent,
    )
    PAYMENT_RETRIES = TopicSpec(
        "actions.payment-retries",
        "Commands to retry a failed payment (dunning)",
        PaymentRetryEvent,
    )
    OUTCOMES = TopicSpec(
        "actions.outcomes",
        "What became of each action: delivered, failed, read, paid",
        OutcomeEvent,
    )
    DECISIONS = TopicSpec(
        "playbooks.decisions",
        "Every playbook decision: fired with its commands, or suppressed and why",
        DecisionEvent,
        retention_ms=None,
    )

    @property
    def spec(self) -> TopicSpec:
        spec: TopicSpec = self.value
        return spec

    @property
    def topic(self) -> str:
        return self.spec.name

    @property
    def adapter(self) -> TypeAdapter[Any]:
        """Validates one event of this topic."""
        return self.spec.codec.item

    @property
    def codec(self) -> EnvelopeCodec[Any]:
        """Decodes this topic's envelope records."""
        return self.spec.codec

    def name_in(self, prefix: str = "") -> str:
        return prefix + self.spec.name

    def dead_letter_in(self, prefix: str = "") -> str:
        return prefix + self.spec.name + DEAD_LETTER_SUFFIX

    def config(self) -> dict[str, str]:
        """Topic-level configs for CreateTopics."""
        retention = -1 if self.spec.retention_ms is None else self.spec.retention_ms
        return {"cleanup.policy": self.spec.cleanup_policy, "retention.ms": str(retention)}


@dataclass(frozen=True)
class TopicPlan:
    """One topic as it should exist on the broker (a registry topic or a dead-letter twin)."""

    name: str
    partitions: int
    config: dict[str, str]
    registry: Topic
    dead_letter: bool


def planned_topics(prefix: str = "") -> list[TopicPlan]:
    """Every topic to create: the registry's and their dead-letter twins (kept 30 days)."""
    plans: list[TopicPlan] = []
    for t in Topic:
        plans.append(TopicPlan(t.name_in(prefix), t.spec.partitions, t.config(), t, False))
        if t.spec.dead_letter:
            plans.append(
                TopicPlan(
                    t.dead_letter_in(prefix),
                    1,
                    {"cleanup.policy": "delete", "retention.ms": str(30 * DAY_MS)},
                    t,
                    True,
                )
            )
    return plans
