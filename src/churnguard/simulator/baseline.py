"""A deliberately simple churn baseline, to show the simulated signal is real but not trivial.

Features are computed from a world's ``events.jsonl`` as of a cutoff day, from what the
platform itself can see (events, never the hidden state); the label is whether the account
decided to cancel (voluntarily or not) within ``horizon`` days after the cutoff. A
logistic regression on the 30-day activity trend is trained on one world and evaluated on
another (a different seed). Beside it, the AUC of every raw count on its own: if one count
alone separated churners perfectly, the simulator would be too easy to learn from.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from churnguard.simulator.output import EVENTS, SUMMARY, read_ground_truth

RAW_FEATURES = (
    "activity_7d",
    "activity_30d",
    "active_users_30d",
    "days_since_active",
    "tickets_30d",
    "failed_payments_60d",
    "last_nps",
)
TREND_FEATURES = ("trend_30d", "log_activity_30d")


@dataclass
class Dataset:
    accounts: list[str]
    features: dict[str, np.ndarray]
    label: np.ndarray

    def matrix(self, names: tuple[str, ...]) -> np.ndarray:
        return np.column_stack([self.features[n] for n in names])


def build_dataset(folder: Path, horizon_days: int = 60) -> Dataset:
    """Features at cutoff = end of the world minus the horizon; labels from the ground truth."""
    summary = orjson.loads((folder / SUMMARY).read_bytes())
    start = date.fromisoformat(summary["config"]["start"])
    cutoff = start + timedelta(days=summary["config"]["days"] - horizon_days)
    truth = read_ground_truth(folder)
    population = [row for row in truth if _active_at(row, cutoff)]
    ids = [row["account_id"] for row in population]
    label = np.array(
        [_cancels_within(row, cutoff, horizon_days) for row in population], dtype=float
    )
    raw = _scan(folder / EVENTS, cutoff, set(ids))
    features: dict[str, np.ndarray] = {}
    for name in RAW_FEATURES:
        features[name] = np.array([raw[a].get(name, 0.0) for a in ids], dtype=float)
    last15 = np.array([raw[a].get("activity_15d", 0.0) for a in ids])
    prev15 = features["activity_30d"] - last15
    features["trend_30d"] = np.log1p(last15) - np.log1p(prev15)
    features["log_activity_30d"] = np.log1p(features["activity_30d"])
    return Dataset(ids, features, label)


def _active_at(row: dict[str, Any], cutoff: date) -> bool:
    if date.fromisoformat(row["signup_date"]) > cutoff - timedelta(days=60):
        return False  # too new to have 60 days of history
    cancel = row["cancel_date"]
    return cancel is None or date.fromisoformat(cancel) >= cutoff


def _cancels_within(row: dict[str, Any], cutoff: date, horizon: int) -> bool:
    cancel = row["cancel_date"]
    return cancel is not None and date.fromisoformat(cancel) < cutoff + timedelta(days=horizon)


def _scan(path: Path, cutoff: date, accounts: set[str]) -> dict[str, dict[str, float]]:
    """One pass over the time-ordered events up to the cutoff."""
    until = cutoff.isoformat()
    d7 = (cutoff - timedelta(days=7)).isoformat()
    d15 = (cutoff - timedelta(days=15)).isoformat()
    d30 = (cutoff - timedelta(days=30)).isoformat()
    d60 = (cutoff - timedelta(days=60)).isoformat()
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"last_nps": 7.0})
    users: dict[str, set[str]] = defaultdict(set)
    last_active: dict[str, str] = {}
    with path.open("rb") as f:
        for line in f:
            event = orjson.loads(line)
            day = event["time"][:10]
            if day >= until:
                break
            account = event["subject"]
            if account not in accounts or day < d60:
                continue
            kind = event["type"]
            row = out[account]
            if kind == "churnguard.usage.feature_used":
                last_active[account] = day
                if day >= d30:
                    row["activity_30d"] = row.get("activity_30d", 0.0) + 1
                    users[account].add(event["data"]["user_id"])
                    if day >= d15:
                        row["activity_15d"] = row.get("activity_15d", 0.0) + 1
                    if day >= d7:
                        row["activity_7d"] = row.get("activity_7d", 0.0) + 1
            elif kind == "churnguard.feedback.ticket_opened" and day >= d30:
                row["tickets_30d"] = row.get("tickets_30d", 0.0) + 1
            elif kind == "churnguard.billing.invoice_payment_failed":
                row["failed_payments_60d"] = row.get("failed_payments_60d", 0.0) + 1
            elif kind == "churnguard.feedback.nps_submitted":
                row["last_nps"] = float(event["data"]["score"])
    for account in accounts:
        row = out[account]
        row["active_users_30d"] = float(len(users.get(account, ())))
        seen = last_active.get(account)
        row["days_since_active"] = (cutoff - date.fromisoformat(seen)).days if seen else 60.0
    return out


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    i = 0
    while i < len(score):
        j = i
        while j + 1 < len(score) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    positives = label.sum()
    negatives = len(label) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    return float(
        (ranks[label == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives)
    )


@dataclass
class LogisticRegression:
    """L2-regularised logistic regression fitted by Newton's method on standardised inputs."""

    l2: float = 1e-3
    coef: np.ndarray | None = None
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None

    def fit(self, x: np.ndarray, y: np.ndarray, iterations: int = 50) -> LogisticRegression:
        self.mean, self.scale = x.mean(axis=0), x.std(axis=0) + 1e-9
        z = np.column_stack([np.ones(len(x)), (x - self.mean) / self.scale])
        w = np.zeros(z.shape[1])
        for _ in range(iterations):
            p = 1 / (1 + np.exp(-z @ w))
            gradient = z.T @ (p - y) + self.l2 * w
            hessian = (z * (p * (1 - p))[:, None]).T @ z + self.l2 * np.eye(len(w))
            step = np.linalg.solve(hessian, gradient)
            w -= step
            if np.abs(step).max() < 1e-8:
                break
        self.coef = w
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.coef is None or self.mean is None or self.scale is None:
            raise RuntimeError("fit() first")
        z = np.column_stack([np.ones(len(x)), (x - self.mean) / self.scale])
        return np.asarray(1 / (1 + np.exp(-z @ self.coef)))


