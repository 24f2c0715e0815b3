"""How well a churn score ranks and predicts: the figures every model artifact carries.

numpy only, so the scoring service and ``churnguard model evaluate`` need no scikit-learn.
Ties are treated fairly everywhere (a score with many equal values, like a points-based
health score, is neither helped nor hurt by how a sort breaks them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def roc_auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve: P(a random churner scores above a random stayer), ties ½."""
    score = np.asarray(score, dtype=np.float64)
    label = np.asarray(label) > 0
    positives = int(label.sum())
    negatives = len(label) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    # average rank of each distinct value (1-based)
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2
    ranks = average_rank[inverse]
    u = ranks[label].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def average_precision(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the precision-recall curve as a step sum over distinct thresholds
    (scikit-learn's ``average_precision_score``)."""
    score = np.asarray(score, dtype=np.float64)
    label = np.asarray(label) > 0
    positives = int(label.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-score, kind="mergesort")
    s, y = score[order], label[order]
    last_of_value = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(y)[last_of_value]
    seen = np.flatnonzero(last_of_value) + 1
    precision = tp / seen
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def brier(probability: np.ndarray, label: np.ndarray) -> float:
    """Mean squared error of the probabilities (lower is better)."""
    p = np.asarray(probability, dtype=np.float64)
    return float(np.mean((p - (np.asarray(label) > 0)) ** 2))


def top_decile_lift(score: np.ndarray, label: np.ndarray, share: float = 0.1) -> float:
    """Churn rate among the highest-scored ``share`` of rows over the overall churn rate.

    The group of equal scores that straddles the cut counts in proportion to the part of
    it that fits, i.e. with its own average churn rate.
    """
    score = np.asarray(score, dtype=np.float64)
    y = (np.asarray(label) > 0).astype(np.float64)
    base = y.mean() if len(y) else 0.0
    if base == 0:
        return float("nan")
    k = share * len(y)
    values, inverse = np.unique(-score, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(values)).astype(np.float64)
    churners = np.bincount(inverse, weights=y, minlength=len(values))
    before = np.r_[0.0, np.cumsum(counts)[:-1]]
    taken = np.clip(k - before, 0, counts)
    hit = float(np.sum(churners * taken / counts))
    return float(hit / k / base)


@dataclass(frozen=True)
class Figures:
    roc_auc: float
    pr_auc: float
    brier: float
    top_decile_lift: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


def figures(probability: np.ndarray, label: np.ndarray) -> Figures:
    return Figures(
        roc_auc=roc_auc(probability, label),
        pr_auc=average_precision(probability, label),
        brier=brier(probability, label),
        top_decile_lift=top_decile_lift(probability, label),
    )
