"""Holdout, cool-down, budget and quiet hours as pure functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from churnguard.playbooks.guardrails import (
    ContactBudget,
    QuietHours,
    cooling_down,
    holdout_bucket,
    in_holdout,
    zone,
)

ACCOUNTS = [f"acct_{i:05d}" for i in range(20_000)]


def test_holdout_is_deterministic_and_about_the_asked_share() -> None:
    held = [a for a in ACCOUNTS if in_holdout("onboarding-usage-drop", a, 10)]
    assert held == [a for a in ACCOUNTS if in_holdout("onboarding-usage-drop", a, 10)]
    assert 0.09 < len(held) / len(ACCOUNTS) < 0.11
    assert not any(in_holdout("p", a, 0) for a in ACCOUNTS[:1000])


def test_holdout_is_per_playbook_and_monotone_in_percent() -> None:
    five = {a for a in ACCOUNTS if in_holdout("p", a, 5)}
    ten = {a for a in ACCOUNTS if in_holdout("p", a, 10)}
    other = {a for a in ACCOUNTS if in_holdout("q", a, 10)}
    assert five < ten
    assert len(ten & other) < 0.2 * len(ten)  # ~10% of 10%, not the same accounts


def test_holdout_bucket_is_stable_across_processes() -> None:
    # pinned: Python's salted hash() would change it on every run, and any change of the
    # function reshuffles the holdout groups of every running experiment
    assert holdout_bucket("p", "acct_1") == pytest.approx(0.15391, abs=1e-5)


def test_cooldown() -> None:
    t = datetime(2026, 3, 2, 12, tzinfo=UTC)
    assert cooling_down(t, t + timedelta(days=6, hours=23), timedelta(days=7))
    assert not cooling_down(t, t + timedelta(days=7), timedelta(days=7))
    assert not cooling_down(None, t, timedelta(days=7))
    assert not cooling_down(t, t, timedelta(0))


def test_budget() -> None:
    budget = ContactBudget(3, timedelta(days=7))
    assert [budget.allows(n) for n in range(5)] == [True, True, True, False, False]


def test_quiet_hours_wrapping_midnight_defer_to_their_end_in_local_time() -> None:
    quiet = QuietHours.parse("20:00-08:00")
    berlin = zone("Europe/Berlin")
    # 21:30 in Berlin (20:30 UTC in winter) → 08:00 Berlin next day
    assert quiet.deferral(datetime(2026, 1, 14, 20, 30, tzinfo=UTC), berlin) == datetime(
        2026, 1, 15, 7, 0, tzinfo=UTC
    )
    # 05:00 Berlin → 08:00 the same day
    assert quiet.deferral(datetime(2026, 1, 15, 4, 0, tzinfo=UTC), berlin) == datetime(
        2026, 1, 15, 7, 0, tzinfo=UTC
    )
    assert quiet.deferral(datetime(2026, 1, 15, 9, 0, tzinfo=UTC), berlin) is None


def test_quiet_hours_end_is_local_across_daylight_saving() -> None:
    quiet = QuietHours.parse("22:00-07:00")
    new_york = zone("America/New_York")
    # the night clocks move forward (8 March 2026): 07:00 local is 11:00 UTC, not 12:00
    assert quiet.deferral(datetime(2026, 3, 8, 3, 0, tzinfo=UTC), new_york) == datetime(
        2026, 3, 8, 11, 0, tzinfo=UTC
    )


def test_quiet_hours_within_a_day_and_bad_input() -> None:
    lunch = QuietHours.parse("12:00-13:00")
    assert lunch.contains(datetime(2026, 1, 1, 12, 30).time())
    assert not lunch.contains(datetime(2026, 1, 1, 13, 0).time())
    with pytest.raises(ValueError, match="HH:MM-HH:MM"):
        QuietHours.parse("8pm-8am")
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        zone("Mars/Olympus")
