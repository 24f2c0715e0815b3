"""Signals from scores and events: hysteresis, one signal per episode, deterministic ids."""

from __future__ import annotations

import itertools
from datetime import date
from typing import Any

import pytest
from pydantic import TypeAdapter

from churnguard.common.events.derived import ScoreEvent, SignalEvent
from churnguard.scoring.features import FEATURE_NAMES, STICKY_FEATURES, AccountState
from churnguard.scoring.model import TIER_THRESHOLDS, Score
from churnguard.scoring.signals import (
    TIER_MARGIN,
    SignalState,
    event_signals,
    next_tier,
    score_signals,
)

SIGNALS = TypeAdapter(SignalEvent)
DAY = date(2025, 6, 2)
T = "2025-06-02T20:00:00Z"


def score(p: float, tier: str = "healthy") -> Score:
    return Score(churn_probability=p, health=round(100 * (1 - p)), tier=tier, reasons=[])  # type: ignore[arg-type]


def test_a_probability_oscillating_around_a_threshold_changes_the_tier_once() -> None:
    threshold = dict((t, p) for p, t in TIER_THRESHOLDS)["at_risk"]
    wobble = TIER_MARGIN * 0.9
    tiers = []
    tier = ""
    for i in range(200):
        p = threshold + (wobble if i % 2 else -wobble)
        tier = next_tier(tier, p)
        tiers.append(tier)
    changes = sum(1 for a, b in itertools.pairwise(tiers) if a != b)
    assert tiers[0] == "watch"
    assert changes == 1
    assert tiers[-1] == "at_risk"


def test_tiers_go_down_past_the_margin_and_up_at_once() -> None:
    threshold = dict((t, p) for p, t in TIER_THRESHOLDS)["critical"]
    assert next_tier("at_risk", threshold) == "critical"  # worse: at the threshold
    assert next_tier("critical", threshold - TIER_MARGIN / 2) == "critical"
    assert next_tier("critical", threshold - TIER_MARGIN * 1.5) == "at_risk"
    assert next_tier("critical", 0.0) == "healthy"


def usage(account: str, day: date, uses: int) -> dict[str, Any]:
    return {
        "id": f"{account}-{day}-{uses}",
        "type": "churnguard.usage.feature_used",
        "time": f"{day.isoformat()}T10:00:00Z",
        "subject": account,
        "data": {"user_id": "u1", "feature": "reports", "count": uses},
    }


def state_with_daily_uses(per_day: list[int]) -> AccountState:
    state = AccountState()
    start = DAY.toordinal() - len(per_day) + 1
    for i, uses in enumerate(per_day):
        if uses:
            state.apply(usage("acct_1", date.fromordinal(start + i), uses))
    return state


def test_tier_crossing_and_usage_drop_fire_once_per_episode() -> None:
    account = state_with_daily_uses([10] * 7 + [2] * 7)  # 70 uses, then 14
    signals = SignalState()
    as_of = DAY.toordinal()
    features = account.features(as_of)
    first = score_signals("acct_1", features, account, score(0.05), "m1", signals, T)
    assert [k for k, _ in first] == ["scores", "signals"]  # first score, and the drop
    drop = first[1][1]
    assert drop["type"] == "churnguard.signals.usage_dropped"
    assert (drop["data"]["previous"], drop["data"]["current"]) == (70, 14)
    SIGNALS.validate_python(drop)
    again = score_signals("acct_1", features, account, score(0.30), "m1", signals, T)
    kinds = [e["type"] for _, e in again]
    assert kinds == ["churnguard.scores.account_scored", "churnguard.signals.risk_tier_crossed"]
    crossed = again[1][1]
    assert (crossed["data"]["from_tier"], crossed["data"]["to_tier"]) == ("healthy", "at_risk")
    SIGNALS.validate_python(crossed)
    # nothing new: no score event, no signal
    assert score_signals("acct_1", features, account, score(0.30), "m1", signals, T) == []


