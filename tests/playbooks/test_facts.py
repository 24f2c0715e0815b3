"""Facts: the profile as conditions see it; what signals carry wins; tenure ages."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

from churnguard.common.events.derived import (
    ReasonCode,
    RiskTierCrossed,
    RiskTierCrossedData,
    UsageDropped,
    UsageDroppedData,
)
from churnguard.playbooks.facts import AccountProfile, ArrTiers, LiftRanking, build_facts
from churnguard.playbooks.settings import DEFAULT_LIFT_PATH

TIERS = ArrTiers.parse("10000,50000,250000")
LIFT = LiftRanking(("integrations", "api", "scheduled_reports", "automations"))
T = datetime(2026, 3, 10, 12, tzinfo=UTC)


def profile(**values: object) -> AccountProfile:
    return AccountProfile(account_id="acct_1", **values)  # type: ignore[arg-type]


def test_arr_and_its_tier_from_mrr_in_minor_units() -> None:
    facts = build_facts(profile(mrr=500_00), T, arr_tiers=TIERS, lift=LIFT)
    assert facts["arr"] == 6000.0
    assert facts["arr_tier"] == "small"
    assert build_facts(profile(mrr=5000_00), T, arr_tiers=TIERS, lift=LIFT)["arr_tier"] == "large"
    assert (
        build_facts(profile(mrr=30_000_00), T, arr_tiers=TIERS, lift=LIFT)["arr_tier"]
        == "strategic"
    )
    # without a revenue movement yet, the score's mrr feature (currency units) stands in
    assert (
        build_facts(profile(features={"mrr": 1000.0}), T, arr_tiers=TIERS, lift=LIFT)["arr"]
        == 12000.0
    )
    assert build_facts(profile(), T, arr_tiers=TIERS, lift=LIFT)["arr_tier"] is None


def test_tenure_and_days_to_renewal_age_from_the_score() -> None:
    p = profile(
        features={"tenure_days": 85.0, "days_to_renewal": 40.0},
        scored_at=datetime(2026, 3, 5, tzinfo=UTC),
        renewal_date=date(2026, 4, 14),
    )
    facts = build_facts(p, T, arr_tiers=TIERS, lift=LIFT)
    assert facts["tenure_days"] == 90.0
    assert facts["lifecycle_stage"] == "adoption"
    assert facts["days_to_renewal"] == 35.0
    assert facts["features.tenure_days"] == 85.0  # the raw feature stays as scored
    young = build_facts(
        profile(features={"tenure_days": 30.0}, scored_at=T), T, arr_tiers=TIERS, lift=LIFT
    )
    assert young["lifecycle_stage"] == "onboarding"
    assert build_facts(profile(), T, arr_tiers=TIERS, lift=LIFT)["lifecycle_stage"] is None


def test_a_tier_crossing_overrides_a_stale_score() -> None:
    signal = RiskTierCrossed(
        id="s1",
        source="/scoring",
        time=T,
        subject="acct_1",
        data=RiskTierCrossedData(
            from_tier="watch",
            to_tier="critical",
            churn_probability=0.6,
            health=20,
            previous_health=50,
            reasons=[ReasonCode(code="usage_trend_down", description="down", impact=0.2)],
        ),
    )
    facts = build_facts(
        profile(tier="watch", health=50), T, signal=signal, arr_tiers=TIERS, lift=LIFT
    )
    assert facts["tier"] == "critical"
    assert facts["health"] == 20.0
    assert facts["reasons"] == ["usage_trend_down"]
    assert facts["signal.worsened"] is True
    assert facts["signal.from_tier"] == "watch"


def test_the_guide_feature_is_the_unadopted_one_with_the_highest_lift() -> None:
    signal = UsageDropped(
        id="s2",
        source="/scoring",
        time=T,
        subject="acct_1",
        data=UsageDroppedData(
            window_days=7,
            previous=100,
            current=20,
            drop_ratio=0.8,
            unadopted_sticky_features=["automations", "api"],
        ),
    )
    facts = build_facts(
        profile(unadopted_sticky=["scheduled_reports"]),
        T,
        signal=signal,
        arr_tiers=TIERS,
        lift=LIFT,
    )
    assert facts["guide_feature"] == "api"
    from_score = build_facts(
        profile(unadopted_sticky=["automations", "scheduled_reports"]),
        T,
        arr_tiers=TIERS,
        lift=LIFT,
    )
    assert from_score["guide_feature"] == "scheduled_reports"
    assert LIFT.best(["brand_new", "automations"]) == "automations"
    assert LIFT.best([]) is None


def test_the_shipped_lift_ranking_orders_the_sticky_features() -> None:
    ranking = LiftRanking.load(Path(DEFAULT_LIFT_PATH))
    sticky = ["integrations", "automations", "api", "scheduled_reports"]
    assert set(sticky) <= set(ranking.features)
    assert ranking.best(sticky) == min(sticky, key=ranking.features.index)
