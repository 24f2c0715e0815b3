"""Retention lift of each product feature, from a recorded history (``churnguard simulate``).

The in-app guide of the onboarding playbook points at the unadopted sticky feature that
keeps customers best. "Best" is measured here, on a history with known outcomes:

* each account is observed from its sign-up (or the history's start, if earlier) for an
  **adoption window** of 90 days; accounts that cancelled inside it, or whose window does
  not end at least ``follow_up_days`` before the history does, are left out (their
  outcome would precede, or not follow, what they adopted);
* an account **adopted** a feature if it used it inside its window;
* **churn** is a cancellation decided after the window, before the history ends;
* a feature's **lift** is the churn rate of the accounts that did not adopt it minus the
  churn rate of those that did (percentage points of retention that come with it),
  reported with both counts so that a lift from a handful of accounts is seen as such.

Adoption is not assigned at random, so this is an association, not a causal effect: a
ranking to aim guides with (the holdout of the playbook measures the real uplift).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Final

import orjson

ADOPTION_DAYS: Final = 90
FEATURE_USED: Final = b'"type":"churnguard.usage.feature_used"'


@dataclass(frozen=True)
class FeatureLift:
    feature: str
    adopters: int
    non_adopters: int
    churn_adopters: float
    churn_non_adopters: float

    @property
    def lift(self) -> float:
        return self.churn_non_adopters - self.churn_adopters

    @property
    def ci95(self) -> float:
        """Half-width of the 95% interval of the lift (normal approximation)."""
        a, n = self.churn_adopters, self.churn_non_adopters
        variance = a * (1 - a) / self.adopters + n * (1 - n) / self.non_adopters
        return 1.96 * math.sqrt(variance)

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "lift": round(self.lift, 4),
            "lift_ci95": round(self.ci95, 4),
            "churn_adopters": round(self.churn_adopters, 4),
            "churn_non_adopters": round(self.churn_non_adopters, 4),
        }


@dataclass(frozen=True)
class LiftReport:
    history: str
    accounts: int
    window_days: int
    follow_up_days: int
    features: list[FeatureLift]

    def as_json(self) -> str:
        return (
            json.dumps(
                {
                    "history": self.history,
                    "accounts": self.accounts,
                    "window_days": self.window_days,
                    "follow_up_days": self.follow_up_days,
                    "method": "churn rate of non-adopters minus adopters; adoption = used in the "
                    "first window_days of the account's observed life",
                    "features": [f.as_dict() for f in sorted(self.features, key=lambda f: -f.lift)],
                },
                indent=2,
            )
            + "\n"
        )


def compute_lift(folder: Path, *, follow_up_days: int = 90, min_accounts: int = 20) -> LiftReport:
    """Lift of every feature used in the history at ``folder`` (see the module docstring)."""
    summary = json.loads((folder / "summary.json").read_text())
    start = date.fromisoformat(summary["config"]["start"])
    end = start + timedelta(days=int(summary["config"]["days"]))
    windows: dict[str, tuple[date, date]] = {}
    churned: dict[str, bool] = {}
    with (folder / "ground_truth.jsonl").open("rb") as f:
        for line in f:
            row = orjson.loads(line)
            opened = max(date.fromisoformat(row["signup_date"]), start)
            closes = opened + timedelta(days=ADOPTION_DAYS)
            cancel = date.fromisoformat(row["cancel_date"]) if row["cancel_date"] else None
            if closes + timedelta(days=follow_up_days) > end:
                continue
            if cancel is not None and cancel < closes:
                continue
            windows[row["account_id"]] = (opened, closes)
            churned[row["account_id"]] = cancel is not None
    adopted: dict[str, set[str]] = defaultdict(set)
    with (folder / "events.jsonl").open("rb") as f:
        for line in f:
            if FEATURE_USED not in line:
                continue
            event = orjson.loads(line)
            window = windows.get(event["subject"])
            if window is None:
                continue
            day = date.fromisoformat(event["time"][:10])
            if window[0] <= day < window[1]:
                adopted[event["data"]["feature"]].add(event["subject"])
    population = set(windows)
    lifts = []
    for feature, users in sorted(adopted.items()):
        others = population - users
        if len(users) < min_accounts or len(others) < min_accounts:
            continue
        lifts.append(
            FeatureLift(
                feature,
                len(users),
                len(others),
                sum(churned[a] for a in users) / len(users),
                sum(churned[a] for a in others) / len(others),
            )
        )
    return LiftReport(folder.name, len(population), ADOPTION_DAYS, follow_up_days, lifts)
