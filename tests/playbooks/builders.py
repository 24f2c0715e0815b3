"""Events as scoring, ingest and notify would send them to playbooks (for the tests)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from churnguard.common.events.billing import (
    InvoicePaid,
    InvoicePaidData,
    SubscriptionCreated,
    SubscriptionCreatedData,
)
from churnguard.common.events.derived import (
    AccountScored,
    AccountScoredData,
    ActionOutcome,
    ActionOutcomeData,
    DetractorNps,
    DetractorNpsData,
    ExpansionSignal,
    ExpansionSignalData,
    MilestoneReached,
    MilestoneReachedData,
    PaymentFailedSignal,
    PaymentFailedSignalData,
    ReasonCode,
    RenewalAtRisk,
    RenewalAtRiskData,
    RevenueMovement,
    RevenueMovementData,
    RiskTierCrossed,
    RiskTierCrossedData,
    UsageDropped,
    UsageDroppedData,
)
from churnguard.common.events.usage import Group, GroupData, Identify, IdentifyData

SCORING = "/scoring"
REASONS = [
    ReasonCode(code="usage_trend_down", description="Active users fell 46% in 7 days", impact=0.2),
    ReasonCode(code="tickets_unresolved", description="2 tickets closed unresolved", impact=0.1),
]


def group(account: str, at: datetime, user: str = "u_admin", **traits: Any) -> Group:
    return Group(
        id=f"grp-{account}-{user}-{at.timestamp()}",
        source="/tests",
        time=at,
        subject=account,
        data=GroupData(user_id=user, traits=traits),
    )


def identify(
    account: str, at: datetime, user: str, email: str | None, role: str = "admin", **traits: Any
) -> Identify:
    values: dict[str, Any] = {"role": role, **traits}
    if email:
        values["email"] = email
    return Identify(
        id=f"idf-{account}-{user}-{at.timestamp()}",
        source="/tests",
        time=at,
        subject=account,
        data=IdentifyData(user_id=user, traits=values),
    )


def revenue(account: str, at: datetime, mrr: int, before: int = 0) -> RevenueMovement:
    kind = "new" if before == 0 else ("expansion" if mrr > before else "contraction")
    return RevenueMovement(
        id=f"rev-{account}-{at.timestamp()}",
        source=SCORING,
        time=at,
        subject=account,
        data=RevenueMovementData(
            kind=kind, mrr_before=before, mrr_after=mrr, delta=mrr - before, currency="usd"
        ),
    )


def subscription(account: str, at: datetime, mrr: int = 1000_00) -> SubscriptionCreated:
    return SubscriptionCreated(
        id=f"sub-{account}-{at.timestamp()}",
        source="/ingest/stripe",
        time=at,
        subject=account,
        data=SubscriptionCreatedData(
            subscription_id=f"sub_{account}",
            plan="growth",
            interval="month",
            quantity=10,
            mrr=mrr,
            currency="usd",
            status="active",
        ),
    )


def score(
    account: str,
    at: datetime,
    *,
    tier: str = "healthy",
    probability: float = 0.05,
    health: int = 80,
    features: dict[str, float] | None = None,
    unadopted: list[str] | None = None,
    n: int = 0,
) -> AccountScored:
    return AccountScored(
        id=f"score-{account}-{n}-{at.timestamp()}",
        source=SCORING,
        time=at,
        subject=account,
        data=AccountScoredData(
            churn_probability=probability,
            health=health,
            tier=tier,  # type: ignore[arg-type]
            reasons=REASONS if tier in ("at_risk", "critical") else [],
            model_version="test",
            features=features,
            unadopted_sticky_features=unadopted,
        ),
    )


def tier_crossed(
    account: str, at: datetime, to: str = "at_risk", frm: str = "watch", n: int = 0
) -> RiskTierCrossed:
    probability = {"healthy": 0.03, "watch": 0.1, "at_risk": 0.3, "critical": 0.6}[to]
    return RiskTierCrossed(
        id=f"sig-{account}-tier-{n}",
        source=SCORING,
        time=at,
        subject=account,
        data=RiskTierCrossedData(
            from_tier=frm,
            to_tier=to,
            churn_probability=probability,  # type: ignore[arg-type]
            health=int(100 - probability * 100),
            previous_health=70,
            reasons=REASONS,
        ),
    )


def usage_dropped(
    account: str, at: datetime, unadopted: list[str] | None = None, n: int = 0
) -> UsageDropped:
    return UsageDropped(
        id=f"sig-{account}-usage-{n}",
        source=SCORING,
        time=at,
        subject=account,
        data=UsageDroppedData(
            window_days=7,
            previous=400,
            current=100,
            drop_ratio=0.75,
            unadopted_sticky_features=unadopted,
        ),
    )


def expansion(account: str, at: datetime, n: int = 0) -> ExpansionSignal:
    return ExpansionSignal(
        id=f"sig-{account}-expansion-{n}",
        source=SCORING,
        time=at,
        subject=account,
        data=ExpansionSignalData(reason="seats_near_limit", seats_utilisation=0.95),
    )


def milestone(
    account: str, at: datetime, name: str = "feature_uses.reports", value: int = 1000, n: int = 0
) -> MilestoneReached:
    return MilestoneReached(
        id=f"sig-{account}-milestone-{name}-{value}-{n}",
        source=SCORING,
        time=at,
        subject=account,
        data=MilestoneReachedData(milestone=name, value=value),
    )


def detractor(
    account: str, at: datetime, user: str = "u_member", score_: int = 3, n: int = 0
) -> DetractorNps:
    return DetractorNps(
        id=f"sig-{account}-nps-{n}",
        source=SCORING,
        time=at,
        subject=account,
        data=DetractorNpsData(score=score_, comment="Reports keep timing out", user_id=user),
    )


def renewal(
    account: str,
    at: datetime,
    days: int = 55,
    window: int = 60,
    tier: str = "at_risk",
    mrr: int = 5000_00,
) -> RenewalAtRisk:
    return RenewalAtRisk(
        id=f"sig-{account}-renewal-{window}",
        source=SCORING,
        time=at,
        subject=account,
        data=RenewalAtRiskData(
            days_to_renewal=days,
            window_days=window,
            churn_probability=0.4,  # type: ignore[arg-type]
            tier=tier,
            mrr=mrr,
        ),  # type: ignore[arg-type]
    )


def payment_failed(
    account: str,
    at: datetime,
    invoice: str = "in_1",
    code: str = "insufficient_funds",
    kind: str = "soft",
    attempt: int = 1,
    n: int = 0,
) -> PaymentFailedSignal:
    return PaymentFailedSignal(
        id=f"sig-{account}-pay-{invoice}-{n}",
        source=SCORING,
        time=at,
        subject=account,
        data=PaymentFailedSignalData(
            invoice_id=invoice,
            amount_due=4900,
            currency="usd",
            decline_code=code,
            decline_kind=kind,  # type: ignore[arg-type]
            attempt_count=attempt,
            failed_payments_60d=attempt,
        ),
    )


def invoice_paid(account: str, at: datetime, invoice: str = "in_1") -> InvoicePaid:
    return InvoicePaid(
        id=f"paid-{account}-{invoice}",
        source="/ingest/stripe",
        time=at,
        subject=account,
        data=InvoicePaidData(invoice_id=invoice, amount_paid=4900, currency="usd", attempt_count=2),
    )


def outcome(
    account: str,
    at: datetime,
    action_id: str,
    status: str,
    decline_code: str | None = None,
    channel: str | None = None,
) -> ActionOutcome:
    action = (
        "payment_retry"
        if status.startswith("payment_") or ".retry." in action_id
        else "notification"
    )
    return ActionOutcome(
        id=f"out-{action_id}-{status}",
        source="/notify",
        time=at,
        subject=account,
        data=ActionOutcomeData(
            action_id=action_id,
            action=action,
            status=status,  # type: ignore[arg-type]
            decline_code=decline_code,
            channel=channel,
        ),  # type: ignore[arg-type]
    )
