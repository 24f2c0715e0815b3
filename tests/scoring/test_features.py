"""Per-account features: windows in event time, grace for late events, bounded state, bytes."""

from __future__ import annotations

import json
import math
import zlib
from datetime import date, timedelta
from typing import Any

import pytest

from churnguard.common.events.schemas import example_files
from churnguard.scoring.features import (
    FEATURE_NAMES,
    GRACE_DAYS,
    STICKY_FEATURES,
    AccountState,
    InvalidEventError,
)

D = date(2025, 6, 2)  # a Monday
ACCOUNT = "acct_test"
_seq = iter(range(10**9))


def event(kind: str, day: date, data: dict[str, Any], hour: int = 10) -> dict[str, Any]:
    """A structured CloudEvent as envelope.unpack() returns it."""
    return {
        "specversion": "1.0",
        "id": f"e{next(_seq)}",
        "source": "/tests",
        "type": f"churnguard.{kind}",
        "time": f"{day.isoformat()}T{hour:02d}:00:00Z",
        "subject": ACCOUNT,
        "data": data,
    }


def used(day: date, user: str = "u1", feature: str = "reports", count: int = 1) -> dict[str, Any]:
    return event("usage.feature_used", day, {"user_id": user, "feature": feature, "count": count})


def state_of(*events: dict[str, Any]) -> AccountState:
    state = AccountState()
    state.apply_all(events)
    return state


def test_windows_roll_with_time_alone() -> None:
    state = state_of(
        used(D - timedelta(days=10), "u2", count=3),
        used(D, "u1", count=5),
    )
    today = state.features(D)
    assert (today["activity_1d"], today["activity_7d"], today["activity_30d"]) == (5, 5, 8)
    assert (today["active_users_1d"], today["active_users_7d"], today["active_users_30d"]) == (
        1,
        1,
        2,
    )
    assert today["days_since_active"] == 0
    assert today["active_days_30d"] == 2

    # eight days later, with no event in between, the 1- and 7-day windows are empty
    later = state.features(D + timedelta(days=8))
    assert (later["activity_1d"], later["activity_7d"], later["activity_30d"]) == (0, 0, 8)
    assert (later["active_users_7d"], later["active_users_30d"]) == (0, 2)
    assert later["days_since_active"] == 8
    # the last 7 days (none) against the 7 before (day D: 5 uses)
    assert later["usage_trend_7d"] == pytest.approx(math.log(1 / 6))

    # day D-10 leaves the 30-day window after 20 days, day D after 30
    assert state.features(D + timedelta(days=20))["activity_30d"] == 5
    assert state.features(D + timedelta(days=20))["active_users_30d"] == 1
    gone = state.features(D + timedelta(days=30))
    assert (gone["activity_30d"], gone["active_users_30d"], gone["days_since_active"]) == (0, 0, 30)
    # and the 30-day trend now compares nothing with the 30 days that had all 8 uses
    assert gone["usage_trend_30d"] == pytest.approx(math.log(1 / 9))


def test_late_event_within_grace_counts_in_its_day() -> None:
    state = state_of(used(D, "u1", count=2))
    late_day = D - timedelta(days=GRACE_DAYS)
    state.apply(used(late_day, "u2", count=7))
    assert state.late_events == 0
    f = state.features(D)
    assert f["activity_1d"] == 2  # not today's
    assert f["activity_7d"] == 9
    assert f["active_users_7d"] == 2
    assert state.daily_uses(D, 3) == [7, 0, 2]


def test_late_event_beyond_grace_is_ignored_and_counted() -> None:
    state = state_of(used(D, "u1", count=2))
    before = state.features(D)
    state.apply(used(D - timedelta(days=GRACE_DAYS + 1), "u2", count=7))
    state.apply(
        event("feedback.nps_submitted", D - timedelta(days=30), {"user_id": "u", "score": 0})
    )
    assert state.late_events == 2
    assert state.features(D) == before


def test_late_user_activity_sets_the_right_day() -> None:
    state = state_of(used(D, "u1"), used(D - timedelta(days=1), "u1"))
    assert state.active_users(D) == (1, 1, 1)
    # u1 was active yesterday and today: a day later it is still in the 7-day window
    assert state.active_users(D + timedelta(days=1)) == (0, 1, 1)


