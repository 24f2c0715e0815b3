"""What playbooks know about an account at one moment: the facts conditions read (pure).

The account's profile is assembled from several topics (traits from ``events.usage``,
status from ``events.billing``, MRR from ``revenue.movements``, score and features from
``accounts.scores``), which are consumed independently, so a signal may be decided
before the score that came with it is applied. Signals therefore carry what they know
(a tier crossing its new tier, health and reasons; a renewal its tier and MRR), and
those values override the stored profile for that decision. Tenure and days to renewal
are aged from the score's day to the decision's, so a score from yesterday still gives
today's lifecycle stage.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from churnguard.common.events.base import CloudEvent
from churnguard.common.events.derived import (
    PaymentFailedSignal,
    RenewalAtRisk,
    RiskTierCrossed,
    UsageDropped,
)
from churnguard.playbooks.catalogue import (
    ARR_TIERS,
    MATURE_DAYS,
    ONBOARDING_DAYS,
    SIGNAL_PREFIX,
)


@dataclass(frozen=True)
class ArrTiers:
    """ARR bands: below the first bound ``small``, then medium, large, strategic."""

    bounds: tuple[float, float, float]

    @classmethod
    def parse(cls, text: str) -> ArrTiers:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"ARR tier bounds {text!r}: three comma-separated numbers") from None
        if len(values) != 3 or not values[0] < values[1] < values[2] or values[0] <= 0:
            raise ValueError(
                f"ARR tier bounds {text!r}: three increasing positive numbers "
                "(lower bounds of medium, large, strategic)"
            )
        return cls((values[0], values[1], values[2]))

    def tier(self, arr: float) -> str:
        index = sum(arr >= b for b in self.bounds)
        return ARR_TIERS[index]


@dataclass
class AccountProfile:
    """One account as playbooks store it (a row of ``accounts`` plus its contacts)."""

    account_id: str
    name: str | None = None
    plan: str | None = None
    segment: str | None = None
    owner: str | None = None
    csm: str | None = None
    timezone: str | None = None
    mrr: int | None = None
    currency: str | None = None
    subscription_status: str | None = None
    subscription_started_at: datetime | None = None
    churn_probability: float | None = None
    health: int | None = None
    tier: str | None = None
    reasons: list[dict[str, Any]] = field(default_factory=list)
    features: dict[str, float] = field(default_factory=dict)
    unadopted_sticky: list[str] | None = None
    scored_at: datetime | None = None
    renewal_date: date | None = None
    in_dunning: bool = False

    @classmethod
    def from_row(cls, row: Mapping[str, Any], in_dunning: bool = False) -> AccountProfile:
        names = cls.__dataclass_fields__
        values = {k: row[k] for k in names if k in row and k != "in_dunning"}
        values["reasons"] = values.get("reasons") or []
        values["features"] = values.get("features") or {}
        return cls(**values, in_dunning=in_dunning)


@dataclass(frozen=True)
class LiftRanking:
    """Sticky features ordered by retention lift, best first (``churnguard playbooks lift``)."""

    features: tuple[str, ...]

    @classmethod
    def load(cls, path: Path) -> LiftRanking:
        raw = json.loads(path.read_text())
        ranked = sorted(raw["features"], key=lambda f: -float(f["lift"]))
        return cls(tuple(str(f["feature"]) for f in ranked))

    def ordered(self, features: Sequence[str]) -> list[str]:
        """``features`` by lift, best first; unranked ones after, in their order."""
        rank = {name: i for i, name in enumerate(self.features)}
        return sorted(features, key=lambda f: (rank.get(f, len(rank)), features.index(f)))

    def best(self, unadopted: Sequence[str]) -> str | None:
        """The unadopted feature with the highest lift; unranked ones after, in their order."""
        if not unadopted:
            return None
        rank = {name: i for i, name in enumerate(self.features)}
        return min(unadopted, key=lambda f: (rank.get(f, len(rank)), unadopted.index(f)))


def signal_name(event: CloudEvent) -> str:
    return event.type.removeprefix(SIGNAL_PREFIX)


def signal_facts(event: CloudEvent) -> dict[str, Any]:
    """``signal.<field>`` facts of a signal: its data, reasons as codes, derived fields."""
    data = event.data.model_dump()
    out = {f"signal.{k}": v for k, v in data.items() if k != "reasons"}
    if "reasons" in data:
        out["signal.reasons"] = [r["code"] for r in data["reasons"]]
    if isinstance(event, RiskTierCrossed):
        out["signal.worsened"] = event.data.worsened
    if isinstance(event, RenewalAtRisk):
        renewal = event.time.date().toordinal() + event.data.days_to_renewal
        out["signal.renewal_date"] = date.fromordinal(renewal).isoformat()
    return out


def build_facts(
    profile: AccountProfile,
    at: datetime,
    *,
    signal: CloudEvent | None = None,
    arr_tiers: ArrTiers,
    lift: LiftRanking,
) -> dict[str, Any]:
    """Every field a condition may name, for ``profile`` as of ``at`` (None: unknown)."""
    tier, health, probability = profile.tier, profile.health, profile.churn_probability
    reasons = [r.get("code") for r in profile.reasons]
    mrr = profile.mrr
    if mrr is None and profile.features.get("mrr", -1) >= 0:
        mrr = round(profile.features["mrr"] * 100)  # scoring's feature is in currency units
    unadopted = profile.unadopted_sticky
    if isinstance(signal, RiskTierCrossed):
        tier, health = signal.data.to_tier, signal.data.health
        probability = signal.data.churn_probability
        if signal.data.reasons:
            reasons = [r.code for r in signal.data.reasons]
    elif isinstance(signal, RenewalAtRisk):
        tier, probability, mrr = signal.data.tier, signal.data.churn_probability, signal.data.mrr
    elif isinstance(signal, PaymentFailedSignal) and signal.data.churn_probability is not None:
        probability = signal.data.churn_probability
    elif isinstance(signal, UsageDropped) and signal.data.unadopted_sticky_features is not None:
        unadopted = list(signal.data.unadopted_sticky_features)

    elapsed = (at.date() - profile.scored_at.date()).days if profile.scored_at else 0
    tenure: float | None = None
    if "tenure_days" in profile.features and profile.features["tenure_days"] >= 0:
        tenure = profile.features["tenure_days"] + max(elapsed, 0)
    elif profile.subscription_started_at is not None:
        tenure = float((at - profile.subscription_started_at).days)
    days_to_renewal: float | None = None
    if isinstance(signal, RenewalAtRisk):
        days_to_renewal = float(signal.data.days_to_renewal)
    elif profile.renewal_date is not None:
        days_to_renewal = float((profile.renewal_date - at.date()).days)

    arr = None if mrr is None else mrr * 12 / 100
    facts: dict[str, Any] = {
        "account_id": profile.account_id,
        "account_name": profile.name,
        "plan": profile.plan,
        "segment": profile.segment,
        "owner": profile.owner,
        "csm": profile.csm,
        "timezone": profile.timezone,
        "mrr": None if mrr is None else mrr / 100,
        "arr": arr,
        "arr_tier": None if arr is None else arr_tiers.tier(arr),
        "currency": profile.currency,
        "subscription_status": profile.subscription_status,
        "health": None if health is None else float(health),
        "tier": tier,
        "churn_probability": probability,
        "reasons": reasons,
        "tenure_days": tenure,
        "lifecycle_stage": lifecycle_stage(tenure),
        "days_to_renewal": days_to_renewal,
        "in_dunning": profile.in_dunning,
        "unadopted_sticky_features": unadopted,
        "guide_feature": lift.best(unadopted) if unadopted else None,
    }
    for name, value in profile.features.items():
        facts[f"features.{name}"] = value
    if signal is not None:
        facts.update(signal_facts(signal))
    return facts


def lifecycle_stage(tenure_days: float | None) -> str | None:
    if tenure_days is None:
        return None
    if tenure_days < ONBOARDING_DAYS:
        return "onboarding"
    return "adoption" if tenure_days < MATURE_DAYS else "mature"