@dataclass
class BaselineReport:
    train_accounts: int
    test_accounts: int
    train_churn_rate: float
    test_churn_rate: float
    trend_auc: float
    """Logistic regression on the 30-day activity trend (and its level), train → test."""
    all_features_auc: float
    single_feature_auc: dict[str, float]
    """Each raw count alone on the test world, in its better direction."""

    @property
    def best_single(self) -> tuple[str, float]:
        name = max(self.single_feature_auc, key=lambda k: self.single_feature_auc[k])
        return name, self.single_feature_auc[name]


def evaluate(train_folder: Path, test_folder: Path, horizon_days: int = 60) -> BaselineReport:
    train = build_dataset(train_folder, horizon_days)
    test = build_dataset(test_folder, horizon_days)
    trend = LogisticRegression().fit(train.matrix(TREND_FEATURES), train.label)
    every = RAW_FEATURES + TREND_FEATURES
    full = LogisticRegression().fit(train.matrix(every), train.label)
    single = {}
    for name in RAW_FEATURES:
        a = auc(test.features[name], test.label)
        single[name] = max(a, 1 - a)
    return BaselineReport(
        train_accounts=len(train.accounts),
        test_accounts=len(test.accounts),
        train_churn_rate=float(train.label.mean()),
        test_churn_rate=float(test.label.mean()),
        trend_auc=auc(trend.predict(test.matrix(TREND_FEATURES)), test.label),
        all_features_auc=auc(full.predict(test.matrix(every)), test.label),
        single_feature_auc=single,
    )
