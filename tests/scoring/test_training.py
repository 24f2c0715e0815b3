"""Point-in-time training sets: no row sees the future; labels follow the ground truth."""

from __future__ import annotations

import shutil
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from churnguard.scoring.features import FEATURE_NAMES
from churnguard.scoring.training import (
    EVENTS_FILE,
    GROUND_TRUTH_FILE,
    TrainingSet,
    build_training_set,
    history_span,
    read_cancel_dates,
    replay_snapshots,
    snapshot_plan,
)

START = date(2025, 1, 1)  # the simulator's day 0


def truncated_copy(world: Path, to: Path, last_day: date) -> Path:
    """The same world with every event after ``last_day`` removed."""
    to.mkdir()
    shutil.copy(world / GROUND_TRUTH_FILE, to / GROUND_TRUTH_FILE)
    cutoff = last_day.isoformat().encode()
    with (world / EVENTS_FILE).open("rb") as src, (to / EVENTS_FILE).open("wb") as dst:
        for line in src:
            if line[line.index(b'"time":"') + 8 :][:10] > cutoff:
                break
            dst.write(line)
    return to


def rows_by_account(data: TrainingSet) -> dict[str, tuple[tuple[float, ...], float]]:
    return {
        a: (tuple(x.tolist()), float(y))
        for a, x, y in zip(data.accounts, data.features, data.labels, strict=True)
    }


def test_snapshot_features_do_not_see_later_events(small_world: Path, tmp_path: Path) -> None:
    t = START + timedelta(days=100)
    full = build_training_set(small_world, snapshots=[t])
    cut = build_training_set(truncated_copy(small_world, tmp_path / "cut", t), snapshots=[t])
    assert len(full) > 250
    assert rows_by_account(full) == rows_by_account(cut)
    # and the events after T do change an account's features, so the test can tell
    later = build_training_set(small_world, snapshots=[t + timedelta(days=1)])
    changed = rows_by_account(later)
    assert (
        sum(changed[a][0] != v[0] for a, v in rows_by_account(full).items() if a in changed) > 100
    )


def test_labels_are_cancellations_within_the_horizon(
    small_world: Path, small_training_set: TrainingSet
) -> None:
    cancels = read_cancel_dates(small_world)
    data = small_training_set
    assert data.positives > 20
    for account, day, label in zip(data.accounts, data.days.tolist(), data.labels, strict=True):
        t = date.fromordinal(day)
        cancel = cancels[account]
        assert cancel is None or cancel > t, "an account that already decided is no customer"
        assert label == (cancel is not None and cancel <= t + timedelta(days=90))
    # every account still a customer at T with events up to T is in, churner or not
    t = data.snapshot_dates[0]
    at_t = {a for a, d in zip(data.accounts, data.days.tolist(), strict=True) if d == t.toordinal()}
    cancelled_before = {a for a, c in cancels.items() if c is not None and c <= t}
    assert not at_t & cancelled_before
    assert {a for a, c in cancels.items() if c is not None and t < c <= t + timedelta(days=90)} <= (
        at_t | _accounts_without_events_by(small_world, t)
    )


def _accounts_without_events_by(world: Path, t: date) -> set[str]:
    seen: set[str] = set()
    with (world / EVENTS_FILE).open("rb") as f:
        for line in f:
            event = orjson.loads(line)
            if event["time"][:10] > t.isoformat():
                break
            seen.add(event["subject"])
    return set(read_cancel_dates(world)) - seen


def test_snapshot_plan_keeps_the_horizon_inside_the_history(small_world: Path) -> None:
    first, last = history_span(small_world)
    assert (first, last) == (START, START + timedelta(days=239))
    plan = snapshot_plan(first, last)
    assert plan == [START + timedelta(days=d) for d in (60, 90, 120)]
    assert snapshot_plan(first, last, since=START + timedelta(days=61)) == plan[1:]


def test_replay_takes_each_snapshot_before_the_next_day(tmp_path: Path) -> None:
    def used(day: str, account: str) -> dict[str, Any]:
        return {
            "id": f"{account}{day}",
            "type": "churnguard.usage.feature_used",
            "time": f"{day}T23:59:59Z",
            "subject": account,
            "data": {"user_id": "u", "feature": "api"},
        }

    events = [used("2025-03-01", "a"), used("2025-03-02", "a"), used("2025-03-02", "b")]
    rows = replay_snapshots(events, [date(2025, 3, 2), date(2025, 3, 1), date(2025, 3, 5)])
    activity = FEATURE_NAMES.index("activity_30d")
    got = [(t.isoformat(), a, v[activity]) for t, a, v in rows]
    assert got == [
        ("2025-03-01", "a", 1.0),
        ("2025-03-02", "a", 2.0),
        ("2025-03-02", "b", 1.0),
        ("2025-03-05", "a", 2.0),
        ("2025-03-05", "b", 1.0),
    ]


def test_split_by_account_keeps_accounts_apart(small_training_set: TrainingSet) -> None:
    train, test = small_training_set.split_by_account()
    assert not set(train.accounts) & set(test.accounts)
    assert len(train) + len(test) == len(small_training_set)
    assert 0.15 < len(test) / len(small_training_set) < 0.35
    assert train.features.shape == (len(train), len(FEATURE_NAMES))
    assert np.isfinite(small_training_set.features).all()


def test_split_out_of_time_trains_only_on_labels_known_before_the_test() -> None:
    days = np.array([date(2025, m, 1).toordinal() for m in (1, 2, 3, 4, 5, 6)] * 200)
    accounts = [f"acct_{i // 6}" for i in range(len(days))]
    data = TrainingSet(
        accounts=accounts,
        days=days,
        features=np.zeros((len(days), len(FEATURE_NAMES)), dtype=np.float32),
        labels=np.zeros(len(days)),
        horizon_days=90,
        source="w",
    )
    since = date(2025, 5, 1)
    train, test = data.split_by_account(since=since)
    assert not set(train.accounts) & set(test.accounts)
    assert train.snapshot_dates == [date(2025, 1, 1)]  # Feb 1 + 90 days is past May 1
    assert test.snapshot_dates == [date(2025, 5, 1), date(2025, 6, 1)]
    assert "snapshots from 2025-05-01" in test.source
