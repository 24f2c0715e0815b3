"""churnguard's event contract: one pydantic model per CloudEvent type, one union per topic.

- :mod:`.base`: the CloudEvent envelope and shared field types.
- :mod:`.usage` (``events.usage``), :mod:`.billing` (``events.billing``),
  :mod:`.feedback` (``events.feedback``): what comes in.
- :mod:`.derived`: what churnguard produces (scores, signals, MRR movements, actions,
  outcomes).
- :mod:`.schemas`: JSON Schema export/check; the exported schemas live in ``schemas/``
  and example payloads of every type in ``examples/<type>/``.

Parse a record of a topic with its union, e.g.
``TypeAdapter(BillingEvent).validate_json(raw)``; or find the class of any type with
:func:`event_class_for`.
"""

from __future__ import annotations

from churnguard.common.events.base import CloudEvent, Payload
from churnguard.common.events.billing import (
    BillingEvent,
    ChargeRefunded,
    InvoiceCreated,
    InvoicePaid,
    InvoicePaymentFailed,
    SubscriptionCancelled,
    SubscriptionCreated,
    SubscriptionUpdated,
    decline_kind,
)
from churnguard.common.events.derived import (
    AccountScored,
    ActionOutcome,
    DecisionEvent,
    DecisionLogged,
    DetractorNps,
    ExpansionSignal,
    MilestoneReached,
    NotificationEvent,
    NotificationRequested,
    OutcomeEvent,
    PaymentFailedSignal,
    PaymentRetryEvent,
    PaymentRetryRequested,
    ReasonCode,
    RenewalAtRisk,
    RevenueMovement,
    RevenueMovementEvent,
    RiskTier,
    RiskTierCrossed,
    ScoreEvent,
    SignalEvent,
    UsageDropped,
)
from churnguard.common.events.feedback import (
    CsatSubmitted,
    FeedbackEvent,
    NpsSubmitted,
    TicketClosed,
    TicketOpened,
)
from churnguard.common.events.usage import (
    FeatureUsed,
    Group,
    Identify,
    SeatsChanged,
    Track,
    UsageEvent,
)

ALL_EVENT_TYPES: tuple[type[CloudEvent], ...] = (
    # events.usage
    Track,
    Identify,
    Group,
    FeatureUsed,
    SeatsChanged,
    # events.billing
    InvoiceCreated,
    InvoicePaid,
    InvoicePaymentFailed,
    SubscriptionCreated,
    SubscriptionUpdated,
    SubscriptionCancelled,
    ChargeRefunded,
    # events.feedback
    NpsSubmitted,
    CsatSubmitted,
    TicketOpened,
    TicketClosed,
    # accounts.scores
    AccountScored,
    # accounts.signals
    RiskTierCrossed,
    UsageDropped,
    ExpansionSignal,
    MilestoneReached,
    PaymentFailedSignal,
    DetractorNps,
    RenewalAtRisk,
    # revenue.movements
    RevenueMovement,
    # actions.notifications, actions.payment-retries, actions.outcomes
    NotificationRequested,
    PaymentRetryRequested,
    ActionOutcome,
    # playbooks.decisions
    DecisionLogged,
)
"""Every concrete event class, grouped by topic."""


class UnknownEventTypeError(KeyError):
    """No churnguard event class has this CloudEvent ``type``."""


def type_name_of(cls: type[CloudEvent]) -> str:
    """The CloudEvent ``type`` string of an event class (its ``type`` literal)."""
    default = cls.model_fields["type"].default
    if not isinstance(default, str):
        raise TypeError(f"{cls.__name__} does not pin its type")
    return default


def _index(classes: tuple[type[CloudEvent], ...]) -> dict[str, type[CloudEvent]]:
    index: dict[str, type[CloudEvent]] = {}
    for cls in classes:
        name = type_name_of(cls)
        if name in index:
            raise RuntimeError(f"event type {name} is defined twice")
        index[name] = cls
    return index


_BY_TYPE = _index(ALL_EVENT_TYPES)


def event_class_for(type_name: str) -> type[CloudEvent]:
    """The event class whose ``type`` is ``type_name``; :class:`UnknownEventTypeError` if none."""
    try:
        return _BY_TYPE[type_name]
    except KeyError:
        raise UnknownEventTypeError(type_name) from None


__all__ = [
    "ALL_EVENT_TYPES",
    "AccountScored",
    "ActionOutcome",
    "BillingEvent",
    "ChargeRefunded",
    "CloudEvent",
    "CsatSubmitted",
    "DecisionEvent",
    "DecisionLogged",
    "DetractorNps",
    "ExpansionSignal",
    "FeatureUsed",
    "FeedbackEvent",
    "Group",
    "Identify",
    "InvoiceCreated",
    "InvoicePaid",
    "InvoicePaymentFailed",
    "MilestoneReached",
    "NotificationEvent",
    "NotificationRequested",
    "NpsSubmitted",
    "OutcomeEvent",
    "Payload",
    "PaymentFailedSignal",
    "PaymentRetryEvent",
    "PaymentRetryRequested",
    "ReasonCode",
    "RenewalAtRisk",
    "RevenueMovement",
    "RevenueMovementEvent",
    "RiskTier",
    "RiskTierCrossed",
    "ScoreEvent",
    "SeatsChanged",
    "SignalEvent",
    "SubscriptionCancelled",
    "SubscriptionCreated",
    "SubscriptionUpdated",
    "TicketClosed",
    "TicketOpened",
    "Track",
    "UnknownEventTypeError",
    "UsageDropped",
    "UsageEvent",
    "decline_kind",
    "event_class_for",
    "type_name_of",
]
