"""Guard rails, as pure functions: holdout, cool-down, contact budget, quiet hours.

They decide with values the caller read inside the decision's transaction (the last
firing, the touches in the window), so the checks and the writes that follow them are
one atomic step per account.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


def holdout_bucket(playbook: str, account_id: str) -> float:
    """A stable number in [0, 1) per (playbook, account): the same in every process and run.

    SHA-256 rather than Python's ``hash`` (salted per process). The playbook name is part
    of the key so that each playbook holds out its own accounts: an account held out of
    one playbook is not held out of all of them.
    """
    digest = hashlib.sha256(f"{playbook}\x00{account_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_holdout(playbook: str, account_id: str, percent: float) -> bool:
    """Whether the account is in the playbook's holdout group.

    Monotone in ``percent``: raising a holdout from 5% to 10% keeps every account that was
    held out held out, so a running experiment stays clean when it is widened.
    """
    return percent > 0 and holdout_bucket(playbook, account_id) * 100 < percent


def cooling_down(last_fired: datetime | None, at: datetime, cooldown: timedelta) -> bool:
    """True while the playbook fired for the account less than ``cooldown`` before ``at``."""
    return last_fired is not None and cooldown > timedelta(0) and at - last_fired < cooldown


@dataclass(frozen=True)
class ContactBudget:
    """At most ``limit`` touches per ``window`` per account, for one audience."""

    limit: int
    window: timedelta

    def allows(self, touches_in_window: int) -> bool:
        return touches_in_window < self.limit

    def window_start(self, at: datetime) -> datetime:
        return at - self.window


@lru_cache(maxsize=1024)
def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; ValueError naming it if unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r} (use an IANA name such as Europe/Berlin)"
        ) from None


def zone_or(name: str | None, default: str) -> ZoneInfo:
    """The account's zone, or the default when it names none or an unknown one."""
    if name:
        try:
            return zone(name)
        except ValueError:
            pass
    return zone(default)


@dataclass(frozen=True)
class QuietHours:
    """A local-time window (``20:00-08:00``, may wrap midnight) when messages wait."""

    start: time
    end: time

    @classmethod
    def parse(cls, text: str) -> QuietHours:
        try:
            a, b = (part.strip() for part in text.split("-"))
            start, end = time.fromisoformat(a), time.fromisoformat(b)
        except ValueError:
            raise ValueError(
                f"quiet hours {text!r}: expected HH:MM-HH:MM, e.g. 20:00-08:00"
            ) from None
        if start == end:
            raise ValueError(f"quiet hours {text!r}: start and end are equal")
        return cls(start, end)

    def contains(self, local: time) -> bool:
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    def deferral(self, at: datetime, tz: ZoneInfo) -> datetime | None:
        """When a message due at ``at`` may go: None if now, else the end of quiet hours.

        The end is computed in local wall-clock time, so it is right across daylight
        saving changes (08:00 local is 08:00 whether the night had 23 or 25 hours).
        """
        local = at.astimezone(tz)
        if not self.contains(local.time().replace(tzinfo=None)):
            return None
        day = local.date()
        if self.start > self.end and local.time().replace(tzinfo=None) >= self.start:
            day += timedelta(days=1)
        end = datetime.combine(day, self.end, tzinfo=tz)
        return end.astimezone(at.tzinfo)
