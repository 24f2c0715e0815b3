"""Dunning timing (pure): when each retry of a failed payment goes.

The schedule gives delays after the failure per decline code (``insufficient_funds: [2d,
5d, 9d, 13d]``). Day-scale delays are then placed with the smart-timing rules, in the
account's time zone:

1. **Paydays**: a retry that lands up to ``payday_window_days`` before a payday (the 1st
   and 15th by default; a 31 means the month's last day) moves to that payday, when
   salaries and client payments arrive and insufficient-funds declines recover most.
2. **Weekends**: a retry on a Saturday or Sunday moves to Monday (issuers and finance
   teams are back; fraud rules are stricter at weekends), or to the Friday before when
   Monday is past the dunning window.
3. **Hour**: at ``local_hour`` (10:00 by default), after the overnight batch runs.
4. **Window**: never after the window's end (the last weekday before it), never before
   the moment of scheduling, and at least the schedule's spacing (up to a day) after
   the previous attempt.

Delays under a day (``4h`` after a processing error) are taken as they are: the point is
to retry soon.
"""

from __future__ import annotations

import calendar
from collections.abc import Sequence
from datetime import date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from churnguard.common.events.billing import decline_kind
from churnguard.playbooks.spec import DunningSpec, TimingSpec

MAX_GAP_FLOOR = timedelta(days=1)
"""Two attempts on one invoice are at least as far apart as their delays in the schedule,
up to a day (smart timing may move one onto the next's day otherwise)."""


def _paydays(day: date, paydays: Sequence[int]) -> set[int]:
    last = calendar.monthrange(day.year, day.month)[1]
    return {min(p, last) for p in paydays}


def retry_time(
    failed_at: datetime,
    delay: timedelta,
    *,
    tz: ZoneInfo,
    timing: TimingSpec,
    window: timedelta,
    not_before: datetime,
) -> datetime:
    """When the retry ``delay`` after ``failed_at`` goes (see the module docstring)."""
    window_end = failed_at + window
    if delay < timedelta(days=1):
        return max(failed_at + delay, not_before)
    day = (failed_at + delay).astimezone(tz).date()
    for ahead in range(timing.payday_window_days + 1):
        candidate = day + timedelta(days=ahead)
        if candidate.day in _paydays(candidate, timing.paydays):
            if _at(candidate, timing, tz) <= window_end:
                day = candidate
            break
    if timing.avoid_weekends and day.weekday() >= 5:
        monday = day + timedelta(days=7 - day.weekday())
        day = (
            monday
            if _at(monday, timing, tz) <= window_end
            else day - timedelta(days=day.weekday() - 4)
        )
    when = _at(day, timing, tz)
    if when > window_end:
        when = _last_weekday_before(window_end, timing, tz)
    return max(when, not_before)


def _at(day: date, timing: TimingSpec, tz: ZoneInfo) -> datetime:
    return datetime.combine(day, time(timing.local_hour), tzinfo=tz)


def _last_weekday_before(end: datetime, timing: TimingSpec, tz: ZoneInfo) -> datetime:
    day = end.astimezone(tz).date()
    for _ in range(7):
        when = _at(day, timing, tz)
        if when <= end and not (timing.avoid_weekends and day.weekday() >= 5):
            return when
        day -= timedelta(days=1)
    return end


NextStep = Literal["retry", "card_update", "conclude"]


def next_step(
    policy: DunningSpec,
    case_decline_code: str | None,
    attempts_made: int,
    latest_decline_code: str | None,
) -> NextStep:
    """After a failure (the first, or a retry's): retry again, ask for a card, or stop.

    A hard decline, first or later, is never retried. The number of retries follows the
    schedule of the case's first decline code, so the plan a customer was told about
    holds even when a later attempt fails with another soft code.
    """
    if decline_kind(latest_decline_code) == "hard":
        return "card_update"
    if attempts_made < len(policy.delays_for(case_decline_code)):
        return "retry"
    return "conclude"


def attempt_time(
    policy: DunningSpec,
    *,
    case_decline_code: str | None,
    failed_at: datetime,
    attempt: int,
    tz: ZoneInfo,
    previous_attempt_at: datetime | None,
    now: datetime,
) -> datetime:
    """When retry number ``attempt`` (1-based) of a case goes."""
    delays = policy.delays_for(case_decline_code)
    delay = delays[attempt - 1]
    floor = now
    if previous_attempt_at is not None:
        spacing = delay - delays[attempt - 2] if attempt >= 2 else delay
        floor = max(now, previous_attempt_at + min(spacing, MAX_GAP_FLOOR))
    return retry_time(
        failed_at, delay, tz=tz, timing=policy.timing, window=policy.window, not_before=floor
    )