def test_features_before_a_later_event_ignore_it() -> None:
    state = state_of(used(D, "u1", count=4), used(D + timedelta(days=1), "u2", count=1))
    f = state.features(D)
    assert (f["activity_1d"], f["active_users_1d"], f["active_users_30d"]) == (4, 1, 1)


def test_adoption_breadth_and_unadopted_sticky_features() -> None:
    state = state_of(
        used(D - timedelta(days=40), feature="automations"),
        used(D, feature="dashboards"),
        used(D, feature="api"),
    )
    assert state.unadopted_sticky_features(D) == ("integrations", "scheduled_reports")
    f = state.features(D)
    assert f["features_used_30d"] == 2  # automations was 40 days ago
    assert f["sticky_unadopted"] == 2
    # adoption lapses after 90 days without use
    assert state.unadopted_sticky_features(D + timedelta(days=60)) == (
        "integrations",
        "automations",
        "scheduled_reports",
    )
    assert state.unadopted_sticky_features(D + timedelta(days=90)) == STICKY_FEATURES


def test_payments_failed_unpaid_and_recovered() -> None:
    invoice = {"invoice_id": "in_1", "amount_due": 5000, "currency": "usd"}
    failed = invoice | {
        "attempt_count": 1,
        "decline_code": "expired_card",
        "decline_kind": "hard",
    }
    state = state_of(
        event("billing.invoice_created", D, invoice | {"billing_reason": "subscription_cycle"}),
        event("billing.invoice_payment_failed", D, failed),
    )
    f = state.features(D)
    assert (f["failed_payments_60d"], f["unpaid_invoices"], f["unpaid_hard_declines"]) == (1, 1, 1)
    state.apply(
        event(
            "billing.invoice_paid",
            D + timedelta(days=3),
            {"invoice_id": "in_1", "amount_paid": 5000, "currency": "usd", "attempt_count": 2},
        )
    )
    f = state.features(D + timedelta(days=3))
    assert (f["failed_payments_60d"], f["unpaid_invoices"], f["unpaid_hard_declines"]) == (1, 0, 0)
    assert state.features(D + timedelta(days=60))["failed_payments_60d"] == 0


def test_overdue_invoice_counts_as_unpaid_after_its_due_date() -> None:
    due = D + timedelta(days=30)
    state = state_of(
        event(
            "billing.invoice_created",
            D,
            {
                "invoice_id": "in_2",
                "amount_due": 100,
                "currency": "usd",
                "due_at": f"{due.isoformat()}T23:59:59Z",
                "billing_reason": "manual",
            },
        )
    )
    assert state.features(due)["unpaid_invoices"] == 0
    assert state.features(due + timedelta(days=1))["unpaid_invoices"] == 1


def test_tickets_sentiment_open_and_unresolved() -> None:
    angry = {
        "ticket_id": "t1",
        "subject": "Everything is broken AGAIN",
        "text": "This is unacceptable and useless, we are losing work. Fix it or we cancel.",
        "channel": "email",
    }
    warm = {
        "ticket_id": "t2",
        "subject": "Small idea",
        "text": "We love the product, great work! One small idea for dashboards.",
        "channel": "web",
    }
    state = state_of(
        event("feedback.ticket_opened", D, angry),
        event("feedback.ticket_opened", D, warm),
        event(
            "feedback.ticket_closed", D + timedelta(days=2), {"ticket_id": "t1", "satisfied": False}
        ),
    )
    f = state.features(D)
    assert (f["tickets_30d"], f["open_tickets"], f["tickets_unresolved_30d"]) == (2, 2, 0)
    angry_only = state_of(event("feedback.ticket_opened", D, angry)).features(D)
    warm_only = state_of(event("feedback.ticket_opened", D, warm)).features(D)
    assert angry_only["ticket_sentiment_30d"] < -0.3 < 0.3 < warm_only["ticket_sentiment_30d"]
    assert f["ticket_sentiment_30d"] == pytest.approx(
        (angry_only["ticket_sentiment_30d"] + warm_only["ticket_sentiment_30d"]) / 2, abs=1e-3
    )
    g = state.features(D + timedelta(days=2))
    assert (g["open_tickets"], g["tickets_unresolved_30d"]) == (1, 1)
    h = state.features(D + timedelta(days=33))
    assert (h["tickets_30d"], h["open_tickets"], h["tickets_unresolved_30d"]) == (0, 1, 0)


