"""Point-in-time training sets from a recorded event history.

Input is a folder as ``churnguard simulate --to DIR`` writes it (docs/simulator.md):
``events.jsonl``, every event as a structured CloudEvent per line in time order, and
``ground_truth.jsonl``, one line per account with its ``cancel_date`` (the day it decided
to cancel, voluntarily or not; null if it never did). Any history exported in that shape
works the same.

The events are replayed in time order through one :class:`AccountState` per account,
exactly as the online worker applies them. At each snapshot day T, before the first event
of day T+1 is applied, the features of every account that is a customer at T (it has
events and no cancellation up to T) are taken as of the end of T. So a row only ever saw
events with ``time`` ≤ T: no leakage by construction, and the replay is the online
computation, so there is no training/serving skew either. The label is whether the
account decided to cancel within ``horizon_days`` after T (T < cancel_date ≤ T + horizon).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from churnguard.scoring.features import FEATURE_NAMES, AccountState, day_ordinal

EVENTS_FILE = "events.jsonl"
GROUND_TRUTH_FILE = "ground_truth.jsonl"

WARMUP_DAYS = 60
"""No snapshot before this many days of history: windows need it (the longest is 60 days)."""
SNAPSHOT_EVERY_DAYS = 30
HORIZON_DAYS = 90


@dataclass(frozen=True)
class TrainingSet:
    """Rows are (account, snapshot day); columns FEATURE_NAMES; label 1 = cancels in horizon."""

    accounts: list[str]
    days: np.ndarray
    """Snapshot day of each row (day ordinals)."""
    features: np.ndarray
    """``(rows, len(FEATURE_NAMES))`` float32."""
    labels: np.ndarray
    """``(rows,)`` float64, 0 or 1."""
    horizon_days: int
    source: str
    """Where the rows come from (the folder's name, never a machine path)."""

    def __len__(self) -> int:
        return len(self.accounts)

    @property
    def positives(self) -> int:
        return int(self.labels.sum())

    @property
    def snapshot_dates(self) -> list[date]:
        return [date.fromordinal(int(d)) for d in np.unique(self.days)]

    def subset(self, mask: np.ndarray, source: str | None = None) -> TrainingSet:
        return TrainingSet(
            accounts=[a for a, keep in zip(self.accounts, mask, strict=True) if keep],
            days=self.days[mask],
            features=self.features[mask],
            labels=self.labels[mask],
            horizon_days=self.horizon_days,
            source=source or self.source,
        )

    def split_by_account(
        self, test_share: float = 0.25, since: date | None = None
    ) -> tuple[TrainingSet, TrainingSet]:
        """Train/test by a stable hash of the account id: no account lands in both.

        With ``since``, out of time as well: the test keeps the snapshots from ``since``
        on, the training the snapshots whose horizon ended by then (labels known then).
        """
        bucket = np.array([zlib.crc32(a.encode()) % 1000 for a in self.accounts])
        test = bucket < int(test_share * 1000)
        train = ~test
        train_source = f"{self.source} ({1 - test_share:.0%} of accounts"
        test_source = f"{self.source} (other {test_share:.0%} of accounts"
        if since is not None:
            test &= self.days >= since.toordinal()
            train &= self.days + self.horizon_days <= since.toordinal()
            train_source += f", snapshots before {since}"
            test_source += f", snapshots from {since}"
        return self.subset(train, train_source + ")"), self.subset(test, test_source + ")")

    def describe(self) -> str:
        dates = self.snapshot_dates
        span = f"{dates[0]}..{dates[-1]}" if dates else "none"
        return (
            f"{self.source}: {len(self):,} rows ({len(set(self.accounts)):,} accounts), "
            f"{len(dates)} snapshots {span}, cancels within {self.horizon_days} d: "
            f"{self.positives:,} ({self.labels.mean() if len(self) else 0.0:.1%})"
        )


def history_span(folder: Path) -> tuple[date, date]:
    """First and last day of a folder's recorded history.

    A simulator world says it in ``summary.json`` (its stream also opens with a backfill of
    the existing customers' subscriptions, dated at their sign-ups before the history
    starts: not days with activity to learn from). Otherwise the first and last event day
    of ``events.jsonl`` (reads only its ends).
    """
    summary = folder / "summary.json"
    if summary.exists():
        config = orjson.loads(summary.read_bytes()).get("config", {})
        if "start" in config and "days" in config:
            start = date.fromisoformat(config["start"])
            return start, start + timedelta(days=int(config["days"]) - 1)
    path = folder / EVENTS_FILE
    with path.open("rb") as f:
        first = orjson.loads(f.readline())
        size = f.seek(0, 2)
        f.seek(max(0, size - 65536))
        last = orjson.loads(f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1])
    return (
        date.fromisoformat(first["time"][:10]),
        date.fromisoformat(last["time"][:10]),
    )


