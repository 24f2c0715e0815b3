"""The figures in every artifact: checked against scikit-learn and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from churnguard.scoring.evaluation import (
    average_precision,
    brier,
    figures,
    roc_auc,
    top_decile_lift,
)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("distinct", [5, 1000])
def test_agrees_with_scikit_learn_with_and_without_ties(seed: int, distinct: int) -> None:
    rng = np.random.default_rng(seed)
    label = (rng.random(3000) < 0.08).astype(float)
    score = np.round(rng.random(3000) * (distinct - 1) + 2 * label * rng.random(3000)) / distinct
    assert roc_auc(score, label) == pytest.approx(roc_auc_score(label, score), abs=1e-12)
    assert average_precision(score, label) == pytest.approx(
        average_precision_score(label, score), abs=1e-12
    )
    p = np.clip(score / score.max(), 0, 1)
    assert brier(p, label) == pytest.approx(brier_score_loss(label, p), abs=1e-12)


def test_top_decile_lift_by_hand() -> None:
    label = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0] * 10, dtype=float)  # 20% churn
    perfect = label + np.arange(100) * 1e-6
    assert top_decile_lift(perfect, label) == pytest.approx(5.0)  # the top 10 are all churners
    assert top_decile_lift(-perfect, label) == pytest.approx(0.0)
    # all scores equal: the top decile is the average row, whatever the sort does
    assert top_decile_lift(np.zeros(100), label) == pytest.approx(1.0)
    # a tied block straddling the cut counts at its own churn rate
    score = np.r_[np.full(5, 2.0), np.full(20, 1.0), np.zeros(75)]
    y = np.r_[np.ones(5), np.ones(4), np.zeros(16), np.zeros(75)]
    # top 10 = 5 churners + 5/20 of a block holding 4 churners
    assert top_decile_lift(score, y) == pytest.approx((5 + 1) / 10 / 0.09)


def test_figures_of_a_useless_and_a_perfect_score() -> None:
    label = np.array([0, 1] * 500, dtype=float)
    useless = figures(np.full(1000, 0.5), label)
    assert (useless.roc_auc, useless.brier, useless.top_decile_lift) == (0.5, 0.25, 1.0)
    perfect = figures(label, label)
    assert (perfect.roc_auc, perfect.pr_auc, perfect.brier) == (1.0, 1.0, 0.0)