def test_nps_and_csat_none_then_latest() -> None:
    state = AccountState()
    f = state.features(D)
    assert (f["last_nps"], f["has_nps"], f["last_csat"], f["has_csat"]) == (-1, 0, -1, 0)
    state.apply(event("feedback.nps_submitted", D, {"user_id": "u", "score": 9}))
    state.apply(
        event("feedback.nps_submitted", D + timedelta(days=1), {"user_id": "u", "score": 3})
    )
    # within grace but older than the answer we hold: does not replace it
    state.apply(event("feedback.nps_submitted", D, {"user_id": "u", "score": 10}))
    state.apply(event("feedback.csat_submitted", D, {"score": 2}))
    f = state.features(D + timedelta(days=1))
    assert (f["last_nps"], f["has_nps"], f["last_csat"], f["has_csat"]) == (3, 1, 2, 1)


def subscription(mrr: int, quantity: int = 10, interval: str = "month") -> dict[str, Any]:
    return {
        "subscription_id": "sub_1",
        "plan": "growth",
        "interval": interval,
        "quantity": quantity,
        "mrr": mrr,
        "currency": "usd",
        "status": "active",
    }


def test_mrr_change_interval_renewal_tenure_and_seats() -> None:
    start = date(2025, 1, 15)
    state = state_of(
        event("billing.subscription_created", start, subscription(100_00)),
        event(
            "usage.seats_changed",
            start + timedelta(days=1),
            {"seats_purchased": 10, "seats_used": 4},
        ),
        event(
            "billing.subscription_updated",
            start + timedelta(days=30),
            subscription(50_00, quantity=5) | {"previous_mrr": 100_00},
        ),
    )
    f = state.features(start + timedelta(days=30))
    assert f["mrr"] == 50
    assert f["mrr_change_90d"] == pytest.approx(-0.5)
    assert f["seats_purchased"] == 5
    assert f["seat_utilisation"] == pytest.approx(4 / 5)
    assert f["billing_annual"] == 0
    assert f["days_to_renewal"] == 1  # monthly from the 15th; as of the 14th
    assert f["tenure_days"] == 30
    # 90 days after the downgrade the MRR has been flat for the whole window
    assert state.features(start + timedelta(days=130))["mrr_change_90d"] == 0


def test_interval_inferred_from_invoices() -> None:
    def cycle(day: date, n: int) -> dict[str, Any]:
        return event(
            "billing.invoice_created",
            day,
            {
                "invoice_id": f"in_{n}",
                "amount_due": 1200_00,
                "currency": "usd",
                "billing_reason": "subscription_cycle",
            },
        )

    monthly = state_of(cycle(date(2025, 1, 10), 1), cycle(date(2025, 2, 10), 2))
    f = monthly.features(date(2025, 2, 20))
    assert (f["billing_annual"], f["mrr"], f["days_to_renewal"]) == (0, 1200, 18)

    annual = state_of(cycle(date(2025, 1, 10), 3))
    assert annual.features(date(2025, 1, 20))["billing_annual"] == -1  # too early to tell
    f = annual.features(date(2025, 3, 1))  # no invoice for 50 days: annual
    assert (f["billing_annual"], f["mrr"], f["days_to_renewal"]) == (1, 100, 315)


def test_state_is_bounded_in_time() -> None:
    state = AccountState()
    for d in range(300):
        day = D + timedelta(days=d)
        state.apply(used(day, f"u{d}", feature=f"f{d % 100}"))
        state.apply(
            event(
                "feedback.ticket_opened",
                day,
                {"ticket_id": f"t{d}", "subject": "s", "text": "t", "channel": "web"},
            )
        )
        state.apply(event("feedback.ticket_closed", day, {"ticket_id": f"t{d}"}))
    assert len(state.users) <= 32 + 8
    assert len(state.feature_days) <= 90 + 8
    assert len(state.tickets) <= 32 + 8
    f = state.features(D + timedelta(days=299))
    assert f["active_users_30d"] == 30
    assert f["tickets_30d"] == 30