def snapshot_plan(
    first: date,
    last: date,
    *,
    warmup_days: int = WARMUP_DAYS,
    every_days: int = SNAPSHOT_EVERY_DAYS,
    horizon_days: int = HORIZON_DAYS,
    since: date | None = None,
) -> list[date]:
    """Snapshot days from ``first + warmup`` every ``every_days`` while the horizon after
    them stays within the history; only those on or after ``since`` when given."""
    days = []
    t = first + timedelta(days=warmup_days)
    while t + timedelta(days=horizon_days) <= last:
        if since is None or t >= since:
            days.append(t)
        t += timedelta(days=every_days)
    return days


def read_cancel_dates(folder: Path) -> dict[str, date | None]:
    out: dict[str, date | None] = {}
    with (folder / GROUND_TRUTH_FILE).open("rb") as f:
        for line in f:
            row = orjson.loads(line)
            cancel = row.get("cancel_date")
            out[row["account_id"]] = date.fromisoformat(cancel) if cancel else None
    return out


def build_training_set(
    folder: Path,
    *,
    snapshots: Sequence[date] | None = None,
    horizon_days: int = HORIZON_DAYS,
    warmup_days: int = WARMUP_DAYS,
    every_days: int = SNAPSHOT_EVERY_DAYS,
    since: date | None = None,
) -> TrainingSet:
    """Replay ``folder``'s events and take labelled snapshots (see the module docstring).

    ``snapshots`` defaults to :func:`snapshot_plan` over the folder's history.
    """
    if snapshots is None:
        first, last = history_span(folder)
        snapshots = snapshot_plan(
            first,
            last,
            warmup_days=warmup_days,
            every_days=every_days,
            horizon_days=horizon_days,
            since=since,
        )
    cancels = read_cancel_dates(folder)
    with (folder / EVENTS_FILE).open("rb") as f:
        rows = replay_snapshots((orjson.loads(line) for line in f), snapshots)
    accounts: list[str] = []
    days: list[int] = []
    vectors: list[tuple[float, ...]] = []
    labels: list[float] = []
    horizon = timedelta(days=horizon_days)
    for t, account, values in rows:
        if account not in cancels:
            continue
        cancel = cancels[account]
        if cancel is not None and cancel <= t:
            continue  # decided before T (the replay agrees; the ground truth decides)
        accounts.append(account)
        days.append(t.toordinal())
        vectors.append(values)
        labels.append(float(cancel is not None and cancel <= t + horizon))
    return TrainingSet(
        accounts=accounts,
        days=np.array(days, dtype=np.int64),
        features=np.array(vectors, dtype=np.float32).reshape(-1, len(FEATURE_NAMES)),
        labels=np.array(labels, dtype=np.float64),
        horizon_days=horizon_days,
        source=folder.name,
    )


def replay_snapshots(
    events: Iterable[dict[str, Any]], snapshots: Sequence[date]
) -> list[tuple[date, str, tuple[float, ...]]]:
    """(T, account, feature values as of the end of T) for every customer at each T.

    Time-ordered events are applied one by one; a snapshot is taken as soon as an event of
    a later day arrives (or the events end), so it sees exactly the events up to T.
    """
    pending = sorted(snapshots, reverse=True)
    states: dict[str, AccountState] = {}
    out: list[tuple[date, str, tuple[float, ...]]] = []

    def take(t: date) -> None:
        as_of = t.toordinal()
        for account, state in states.items():
            if not state.cancellation_pending:
                out.append((t, account, state.features(as_of).values))

    next_day = pending[-1].toordinal() if pending else None
    for event in events:
        if next_day is not None and day_ordinal(event["time"]) > next_day:
            while pending and pending[-1].toordinal() < day_ordinal(event["time"]):
                take(pending.pop())
            next_day = pending[-1].toordinal() if pending else None
        account = event["subject"]
        state = states.get(account)
        if state is None:
            state = states[account] = AccountState()
        state.apply(event)
    while pending:
        take(pending.pop())
    return out
