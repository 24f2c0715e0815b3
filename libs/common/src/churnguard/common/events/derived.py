"""Events churnguard produces itself, from scores to delivery outcomes.

- ``accounts.scores`` (compacted): :class:`AccountScored`; scoring → playbooks, console.
- ``accounts.signals``: :data:`SignalEvent` (:class:`RiskTierCrossed`,
  :class:`UsageDropped`, :class:`ExpansionSignal`, :class:`MilestoneReached`,
  :class:`PaymentFailedSignal`, :class:`DetractorNps`, :class:`RenewalAtRisk`);
  scoring → playbooks, console.
- ``revenue.movements``: :class:`RevenueMovement`; scoring → console (MRR ledger).
- ``actions.notifications``: :class:`NotificationRequested`; playbooks → notify.
- ``actions.payment-retries``: :class:`PaymentRetryRequested`; playbooks → notify.
- ``actions.outcomes``: :class:`ActionOutcome`; notify → scoring, playbooks, console.
- ``playbooks.decisions``: :class:`DecisionLogged`; playbooks → console (fired and
  suppressed decisions, holdouts: uplift and the playbooks page).

``subject`` is the account, as for every event, so an account's scores, signals and
actions stay in order on one partition.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import AwareDatetime, Field, StringConstraints, model_validator

from churnguard.common.events.base import CloudEvent, Currency, EventId, Money, Payload
from churnguard.common.events.billing import BillingId, Cancellation, DeclineKind

RiskTier = Literal["healthy", "watch", "at_risk", "critical"]
"""Risk tiers from best to worst; scoring derives the tier from the churn probability."""

RISK_TIERS: tuple[RiskTier, ...] = ("healthy", "watch", "at_risk", "critical")
"""All tiers, ordered from least to most at risk."""

Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Health = Annotated[int, Field(ge=0, le=100, description="Health score, 0 (worst) to 100 (best)")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class ReasonCode(Payload):
    """One reason behind a score: a stable machine code, a human sentence, and its weight."""

    code: Annotated[
        str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    ] = Field(description="Stable identifier, e.g. usage_trend_down")
    description: Annotated[str, StringConstraints(min_length=1, max_length=500)] = Field(
        description="What it means for this account, ready to show to a CSM"
    )
    impact: float = Field(
        allow_inf_nan=False,
        description="Contribution to the churn probability: > 0 raises risk, < 0 lowers it",
    )


Reasons = Annotated[
    list[ReasonCode], Field(max_length=10, description="Top reasons, strongest first")
]


FeatureName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
StickyFeatures = Annotated[
    list[Annotated[str, StringConstraints(min_length=1, max_length=64)]],
    Field(
        max_length=50,
        description="Sticky product features (integrations, automations, api, scheduled "
        "reports) the account has not used for 90 days",
    ),
]


class AccountScoredData(Payload):
    churn_probability: Probability
    health: Health
    tier: RiskTier
    reasons: Reasons = Field(default_factory=list)
    model_version: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    features: dict[FeatureName, Annotated[float, Field(allow_inf_nan=False)]] | None = Field(
        default=None,
        max_length=100,
        description="The model's input features as of the score (names as in scoring's "
        "FEATURE_NAMES, e.g. tenure_days, mrr, days_to_renewal), for conditions downstream",
    )
    unadopted_sticky_features: StickyFeatures | None = None


class AccountScored(CloudEvent):
    """The account's current score: churn probability, health, tier and top reasons.

    Produced by scoring on every re-score (events or the timer for silent accounts) into
    the compacted topic ``accounts.scores``, whose latest record per account is the
    account's current score. The CloudEvent ``time`` is the scoring time. Consumed by
    playbooks (conditions on scores) and console (read model, health distribution).
    """

    type: Literal["churnguard.scores.account_scored"] = "churnguard.scores.account_scored"
    data: AccountScoredData


ScoreEvent = AccountScored
"""The one event type of ``accounts.scores``."""


class RiskTierCrossedData(Payload):
    from_tier: RiskTier
    to_tier: RiskTier
    churn_probability: Probability
    health: Health
    previous_health: Health
    reasons: Reasons = Field(default_factory=list)

    @model_validator(mode="after")
    def _tiers_differ(self) -> Self:
        if self.from_tier == self.to_tier:
            raise ValueError("from_tier and to_tier must differ")
        return self

    @property
    def worsened(self) -> bool:
        """True when the account moved to a riskier tier."""
        return RISK_TIERS.index(self.to_tier) > RISK_TIERS.index(self.from_tier)


class RiskTierCrossed(CloudEvent):
    """The account's risk tier changed (past the hysteresis band, so not a flap).

    Produced by scoring (topic ``accounts.signals``) only on a real crossing; consumed by
    playbooks (the CSM alert "account moved to at_risk, because…") and console.
    """

    type: Literal["churnguard.signals.risk_tier_crossed"] = "churnguard.signals.risk_tier_crossed"
    data: RiskTierCrossedData


class UsageDroppedData(Payload):
    window_days: int = Field(ge=1, le=365, description="Length of each compared window")
    previous: int = Field(ge=0, description="Activity in the window before")
    current: int = Field(ge=0, description="Activity in the latest window")
    drop_ratio: float = Field(
        gt=0.0, le=1.0, allow_inf_nan=False, description="(previous - current) / previous"
    )
    unadopted_sticky_features: StickyFeatures | None = None

    @model_validator(mode="after")
    def _is_a_drop(self) -> Self:
        if self.current >= self.previous:
            raise ValueError("current must be below previous for a usage drop")
        return self


class UsageDropped(CloudEvent):
    """The account's activity fell sharply between two consecutive windows.

    Produced by scoring (topic ``accounts.signals``); consumed by playbooks (re-engagement
    emails, CSM tasks) and console.
    """

    type: Literal["churnguard.signals.usage_dropped"] = "churnguard.signals.usage_dropped"
    data: UsageDroppedData


class ExpansionSignalData(Payload):
    reason: Annotated[str, StringConstraints(min_length=1, max_length=500)] = Field(
        description="Why the account looks ready to buy more, e.g. seats_near_limit"
    )
    seats_utilisation: float | None = Field(
        default=None, ge=0.0, allow_inf_nan=False, description="Seats used / seats purchased"
    )


class ExpansionSignal(CloudEvent):
    """The account shows an upsell opportunity (seats nearly full, usage above its plan).

    Produced by scoring (topic ``accounts.signals``); consumed by playbooks (a task for
    the account owner) and console.
    """

    type: Literal["churnguard.signals.expansion_signal"] = "churnguard.signals.expansion_signal"
    data: ExpansionSignalData


class MilestoneReachedData(Payload):
    milestone: Annotated[str, StringConstraints(min_length=1, max_length=200)] = Field(
        description="Which milestone, e.g. active_users or first_integration_connected"
    )
    value: int = Field(description="The value reached (count, threshold)")


class MilestoneReached(CloudEvent):
    """The account reached an adoption milestone (onboarding step, usage threshold).

    Produced by scoring (topic ``accounts.signals``); consumed by playbooks
    (congratulations, next-step nudges) and console.
    """

    type: Literal["churnguard.signals.milestone_reached"] = "churnguard.signals.milestone_reached"
    data: MilestoneReachedData


class PaymentFailedSignalData(Payload):
    invoice_id: BillingId
    amount_due: Money
    currency: Currency
    decline_code: Annotated[str, StringConstraints(max_length=100)] | None = None
    decline_kind: DeclineKind
    attempt_count: int = Field(ge=1, description="Attempts on this invoice, this one included")
    failed_payments_60d: int = Field(ge=1, description="Failed attempts in the last 60 days")
    churn_probability: Probability | None = Field(
        default=None, description="The account's latest score when the payment failed"
    )


class PaymentFailedSignal(CloudEvent):
    """A payment of the account failed: the trigger of dunning.

    Produced by scoring (topic ``accounts.signals``) once per failed attempt (its ``id``
    derives from the billing event's), with the account's context; consumed by playbooks
    (dunning schedule by decline kind, CSM alert for valuable accounts).
    """

    type: Literal["churnguard.signals.payment_failed"] = "churnguard.signals.payment_failed"
    data: PaymentFailedSignalData


class DetractorNpsData(Payload):
    score: int = Field(ge=0, le=6, description="The NPS answer, 0-6 for a detractor")
    comment: Annotated[str, StringConstraints(max_length=5000)] | None = None
    user_id: Annotated[str, StringConstraints(max_length=256)] | None = None
    previous_score: int | None = Field(default=None, ge=0, le=10)


class DetractorNps(CloudEvent):
    """A user of the account answered NPS 0-6.

    Produced by scoring (topic ``accounts.signals``) per detractor answer; consumed by
    playbooks (CSM task plus apology email) and console.
    """

    type: Literal["churnguard.signals.detractor_nps"] = "churnguard.signals.detractor_nps"
    data: DetractorNpsData


class RenewalAtRiskData(Payload):
    days_to_renewal: int = Field(ge=0, le=366)
    window_days: Literal[30, 60, 90] = Field(
        description="The renewal window entered: the signal fires once per window and renewal"
    )
    churn_probability: Probability
    tier: RiskTier
    mrr: Money = Field(description="MRR at stake, in the currency's minor unit")


class RenewalAtRisk(CloudEvent):
    """The account's renewal is within 30, 60 or 90 days and its risk is high.

    Produced by scoring (topic ``accounts.signals``) when the account enters a window
    while at_risk or critical (or becomes so inside it); consumed by playbooks (executive
    alert) and console.
    """

    type: Literal["churnguard.signals.renewal_at_risk"] = "churnguard.signals.renewal_at_risk"
    data: RenewalAtRiskData


SignalEvent = Annotated[
    RiskTierCrossed
    | UsageDropped
    | ExpansionSignal
    | MilestoneReached
    | PaymentFailedSignal
    | DetractorNps
    | RenewalAtRisk,
    Field(discriminator="type"),
]

RevenueMovementKind = Literal["new", "expansion", "contraction", "churn", "reactivation"]


class RevenueMovementData(Payload):
    kind: RevenueMovementKind
    mrr_before: Money = Field(description="The account's MRR before the movement")
    mrr_after: Money = Field(description="The account's MRR after the movement")
    delta: int = Field(description="mrr_after - mrr_before; negative for contraction and churn")
    currency: Currency
    cancellation: Cancellation | None = Field(
        default=None, description="For churn only: voluntary or involuntary"
    )
    subscription_id: BillingId | None = Field(
        default=None, description="The subscription whose change caused the movement"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        before, after = self.mrr_before, self.mrr_after
        if self.delta != after - before:
            raise ValueError("delta must equal mrr_after - mrr_before")
        ok = {
            "new": before == 0 and after > 0,
            "reactivation": before == 0 and after > 0,
            "expansion": 0 < before < after,
            "contraction": 0 < after < before,
            "churn": before > 0 and after == 0,
        }[self.kind]
        if not ok:
            raise ValueError(
                f"mrr_before={before}, mrr_after={after} is not a {self.kind} movement"
            )
        if self.cancellation is not None and self.kind != "churn":
            raise ValueError("cancellation is only for churn movements")
        return self


class RevenueMovement(CloudEvent):
    """A change of the account's MRR, classified: new, expansion, contraction, churn, reactivation.

    Produced by scoring from billing events (topic ``revenue.movements``); the CloudEvent
    ``time`` is when the movement takes effect. Consumed by console, whose MRR ledger
    gives NRR, GRR and the voluntary/involuntary churn split.
    """

    type: Literal["churnguard.revenue.revenue_movement"] = "churnguard.revenue.revenue_movement"
    data: RevenueMovementData


RevenueMovementEvent = RevenueMovement
"""The one event type of ``revenue.movements``."""

NotificationChannel = Literal["slack", "email", "in_app", "csm_task", "webhook"]


class NotificationRequestedData(Payload):
    channel: NotificationChannel
    template: Name = Field(description="Template id, rendered by notify with variables")
    recipient: Annotated[str, StringConstraints(min_length=1, max_length=320)] = Field(
        description="Slack channel or user id, email address, product user id, CSM id or "
        "webhook name, depending on channel"
    )
    playbook: Name = Field(description="The playbook that decided it")
    decision_id: EventId = Field(description="The logged decision (why it fired)")
    priority: int = Field(description="Higher goes first when delivery is rate limited")
    variables: dict[str, Any] = Field(
        default_factory=dict, description="Values for the template (names, links, reasons)"
    )


class NotificationRequested(CloudEvent):
    """Playbooks decided to send one message on one channel to one recipient.

    Produced by playbooks (topic ``actions.notifications``) after cool-downs, the contact
    budget and holdouts let it through; consumed by notify, which renders ``template``
    and delivers it. The CloudEvent ``id`` is the idempotency key of the delivery: notify
    delivers each ``id`` at most once, however often the record is redelivered, and
    answers with :class:`ActionOutcome` events whose ``action_id`` is this ``id``.
    """

    type: Literal["churnguard.actions.notification_requested"] = (
        "churnguard.actions.notification_requested"
    )
    data: NotificationRequestedData


NotificationEvent = Annotated[NotificationRequested, Field(discriminator="type")]
"""The event types of ``actions.notifications`` (one so far)."""


class PaymentRetryRequestedData(Payload):
    invoice_id: BillingId
    attempt: int = Field(ge=1, description="Which retry this is: 1 for the first retry")
    amount: Money
    currency: Currency
    decline_code: Annotated[str, StringConstraints(min_length=1, max_length=64)] = Field(
        description="Decline code of the failure being retried (never a hard decline)"
    )
    scheduled_for: AwareDatetime = Field(description="When to attempt the charge")
    playbook: Name
    decision_id: EventId


class PaymentRetryRequested(CloudEvent):
    """Dunning decided to retry charging a failed invoice at ``scheduled_for``.

    Produced by playbooks (topic ``actions.payment-retries``) from the retry schedule,
    only for soft declines; consumed by notify's payment retry adapter, which charges
    at most once per CloudEvent ``id`` (the idempotency key: no second charge) and
    answers with an :class:`ActionOutcome` (``payment_succeeded`` / ``payment_failed``).
    """

    type: Literal["churnguard.actions.payment_retry_requested"] = (
        "churnguard.actions.payment_retry_requested"
    )
    data: PaymentRetryRequestedData


PaymentRetryEvent = PaymentRetryRequested
"""The one event type of ``actions.payment-retries``."""

ActionKind = Literal["notification", "payment_retry"]
OutcomeStatus = Literal[
    "delivered",
    "failed",
    "opened",
    "clicked",
    "read",
    "dismissed",
    "payment_succeeded",
    "payment_failed",
    "suppressed",
]

_STATUSES_BY_ACTION: dict[str, frozenset[str]] = {
    "notification": frozenset(
        {"delivered", "failed", "opened", "clicked", "read", "dismissed", "suppressed"}
    ),
    "payment_retry": frozenset({"payment_succeeded", "payment_failed", "failed", "suppressed"}),
}


class ActionOutcomeData(Payload):
    action_id: EventId = Field(
        description="The CloudEvent id of the NotificationRequested or PaymentRetryRequested"
    )
    action: ActionKind
    channel: NotificationChannel | None = Field(default=None, description="For notifications")
    status: OutcomeStatus = Field(
        description="notification: delivered, failed, opened, clicked, read, dismissed, "
        "suppressed; payment_retry: payment_succeeded, payment_failed, failed (could not "
        "attempt), suppressed (not attempted, e.g. the invoice was paid meanwhile)"
    )
    detail: Annotated[str, StringConstraints(max_length=2000)] | None = Field(
        default=None, description="Error message, provider response or suppression reason"
    )
    decline_code: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = Field(
        default=None, description="For payment_failed: the new decline code"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.status not in _STATUSES_BY_ACTION[self.action]:
            raise ValueError(f"status {self.status!r} is not an outcome of a {self.action}")
        if self.channel is not None and self.action != "notification":
            raise ValueError("channel is only for notification outcomes")
        if self.decline_code is not None and self.status != "payment_failed":
            raise ValueError("decline_code is only for payment_failed outcomes")
        return self


class ActionOutcome(CloudEvent):
    """What became of a requested action: delivered, opened, failed, payment succeeded…

    Produced by notify (topic ``actions.outcomes``), one event per state change of an
    action, each with its own ``id``; ``action_id`` ties it to the request. Consumed by
    scoring (engagement with messages, recovered payments feed the features), playbooks
    (dunning continues after ``payment_failed``) and console (delivery log).
    """

    type: Literal["churnguard.actions.action_outcome"] = "churnguard.actions.action_outcome"
    data: ActionOutcomeData


OutcomeEvent = ActionOutcome
"""The one event type of ``actions.outcomes``."""


DecisionStatus = Literal["fired", "suppressed", "failed"]
SuppressionReason = Literal[
    "holdout",
    "cooldown",
    "contact_budget",
    "quiet_hours",
    "dunning",
    "duplicate",
    "conditions",
    "other",
]


class DecisionLoggedData(Payload):
    decision_id: EventId = Field(
        description="Deterministic per trigger and playbook; commands carry it as decision_id"
    )
    playbook: Name
    trigger_type: Annotated[str, StringConstraints(min_length=1, max_length=200)] = Field(
        description="The signal type (e.g. churnguard.signals.risk_tier_crossed) or schedule"
    )
    trigger_id: EventId = Field(description="The id of the signal or timer that triggered it")
    status: DecisionStatus
    reason: SuppressionReason | None = Field(
        default=None, description="Why it was suppressed (or failed: other); None when fired"
    )
    detail: Annotated[str, StringConstraints(max_length=2000)] | None = Field(
        default=None, description="A sentence for people: which rule, which limit, which error"
    )
    holdout: bool = Field(
        default=False, description="The account is in the playbook's holdout group"
    )
    commands: list[EventId] = Field(
        default_factory=list,
        max_length=50,
        description="Ids of the commands published for it (actions.notifications, "
        "actions.payment-retries)",
    )
    priority: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.status == "fired" and self.reason is not None:
            raise ValueError("a fired decision has no suppression reason")
        if self.status == "suppressed" and self.reason is None:
            raise ValueError("a suppressed decision needs a reason")
        if self.status != "fired" and self.commands:
            raise ValueError("only a fired decision publishes commands")
        return self


class DecisionLogged(CloudEvent):
    """One evaluation of a playbook for an account that matched its trigger and conditions:
    fired (with the commands it published) or suppressed (holdout, cool-down, contact
    budget, quiet hours, dunning), with the reason.

    Produced by playbooks (topic ``playbooks.decisions``) from the same transaction that
    records the decision, so every logged row is published once (with a deterministic
    ``id``); consumed by console (playbooks page, uplift of treated vs holdout).
    """

    type: Literal["churnguard.playbooks.decision_logged"] = "churnguard.playbooks.decision_logged"
    data: DecisionLoggedData


DecisionEvent = DecisionLogged
"""The one event type of ``playbooks.decisions``."""