def test_serialisation_round_trip() -> None:
    state = state_of(
        event("billing.subscription_created", D - timedelta(days=40), subscription(300_00)),
        *[used(D - timedelta(days=d), f"u{d % 5}", f"f{d % 7}", d + 1) for d in range(40, -1, -1)],
        event("usage.seats_changed", D, {"seats_purchased": 12, "seats_used": 9}),
        event("feedback.nps_submitted", D, {"user_id": "u1", "score": 6}),
        event("feedback.csat_submitted", D, {"score": 4}),
        event(
            "feedback.ticket_opened",
            D,
            {"ticket_id": "t", "subject": "Help", "text": "It fails", "channel": "chat"},
        ),
        event(
            "billing.invoice_created",
            D,
            {"invoice_id": "in_9", "amount_due": 300_00, "currency": "usd"},
        ),
        event(
            "billing.invoice_payment_failed",
            D,
            {
                "invoice_id": "in_9",
                "amount_due": 300_00,
                "currency": "usd",
                "attempt_count": 1,
                "decline_code": "insufficient_funds",
                "decline_kind": "soft",
            },
        ),
    )
    state.apply(used(D - timedelta(days=5)))  # one late event, counted
    blob = state.to_bytes()
    copy = AccountState.from_bytes(blob)
    assert copy == state
    for later in (0, 7, 45):
        assert copy.features(D + timedelta(days=later)) == state.features(D + timedelta(days=later))
    # the copy goes on exactly like the original
    more = used(D + timedelta(days=1), "u9", "api", 3)
    state.apply(more)
    copy.apply(more)
    assert copy == state
    with pytest.raises(ValueError, match="format 99"):
        AccountState.from_bytes(bytes([99]) + blob[1:])


def test_unknown_types_are_ignored_and_bad_data_is_refused() -> None:
    state = AccountState()
    state.apply({"type": "churnguard.actions.action_outcome", "time": "garbage", "data": None})
    state.apply(event("usage.identify", D, {"user_id": "u1"}))
    assert state == AccountState()
    with pytest.raises(InvalidEventError, match="feature_used"):
        state.apply(event("usage.feature_used", D, {"feature": "reports"}))
    with pytest.raises(InvalidEventError, match="nps_submitted"):
        state.apply(event("feedback.nps_submitted", D, {"user_id": "u"}))


def test_times_with_an_offset_count_in_their_utc_day() -> None:
    state = AccountState()
    evening = used(D) | {"time": f"{D.isoformat()}T20:30:00-05:00"}  # 01:30 UTC the day after
    state.apply(evening)
    state.apply(used(D) | {"time": f"{D.isoformat()}T10:00:00+00:00"})
    assert state.daily_uses(D + timedelta(days=1), 2) == [1, 1]


@pytest.mark.parametrize(
    "data",
    [
        {"user_id": "u", "feature": "api", "count": 0},
        {"user_id": "u", "feature": "api", "count": "3"},
        {"user_id": "u", "feature": "api", "count": 1.5},
        {"user_id": "u", "feature": 7},
        {"user_id": None, "feature": "api"},
    ],
)
def test_a_malformed_usage_event_changes_no_window(data: dict[str, Any]) -> None:
    state = state_of(used(D, count=2))
    before = state.features(D + timedelta(days=1))
    with pytest.raises(InvalidEventError):
        state.apply(event("usage.feature_used", D + timedelta(days=1), data))
    assert state.features(D + timedelta(days=1)) == before
    with pytest.raises(InvalidEventError):
        state.apply(used(D) | {"time": ""})


@pytest.mark.parametrize("path", example_files(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_registry_example_applies(path: Any) -> None:
    example = json.loads(path.read_text())
    state = AccountState()
    state.apply(example)
    day = date.fromisoformat(example["time"][:10])
    values = state.features(day).values
    assert len(values) == len(FEATURE_NAMES)
    assert all(math.isfinite(v) for v in values)


def test_state_saved_in_the_first_format_reads_back_with_no_feature_totals() -> None:
    """Changelogs written before lifetime feature totals (format 1) still restore."""
    from churnguard.scoring import features as f

    state = AccountState()
    state.apply(used(D, "u1", "reports", 3))
    state.feature_totals.clear()  # format 1 had none
    raw = state.to_bytes()
    head = f._HEADER.unpack_from(raw)
    assert head[-1] == 0
    v1 = f._HEADER_V1.pack(1, *head[1:-1]) + raw[f._HEADER.size :]
    assert AccountState.from_bytes(zlib.compress(v1)) == state


def test_lifetime_feature_totals_count_every_use_and_survive_serialisation() -> None:
    state = AccountState()
    for day in range(100):  # longer than any window
        state.apply(used(D + timedelta(days=day), "u1", "reports", 2))
    assert state.feature_totals == {"reports": 200}
    assert AccountState.from_bytes(state.to_bytes()).feature_totals == {"reports": 200}
