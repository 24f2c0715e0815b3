"""The rules baseline: points as documented, from the same features as the model."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import numpy as np
import pytest

from churnguard.scoring import health_rules
from churnguard.scoring.features import FEATURE_NAMES, AccountFeatures, AccountState

D = date(2025, 6, 2)


def features(**values: float) -> AccountFeatures:
    """A healthy-looking account, with ``values`` changed."""
    base = dict.fromkeys(FEATURE_NAMES, 0.0) | {
        "activity_30d": 200.0,
        "activity_7d": 50.0,
        "usage_trend_7d": 0.0,
        "seat_utilisation": -1.0,
        "last_nps": -1.0,
        "last_csat": -1.0,
        "sticky_unadopted": 1.0,
    }
    unknown = set(values) - set(FEATURE_NAMES)
    assert not unknown
    return AccountFeatures(D.toordinal(), tuple((base | values)[n] for n in FEATURE_NAMES))


def test_a_healthy_account_scores_100_and_a_promoter_cannot_exceed_it() -> None:
    assert health_rules.health(features()) == 100
    assert health_rules.health(features(has_nps=1, last_nps=10)) == 100
    assert health_rules.explain(features(has_nps=1, last_nps=10)) == [("nps_promoter", -5)]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"days_since_active": 20}, 75),
        ({"days_since_active": 8}, 85),
        ({"usage_trend_7d": -1.0}, 85),
        ({"usage_trend_7d": -0.3}, 93),
        ({"seat_utilisation": 0.3}, 90),
        ({"seat_utilisation": 0.9}, 100),
        ({"failed_payments_60d": 1, "unpaid_invoices": 1}, 70),
        ({"has_nps": 1, "last_nps": 3}, 85),
        ({"tickets_30d": 4, "ticket_sentiment_30d": -0.6, "tickets_unresolved_30d": 1}, 75),
        ({"tickets_30d": 1, "ticket_sentiment_30d": 0.6}, 100),
        ({"mrr_change_90d": -0.5}, 90),
        ({"sticky_unadopted": 4}, 90),
    ],
)
def test_each_rule_takes_its_points(values: dict[str, float], expected: int) -> None:
    assert health_rules.health(features(**values)) == expected


def test_points_add_up_and_clamp_at_zero() -> None:
    worst = features(
        days_since_active=30,
        usage_trend_7d=-2,
        seat_utilisation=0.1,
        sticky_unadopted=4,
        tickets_30d=5,
        ticket_sentiment_30d=-0.9,
        tickets_unresolved_30d=2,
        failed_payments_60d=2,
        unpaid_invoices=1,
        has_nps=1,
        last_nps=0,
        has_csat=1,
        last_csat=1,
        mrr_change_90d=-0.5,
    )
    assert sum(p for _, p in health_rules.explain(worst)) > 100
    assert health_rules.health(worst) == 0


def test_from_account_state_silent_with_a_failed_payment() -> None:
    state = AccountState()
    for d in range(60, 20, -1):
        state.apply(
            _event("usage.feature_used", D - timedelta(days=d), {"user_id": "u", "feature": "api"})
        )
    state.apply(
        _event(
            "billing.invoice_payment_failed",
            D,
            {
                "invoice_id": "in_1",
                "amount_due": 100,
                "currency": "usd",
                "attempt_count": 1,
                "decline_code": "insufficient_funds",
                "decline_kind": "soft",
            },
        )
    )
    codes = dict(health_rules.explain(state.features(D)))
    assert codes == {"inactive_14d": 25, "failed_payment": 15}


def test_band_rates_are_observed_rates_shrunk_to_the_mean() -> None:
    scores = np.array([5] * 100 + [95] * 900)
    labels = np.r_[np.ones(50), np.zeros(50), np.ones(45), np.zeros(855)]
    rates = health_rules.band_rates(scores, labels, prior_weight=0)
    assert rates[0] == pytest.approx(0.5)
    assert rates[9] == pytest.approx(0.05)
    assert health_rules.probabilities(np.array([0, 99, 100]), rates).tolist() == [
        pytest.approx(0.5),
        pytest.approx(0.05),
        pytest.approx(0.095),  # no row scored 100: the overall rate
    ]
    shrunk = health_rules.band_rates(scores, labels, prior_weight=20)
    assert rates[9] < shrunk[9] < shrunk[0] < rates[0]


def _event(kind: str, day: date, data: dict[str, Any]) -> dict[str, Any]:
    return {"type": f"churnguard.{kind}", "time": f"{day}T12:00:00Z", "data": data}
