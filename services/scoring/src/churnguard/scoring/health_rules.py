"""A transparent, points-based health score, the kind customer-success tools ship.

Every account starts at 100; each rule that holds takes its points off (a promoter's NPS
adds some back); the result is clamped to 0-100. The rules read the same
:class:`~churnguard.scoring.features.AccountFeatures` as the model, so it is the baseline
the model is judged against (``churnguard model train`` prints both on the same rows):
a model that cannot beat hand-set rules is not worth its opacity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from churnguard.scoring.features import FEATURE_NAMES, AccountFeatures

Columns = Callable[[str], np.ndarray]


@dataclass(frozen=True)
class HealthRule:
    code: str
    points: int
    """Taken off the health score when the rule holds (negative: added)."""
    description: str
    holds: Callable[[Columns], np.ndarray]


RULES: tuple[HealthRule, ...] = (
    HealthRule(
        "inactive_14d",
        25,
        "no activity for 14 days or more",
        lambda c: c("days_since_active") >= 14,
    ),
    HealthRule(
        "inactive_7d",
        15,
        "no activity for 7-13 days",
        lambda c: (c("days_since_active") >= 7) & (c("days_since_active") < 14),
    ),
    HealthRule(
        "usage_halved",
        15,
        "usage of the last 7 days at most half of the 7 before",
        lambda c: c("usage_trend_7d") <= math.log(0.5),
    ),
    HealthRule(
        "usage_down",
        7,
        "usage of the last 7 days 20-50% below the 7 before",
        lambda c: (c("usage_trend_7d") > math.log(0.5)) & (c("usage_trend_7d") <= math.log(0.8)),
    ),
    HealthRule(
        "low_seat_utilisation",
        10,
        "fewer than half the purchased seats assigned",
        lambda c: (c("seat_utilisation") >= 0) & (c("seat_utilisation") < 0.5),
    ),
    HealthRule(
        "no_sticky_feature",
        10,
        "none of the sticky features in use",
        lambda c: c("sticky_unadopted") >= 4,
    ),
    HealthRule(
        "many_tickets",
        10,
        "3 or more support tickets in 30 days",
        lambda c: c("tickets_30d") >= 3,
    ),
    HealthRule(
        "negative_tickets",
        10,
        "support tickets of negative tone in 30 days",
        lambda c: (c("tickets_30d") > 0) & (c("ticket_sentiment_30d") < -0.25),
    ),
    HealthRule(
        "unresolved_ticket",
        5,
        "a ticket closed without satisfying the customer in 30 days",
        lambda c: c("tickets_unresolved_30d") > 0,
    ),
    HealthRule(
        "failed_payment",
        15,
        "a failed payment in 60 days",
        lambda c: c("failed_payments_60d") > 0,
    ),
    HealthRule(
        "unpaid_invoice",
        15,
        "an invoice unpaid after a failed payment or its due date",
        lambda c: c("unpaid_invoices") > 0,
    ),
    HealthRule(
        "nps_detractor",
        15,
        "last NPS answer 0-6",
        lambda c: (c("has_nps") > 0) & (c("last_nps") <= 6),
    ),
    HealthRule(
        "nps_passive",
        5,
        "last NPS answer 7-8",
        lambda c: (c("has_nps") > 0) & (c("last_nps") >= 7) & (c("last_nps") <= 8),
    ),
    HealthRule(
        "nps_promoter",
        -5,
        "last NPS answer 9-10",
        lambda c: (c("has_nps") > 0) & (c("last_nps") >= 9),
    ),
    HealthRule(
        "low_csat",
        5,
        "last CSAT answer 1-2",
        lambda c: (c("has_csat") > 0) & (c("last_csat") <= 2),
    ),
    HealthRule(
        "mrr_down",
        10,
        "MRR down more than 10% in 90 days",
        lambda c: c("mrr_change_90d") < -0.1,
    ),
)

_INDEX: Mapping[str, int] = {name: i for i, name in enumerate(FEATURE_NAMES)}


def rule_matrix(matrix: np.ndarray) -> np.ndarray:
    """``(rows, len(RULES))`` booleans: which rule holds for which row."""
    matrix = np.asarray(matrix, dtype=np.float64).reshape(-1, len(FEATURE_NAMES))

    def column(name: str) -> np.ndarray:
        return matrix[:, _INDEX[name]]

    holds: np.ndarray = np.column_stack([rule.holds(column) for rule in RULES])
    return holds.reshape(-1, len(RULES))


def health_scores(matrix: np.ndarray) -> np.ndarray:
    """Health 0-100 (int) per row of a feature matrix."""
    points = np.array([rule.points for rule in RULES])
    deducted: np.ndarray = rule_matrix(matrix).astype(np.int64) @ points
    scores: np.ndarray = np.clip(100 - deducted, 0, 100).astype(np.int64)
    return scores


def health(features: AccountFeatures) -> int:
    return int(health_scores(np.asarray([features.values]))[0])


def explain(features: AccountFeatures) -> list[tuple[str, int]]:
    """The rules that hold for one account and their points, largest first."""
    holds = rule_matrix(np.asarray([features.values]))[0]
    hits = [(rule.code, rule.points) for rule, hit in zip(RULES, holds, strict=True) if hit]
    return sorted(hits, key=lambda r: -r[1])


BANDS = 11
"""Health bands for turning the score into a probability: 0-9, 10-19, ..., 90-99, 100."""


def band_rates(scores: np.ndarray, labels: np.ndarray, prior_weight: float = 20.0) -> list[float]:
    """Observed churn rate per health band, shrunk towards the overall rate.

    A health score is not a probability; to compare its Brier score with a model's it is
    given the churn rate its band had on the training rows (what a CS team would read off
    a report), with ``prior_weight`` pseudo-rows at the overall rate for sparse bands (an
    empty band gets the overall rate).
    """
    band = np.minimum(np.asarray(scores) // 10, BANDS - 1).astype(np.int64)
    y = np.asarray(labels, dtype=np.float64)
    base = float(y.mean()) if len(y) else 0.0
    count = np.bincount(band, minlength=BANDS)
    churned = np.bincount(band, weights=y, minlength=BANDS)
    weight = count + prior_weight
    rates = np.divide(
        churned + prior_weight * base, weight, out=np.full(BANDS, base), where=weight > 0
    )
    return [float(r) for r in rates]


def probabilities(scores: np.ndarray, rates: list[float]) -> np.ndarray:
    band = np.minimum(np.asarray(scores) // 10, BANDS - 1).astype(np.int64)
    probability: np.ndarray = np.asarray(rates, dtype=np.float64)[band]
    return probability
