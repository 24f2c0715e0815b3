"""Dunning timing: weekdays, near paydays, inside the window; hard declines never retried."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from churnguard.playbooks.dunning import attempt_time, next_step, retry_time
from churnguard.playbooks.guardrails import zone
from churnguard.playbooks.loader import load_dir
from churnguard.playbooks.settings import SHIPPED_DIR
from churnguard.playbooks.spec import DunningSpec, TimingSpec

UTC_ZONE = zone("UTC")
TIMING = TimingSpec()
WINDOW = timedelta(days=14)


def shipped_policy() -> DunningSpec:
    playbook = load_dir(SHIPPED_DIR).get("failed-payment-dunning")
    assert playbook is not None
    (policy,) = playbook.actions
    assert isinstance(policy, DunningSpec)
    return policy


def at(day: str, hour: int = 0) -> datetime:
    return datetime.fromisoformat(day).replace(hour=hour, tzinfo=UTC)


def test_a_weekend_retry_moves_to_monday_at_the_local_hour() -> None:
    # Wed 4 Mar 2026 + 3 d = Sat 7 Mar → Mon 9 Mar 10:00
    when = retry_time(
        at("2026-03-04", 15),
        timedelta(days=3),
        tz=UTC_ZONE,
        timing=TIMING,
        window=WINDOW,
        not_before=at("2026-03-04", 15),
    )
    assert when == at("2026-03-09", 10)


def test_a_retry_just_before_a_payday_moves_to_it() -> None:
    # Tue 10 Mar 2026 + 3 d = Fri 13 Mar; the 15th is a Sunday though → stays Friday?
    # No: 13 + 2 = 15 (Sunday) is a payday in reach, then the weekend rule moves it to Mon 16
    when = retry_time(
        at("2026-03-10", 9),
        timedelta(days=3),
        tz=UTC_ZONE,
        timing=TIMING,
        window=WINDOW,
        not_before=at("2026-03-10", 9),
    )
    assert when == at("2026-03-16", 10)
    # Thu 26 Mar + 4 d = Mon 30 Mar; 1 Apr (Wed) is two days ahead → Wed 1 Apr
    when = retry_time(
        at("2026-03-26", 9),
        timedelta(days=4),
        tz=UTC_ZONE,
        timing=TIMING,
        window=WINDOW,
        not_before=at("2026-03-26", 9),
    )
    assert when == at("2026-04-01", 10)


def test_retries_stay_inside_the_window_and_after_the_previous_one() -> None:
    failed = at("2026-03-02", 12)  # a Monday
    when = retry_time(
        failed,
        timedelta(days=13, hours=20),
        tz=UTC_ZONE,
        timing=TIMING,
        window=WINDOW,
        not_before=failed,
    )
    assert when <= failed + WINDOW
    assert when.weekday() < 5
    later = at("2026-03-20", 8)
    assert (
        retry_time(
            failed, timedelta(days=2), tz=UTC_ZONE, timing=TIMING, window=WINDOW, not_before=later
        )
        == later
    )


def test_quick_retries_are_not_moved() -> None:
    failed = at("2026-03-07", 23)  # a Saturday night
    assert retry_time(
        failed, timedelta(hours=4), tz=UTC_ZONE, timing=TIMING, window=WINDOW, not_before=failed
    ) == failed + timedelta(hours=4)


def test_the_local_hour_is_the_accounts() -> None:
    tokyo = zone("Asia/Tokyo")
    when = retry_time(
        at("2026-03-02", 12),
        timedelta(days=2),
        tz=tokyo,
        timing=TIMING,
        window=WINDOW,
        not_before=at("2026-03-02", 12),
    )
    assert when.astimezone(tokyo).hour == 10


def test_the_shipped_schedule_spreads_over_two_weeks_on_weekdays() -> None:
    policy = shipped_policy()
    for start in (at(f"2026-03-{d:02d}", 14) for d in range(1, 29)):
        times: list[datetime] = []
        for n in range(1, 5):
            t = attempt_time(
                policy,
                case_decline_code="insufficient_funds",
                failed_at=start,
                attempt=n,
                tz=UTC_ZONE,
                previous_attempt_at=times[-1] if times else None,
                now=times[-1] if times else start,
            )
            times.append(t)
        assert all(t.weekday() < 5 for t in times), (start, times)
        assert times == sorted(times)
        assert timedelta(days=7) < times[-1] - start <= WINDOW
    assert len(policy.delays_for("processing_error")) == 4
    assert policy.delays_for("some_new_code") == policy.delays_for(None)


def test_paydays_draw_retries_to_them() -> None:
    policy = shipped_policy()
    unaimed = policy.model_copy(update={"timing": policy.timing.model_copy(update={"paydays": []})})

    def share_after_paydays(p: DunningSpec) -> float:
        near = total = 0
        for month in ("2026-04", "2026-05", "2026-06"):
            for d in range(1, 29):
                start = at(f"{month}-{d:02d}", 14)
                for n in range(1, 5):
                    t = attempt_time(
                        p,
                        case_decline_code="insufficient_funds",
                        failed_at=start,
                        attempt=n,
                        tz=UTC_ZONE,
                        previous_attempt_at=None,
                        now=start,
                    )
                    total += 1
                    near += t.day in (1, 2, 3, 15, 16, 17)
        return near / total

    # 6 days in ~30 follow a payday closely: ~20% of unaimed retries land there
    assert share_after_paydays(unaimed) < 0.22
    assert share_after_paydays(policy) > 0.26


def test_next_step() -> None:
    policy = shipped_policy()
    assert next_step(policy, "insufficient_funds", 0, "insufficient_funds") == "retry"
    assert next_step(policy, "insufficient_funds", 3, "insufficient_funds") == "retry"
    assert next_step(policy, "insufficient_funds", 4, "insufficient_funds") == "conclude"
    assert next_step(policy, "insufficient_funds", 1, "expired_card") == "card_update"
    assert next_step(policy, "insufficient_funds", 0, "stolen_card") == "card_update"