def test_a_failed_payment_and_a_detractor_answer_are_signals_with_ids_from_their_events() -> None:
    account = AccountState()
    signals = SignalState()
    failed = {
        "id": "evt_pf_1",
        "type": "churnguard.billing.invoice_payment_failed",
        "time": "2025-06-02T08:00:00Z",
        "subject": "acct_1",
        "data": {
            "invoice_id": "in_1",
            "amount_due": 5000,
            "currency": "usd",
            "attempt_count": 1,
            "decline_code": "expired_card",
            "decline_kind": "hard",
        },
    }
    account.apply(failed)
    (signal,) = event_signals(failed, account, signals, DAY.toordinal())
    assert signal["id"] == "sig:payment_failed:acct_1:evt_pf_1"
    assert signal["data"]["decline_kind"] == "hard"
    assert signal["data"]["failed_payments_60d"] == 1
    SIGNALS.validate_python(signal)

    def nps(score_: int, n: int) -> dict[str, Any]:
        return {
            "id": f"nps_{n}",
            "type": "churnguard.feedback.nps_submitted",
            "time": "2025-06-02T09:00:00Z",
            "subject": "acct_1",
            "data": {"user_id": "u1", "score": score_, "comment": "slow"},
        }

    assert event_signals(nps(9, 1), account, signals, DAY.toordinal()) == []
    (detractor,) = event_signals(nps(4, 2), account, signals, DAY.toordinal())
    assert detractor["data"] == {
        "score": 4,
        "comment": "slow",
        "user_id": "u1",
        "previous_score": 9,
    }
    SIGNALS.validate_python(detractor)


@pytest.mark.parametrize("days_to_renewal", [85, 55, 20])
def test_renewal_at_risk_fires_once_per_window_when_risky(days_to_renewal: int) -> None:
    from churnguard.scoring.signals import _renewal

    signals = SignalState(tier="at_risk")

    class Features:
        as_of = DAY.toordinal()

        def __getitem__(self, name: str) -> float:
            return {"days_to_renewal": days_to_renewal, "mrr": 1200.0}[name]

    first = _renewal("acct_1", Features(), score(0.3), signals, T)  # type: ignore[arg-type]
    assert len(first) == 1
    expected_window = min(w for w in (90, 60, 30) if days_to_renewal <= w)
    assert first[0]["data"]["window_days"] == expected_window
    assert first[0]["data"]["mrr"] == 120000
    SIGNALS.validate_python(first[0])
    assert _renewal("acct_1", Features(), score(0.3), signals, "t") == []  # type: ignore[arg-type]
    healthy = SignalState(tier="healthy")
    assert _renewal("acct_1", Features(), score(0.01), healthy, "t") == []  # type: ignore[arg-type]


def milestones_of(outputs: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, int]]:
    found = []
    for _, event in outputs:
        if event["type"] == "churnguard.signals.milestone_reached":
            SIGNALS.validate_python(event)
            found.append((event["data"]["milestone"], event["data"]["value"]))
    return found


def test_milestones_fire_once_each_and_a_jump_signals_only_the_highest() -> None:
    account = state_with_daily_uses([400] * 3)  # 1,200 uses of reports in three days
    signals = SignalState()
    as_of = DAY.toordinal()
    first = score_signals("acct_1", account.features(as_of), account, score(0.05), "m", signals, T)
    assert milestones_of(first) == [("feature_uses.reports", 1_000)]  # not 100 as well
    used = {
        "id": "first-api",
        "type": "churnguard.usage.feature_used",
        "time": f"{DAY.isoformat()}T11:00:00Z",
        "subject": "acct_1",
        "data": {"user_id": "u2", "feature": "api", "count": 1},
    }
    account.apply(used)
    again = score_signals("acct_1", account.features(as_of), account, score(0.05), "m", signals, T)
    assert milestones_of(again) == [("first_use.api", 1)]
    # the same state scored again, or restored and scored: nothing new
    restored = SignalState.from_list(signals.to_list())
    for state in (signals, restored):
        out = score_signals("acct_1", account.features(as_of), account, score(0.05), "m", state, T)
        assert milestones_of(out) == []
    ids = {e["id"] for _, e in first + again if "milestone" in e["type"]}
    assert ids == {
        "sig:milestone:acct_1:feature_uses.reports:1000",
        "sig:milestone:acct_1:first_use.api:1",
    }


def test_a_state_saved_before_milestones_reads_as_none_reached() -> None:
    older = SignalState(tier="watch", scores=3).to_list()[:13]
    assert SignalState.from_list(older) == SignalState(tier="watch", scores=3)


def test_the_score_event_carries_its_features_and_the_unadopted_sticky_features() -> None:
    account = state_with_daily_uses([10] * 7 + [2] * 7)
    signals = SignalState()
    features = account.features(DAY.toordinal())
    out = score_signals("acct_1", features, account, score(0.05), "m1", signals, T)
    (scored,) = [e for kind, e in out if kind == "scores"]
    event = TypeAdapter(ScoreEvent).validate_python(scored)
    assert event.data.features is not None
    assert event.data.features["activity_7d"] == 14
    assert set(event.data.features) == set(FEATURE_NAMES)
    assert event.data.unadopted_sticky_features == list(STICKY_FEATURES)  # only reports used
    (drop,) = [e for kind, e in out if e["type"] == "churnguard.signals.usage_dropped"]
    assert drop["data"]["unadopted_sticky_features"] == list(STICKY_FEATURES)
