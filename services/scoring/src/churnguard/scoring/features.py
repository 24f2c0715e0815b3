"""Per-account features: the one definition the online worker and offline training share.

:class:`AccountState` is an account's incremental state. The online worker feeds it every
event of the account as :func:`churnguard.common.envelope.unpack` returns it (a plain
dict: ``id``, ``type``, ``time``, ``subject``, ``data``); training replays a simulated
world through the same class (:mod:`churnguard.scoring.training`). Either way the model
sees features computed by the same code, so what it learned offline is what it scores
online.

Time is event time, in whole days (UTC dates of the events' ``time``):

* The account's *watermark* is the latest event day it has seen. An event up to
  :data:`GRACE_DAYS` days older than the watermark still lands in its own day (a topic that
  lags another, a client that batches); an older one is counted in ``late_events`` and
  ignored, so a replayed backlog cannot rewrite windows that were already scored.
* Windows (1/7/30 days, trends) are taken as of the end of a day, ``as_of``, and roll
  with time alone: the features of a silent account change from one day to the next
  without any new event. ``as_of`` is meant to be at or after the watermark (today, or
  the snapshot day in training); activity on days after ``as_of`` is never counted, while
  the slower facts (seats, MRR, last NPS) are the latest known.

Memory is bounded: daily activity in a ring of :data:`RING_DAYS` days; one entry per user
active in the last 32 days (a CRC-32 of the user id and a 32-day activity bitmask); one per
feature used in the last :data:`ADOPTION_DAYS` days; tickets, failed payments and MRR
changes only as long as a window needs them. :meth:`AccountState.to_bytes` is a compact
binary form for the online worker's table changelog.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from functools import lru_cache
from typing import Any, Final

import numpy as np

STICKY_FEATURES: Final[tuple[str, ...]] = (
    "integrations",
    "automations",
    "api",
    "scheduled_reports",
)
"""Product features whose adoption keeps customers (the catalogue's sticky ones). A constant
here, not an import of the simulator: it describes the product, which the scoring service
knows without the simulator installed."""

GRACE_DAYS: Final = 2
"""An event up to this many days older than the account's latest event day still counts."""
RING_DAYS: Final = 64
"""Days of daily activity kept: the 30-day window and the 30 days before it, plus grace."""
USER_DAYS: Final = 32
"""Days of per-user activity kept (the longest distinct-user window is 30 days)."""
ADOPTION_DAYS: Final = 90
"""A feature counts as adopted when used within this many days."""
TICKET_DAYS: Final = 30
PAYMENT_DAYS: Final = 60
MRR_CHANGE_DAYS: Final = 90
PRUNE_EVERY_DAYS: Final = 8
"""Entries older than every window are dropped when the watermark crosses such a boundary."""
STALE_TICKET_DAYS: Final = 180
"""Open tickets the help desk never closed are forgotten after this long."""
MAX_TRACKED_FEATURES: Final = 64
MAX_OPEN_INVOICES: Final = 24
MAX_MRR_POINTS: Final = 32
DAYS_CAP: Final = 365
"""Caps ``days_since_active`` (and stands for "never active" when nothing was seen)."""

FEATURE_DESCRIPTIONS: Final[Mapping[str, str]] = {
    "activity_1d": "uses of product features on the as-of day",
    "activity_7d": "uses of product features in the last 7 days",
    "activity_30d": "uses of product features in the last 30 days",
    "active_users_1d": "distinct users active on the as-of day",
    "active_users_7d": "distinct users active in the last 7 days",
    "active_users_30d": "distinct users active in the last 30 days",
    "active_days_30d": "days with any activity in the last 30 days",
    "usage_trend_7d": "ln((uses in last 7 days + 1) / (uses in the 7 days before + 1))",
    "usage_trend_30d": "ln((uses in last 30 days + 1) / (uses in the 30 days before + 1))",
    "days_since_active": "days since the last activity (since first seen if never; cap 365)",
    "features_used_30d": "distinct product features used in the last 30 days (breadth)",
    "sticky_unadopted": "sticky features not used in the last 90 days (0-4)",
    "seats_purchased": "seats bought (-1 unknown)",
    "seat_utilisation": "seats assigned / seats bought (-1 unknown)",
    "tickets_30d": "support tickets opened in the last 30 days",
    "ticket_sentiment_30d": "mean VADER compound sentiment of those tickets (-1..1; 0 if none)",
    "open_tickets": "support tickets open at the end of the as-of day",
    "tickets_unresolved_30d": "tickets closed in the last 30 days with the requester unsatisfied",
    "failed_payments_60d": "failed payment attempts in the last 60 days",
    "unpaid_invoices": "invoices with a failed payment or past their due date, still unpaid",
    "unpaid_hard_declines": "unpaid invoices whose last decline was hard (retrying cannot help)",
    "last_nps": "last NPS answer 0-10 (-1 none)",
    "has_nps": "1 if the account ever answered NPS",
    "last_csat": "last CSAT answer 1-5 (-1 none)",
    "has_csat": "1 if the account ever answered CSAT",
    "mrr": "current monthly recurring revenue, currency units (-1 unknown)",
    "mrr_change_90d": "relative MRR change over 90 days (0 when unknown)",
    "billing_annual": "1 annual, 0 monthly, -1 unknown (inferred from invoices if not stated)",
    "days_to_renewal": "days to the next renewal (-1 unknown)",
    "tenure_days": "days since the subscription started (since first seen if not stated)",
}

FEATURE_NAMES: Final[tuple[str, ...]] = tuple(FEATURE_DESCRIPTIONS)
"""The model's contract: the order of the feature vector. Changing it needs a new model."""

_INDEX: Final[Mapping[str, int]] = {name: i for i, name in enumerate(FEATURE_NAMES)}

_U32 = 0xFFFFFFFF
_USER_MASK = (1 << USER_DAYS) - 1
_NONE = -1
_DAY_ORDINALS: dict[str, int] = {}
_FEATURE_USED: Final = "churnguard.usage.feature_used"


def day_ordinal(time: str) -> int:
    """The proleptic ordinal of the UTC date of an ISO-8601 time.

    A UTC time (``...Z``, as the simulator and pydantic write them) is looked up by its
    date prefix: a stream holds few distinct days, so that costs one dict lookup. A time
    with another offset is parsed and converted to UTC first.
    """
    if time[-1:] != "Z" and len(time) > 10 and not time.endswith("+00:00"):
        moment = datetime.fromisoformat(time)
        if moment.tzinfo is not None:
            moment = moment.astimezone(UTC)
        return moment.toordinal()
    prefix = time[:10]
    ordinal = _DAY_ORDINALS.get(prefix)
    if ordinal is None:
        if len(_DAY_ORDINALS) > 4096:
            _DAY_ORDINALS.clear()
        ordinal = _DAY_ORDINALS[prefix] = date.fromisoformat(prefix).toordinal()
    return ordinal


def _as_ordinal(as_of: date | int) -> int:
    return as_of.toordinal() if isinstance(as_of, date) else as_of


def _hash(value: str) -> int:
    # stable across processes (Python's str hash is salted per process)
    return zlib.crc32(value.encode())


@lru_cache(maxsize=1)
def _analyzer() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@lru_cache(maxsize=2048)
def ticket_sentiment(subject: str, text: str) -> float:
    """VADER compound sentiment (-1 very negative .. 1 very positive) of a ticket's words.

    Computed once per ticket when it is applied; help desks send many identical
    templated texts, hence the cache.
    """
    scores = _analyzer().polarity_scores(f"{subject}. {text}")
    return float(scores["compound"])


class InvalidEventError(ValueError):
    """An event of a known type whose attributes or data cannot be read."""


@dataclass(frozen=True, slots=True)
class AccountFeatures:
    """The feature vector of one account as of the end of one day, in FEATURE_NAMES order."""

    as_of: int
    """Day ordinal (``date.toordinal()``)."""
    values: tuple[float, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return FEATURE_NAMES

    def __getitem__(self, name: str) -> float:
        return self.values[_INDEX[name]]

    def as_dict(self) -> dict[str, float]:
        return dict(zip(FEATURE_NAMES, self.values, strict=True))

    def vector(self) -> np.ndarray:
        return np.asarray(self.values, dtype=np.float32)

    @property
    def as_of_date(self) -> date:
        return date.fromordinal(self.as_of)


def feature_matrix(rows: Iterable[AccountFeatures]) -> np.ndarray:
    """Stack feature vectors into an ``(n, len(FEATURE_NAMES))`` float32 matrix."""
    matrix = np.array([r.values for r in rows], dtype=np.float32)
    return matrix.reshape(-1, len(FEATURE_NAMES))


def _add_months(day: date, months: int) -> date:
    month0 = day.month - 1 + months
    year, month = day.year + month0 // 12, month0 % 12 + 1
    for dom in (day.day, 30, 29, 28):
        try:
            return date(year, month, min(day.day, dom))
        except ValueError:
            continue
    raise AssertionError("unreachable: every month has 28 days")


@dataclass(slots=True)
class AccountState:
    """One account's incremental feature state (see the module docstring).

    Not thread-safe; one account's events are applied in the order its partition gives.
    Unknown event types are ignored; a known type with unreadable data raises
    :class:`InvalidEventError` (the watermark may already have moved to its day, nothing
    else has changed).
    """

    max_day: int = _NONE
    first_day: int = _NONE
    late_events: int = 0
    last_active_day: int = _NONE
    uses: list[int] = field(default_factory=lambda: [0] * RING_DAYS)
    """Feature uses per day, at index ``day % RING_DAYS``; valid for the RING_DAYS up to
    ``max_day``."""
    users: dict[int, int] = field(default_factory=dict)
    """CRC-32 of the user id → ``last_day << 32 | mask``; bit i of mask: active on last_day - i."""
    feature_days: dict[str, int] = field(default_factory=dict)
    """Feature key → last day it was used."""
    feature_totals: dict[str, int] = field(default_factory=dict)
    """Feature key → uses since the account was first seen (for milestones, not the model);
    bounded like ``feature_days``."""
    seats_purchased: int = _NONE
    seats_used: int = _NONE
    tickets: list[list[int]] = field(default_factory=list)
    """[opened day, sentiment in thousandths, CRC-32 of ticket id, closed day or -1,
    1 if closed unsatisfied]."""
    failures: list[int] = field(default_factory=list)
    """Days of failed payment attempts."""
    invoices: dict[int, list[int]] = field(default_factory=dict)
    """Unpaid invoices: CRC-32 of invoice id → [created day, due day or -1, failed attempts,
    1 if the last decline was hard]."""
    last_nps: int = _NONE
    nps_day: int = _NONE
    last_csat: int = _NONE
    csat_day: int = _NONE
    interval_months: int = 0
    """12 annual, 1 monthly, 0 unknown (yet)."""
    last_invoice_day: int = _NONE
    last_invoice_amount: int = _NONE
    mrr_points: list[list[int]] = field(default_factory=list)
    """[day, MRR in minor units] from the day it took effect, ordered by day."""
    mrr_from_subscription: bool = False
    subscription_start_day: int = _NONE
    cancelled_day: int = _NONE

    # -- applying events -----------------------------------------------------------------

    def apply(self, event: dict[str, Any]) -> None:
        """Fold one event into the state (a structured CloudEvent as a plain dict).

        Feature-used events, most of the stream, take an inlined path: a day lookup by the
        time's date prefix, a ring slot, one user entry and one feature entry.
        """
        kind = event.get("type", "")
        if kind != _FEATURE_USED:
            handler = _HANDLERS.get(kind)
            if handler is not None:
                self._apply_with(handler, event)
            return
        try:
            data = event["data"]
            time = event["time"]
            day = _DAY_ORDINALS.get(time[:10]) if time[-1] == "Z" else None
            if day is None:
                day = day_ordinal(time)
            if day > self.max_day:
                self._advance(day)
            elif day < self.max_day - GRACE_DAYS:
                self.late_events += 1
                return
            elif day < self.first_day:
                self.first_day = day
            user_hash = zlib.crc32(data["user_id"].encode())
            feature = data["feature"]
            count = data.get("count", 1)
            if type(feature) is not str or type(count) is not int or count < 1:
                raise TypeError(f"feature {feature!r} and count {count!r}: a name, a count >= 1")
            self.uses[day % RING_DAYS] += count
        except (LookupError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidEventError(
                f"{kind} {event.get('id')}: {type(exc).__name__}: {exc}"
            ) from exc
        if day > self.last_active_day:
            self.last_active_day = day
        users = self.users  # _user_active, inlined
        packed = users.get(user_hash)
        if packed is None:
            users[user_hash] = day << 32 | 1
        elif day > (last := packed >> 32):
            shift = day - last
            mask = ((packed & _U32) << shift | 1) & _USER_MASK if shift < USER_DAYS else 1
            users[user_hash] = day << 32 | mask
        elif last - day < USER_DAYS:
            users[user_hash] = packed | 1 << (last - day)
        days = self.feature_days
        known = days.get(feature)
        if known is None:
            if len(days) >= MAX_TRACKED_FEATURES:
                del days[min(days, key=days.__getitem__)]
            days[feature[:100]] = day
        elif known < day:
            days[feature] = day
        totals = self.feature_totals
        total = totals.get(feature)
        if total is not None:
            totals[feature] = total + count
        else:
            if len(totals) >= MAX_TRACKED_FEATURES:
                del totals[min(totals, key=totals.__getitem__)]
            totals[feature[:100]] = count

    def _apply_with(self, handler: Handler, event: dict[str, Any]) -> None:
        try:
            day = day_ordinal(event["time"])
            if day > self.max_day:
                self._advance(day)
            elif day < self.max_day - GRACE_DAYS:
                self.late_events += 1
                return
            elif day < self.first_day:
                self.first_day = day
            handler(self, event["data"], day)
        except (LookupError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidEventError(
                f"{event.get('type')} {event.get('id')}: {type(exc).__name__}: {exc}"
            ) from exc

    def apply_all(self, events: Iterable[dict[str, Any]]) -> None:
        for event in events:
            self.apply(event)

    def _advance(self, day: int) -> None:
        """Move the watermark to ``day``: clear ring slots of the skipped days, prune."""
        uses = self.uses
        if self.max_day == _NONE:
            self.first_day = day
        elif day - self.max_day >= RING_DAYS:
            uses[:] = [0] * RING_DAYS
        else:
            for d in range(self.max_day + 1, day + 1):
                uses[d % RING_DAYS] = 0
        if day // PRUNE_EVERY_DAYS != self.max_day // PRUNE_EVERY_DAYS:
            self._prune(day)
        self.max_day = day

    def _prune(self, day: int) -> None:
        if self.users:
            oldest = day - USER_DAYS
            self.users = {h: p for h, p in self.users.items() if p >> 32 > oldest}
        if self.feature_days:
            oldest = day - ADOPTION_DAYS
            self.feature_days = {k: d for k, d in self.feature_days.items() if d > oldest}
        if self.failures and self.failures[0] <= day - PAYMENT_DAYS - GRACE_DAYS:
            self.failures = [d for d in self.failures if d > day - PAYMENT_DAYS - GRACE_DAYS]
        if self.tickets:
            window = day - TICKET_DAYS - GRACE_DAYS
            self.tickets = [
                t
                for t in self.tickets
                if t[0] > window
                or (t[3] == _NONE and t[0] > day - STALE_TICKET_DAYS)
                or t[3] > window
            ]
        points = self.mrr_points
        if len(points) > 1:
            # keep the value in effect 90 days (plus grace) ago and everything after
            horizon = day - MRR_CHANGE_DAYS - GRACE_DAYS
            first = 0
            while first + 1 < len(points) and points[first + 1][0] <= horizon:
                first += 1
            if first:
                del points[:first]

    def _user_active(self, user_hash: int, day: int) -> None:
        users = self.users
        packed = users.get(user_hash)
        if packed is None:
            users[user_hash] = day << 32 | 1
            return
        last = packed >> 32
        if day > last:
            shift = day - last
            mask = ((packed & _U32) << shift | 1) & _USER_MASK if shift < USER_DAYS else 1
            users[user_hash] = day << 32 | mask
        elif last - day < USER_DAYS:
            users[user_hash] = packed | 1 << (last - day)

    def _on_track(self, data: dict[str, Any], day: int) -> None:
        self.uses[day % RING_DAYS] += 1
        if day > self.last_active_day:
            self.last_active_day = day
        user = data.get("user_id")
        if user is not None:
            self._user_active(zlib.crc32(user.encode()), day)

    def _on_seats_changed(self, data: dict[str, Any], day: int) -> None:
        self.seats_purchased = int(data["seats_purchased"])
        self.seats_used = int(data["seats_used"])

    def _on_invoice_created(self, data: dict[str, Any], day: int) -> None:
        invoice = _hash(data["invoice_id"])
        due = data.get("due_at")
        invoices = self.invoices
        if len(invoices) >= MAX_OPEN_INVOICES:
            del invoices[min(invoices, key=lambda k: invoices[k][0])]
        invoices[invoice] = [day, day_ordinal(due) if due else _NONE, 0, 0]
        if data.get("billing_reason") not in (None, "subscription_cycle", "subscription_create"):
            return  # manual and proration invoices say nothing about the billing cycle
        amount = int(data["amount_due"])
        if self.interval_months == 0 and self.last_invoice_day != _NONE:
            gap = day - self.last_invoice_day
            if 20 <= gap <= 45:
                self.interval_months = 1
            elif gap >= 300:
                self.interval_months = 12
        if day >= self.last_invoice_day:
            self.last_invoice_day = day
            self.last_invoice_amount = amount
        if not self.mrr_from_subscription and self.interval_months:
            self._mrr_at(day, amount // self.interval_months)

    def _on_invoice_paid(self, data: dict[str, Any], day: int) -> None:
        self.invoices.pop(_hash(data["invoice_id"]), None)

    def _on_payment_failed(self, data: dict[str, Any], day: int) -> None:
        self.failures.append(day)
        if len(self.failures) > 1 and self.failures[-2] > day:
            self.failures.sort()
        invoice = self.invoices.get(_hash(data["invoice_id"]))
        if invoice is not None:
            invoice[2] += 1
            invoice[3] = int(data.get("decline_kind") == "hard")

    def _on_subscription(self, data: dict[str, Any], day: int) -> None:
        self.interval_months = 12 if data["interval"] == "year" else 1
        self.seats_purchased = int(data["quantity"])
        if not self.mrr_from_subscription:
            self.mrr_points.clear()  # invoice-derived estimates give way to the real MRR
            self.mrr_from_subscription = True
        self._mrr_at(day, int(data["mrr"]))

    def _on_subscription_created(self, data: dict[str, Any], day: int) -> None:
        self._on_subscription(data, day)
        self.subscription_start_day = day
        self.cancelled_day = _NONE

    def _on_subscription_cancelled(self, data: dict[str, Any], day: int) -> None:
        self._on_subscription(data, day)
        self.cancelled_day = day

    def _mrr_at(self, day: int, mrr: int) -> None:
        points = self.mrr_points
        if points and points[-1][0] > day:  # within grace, behind a later change
            points.append([day, mrr])
            points.sort(key=lambda p: p[0])
        elif points and points[-1][0] == day:
            points[-1][1] = mrr
        else:
            points.append([day, mrr])
        if len(points) > MAX_MRR_POINTS:
            del points[0]

    def _on_nps(self, data: dict[str, Any], day: int) -> None:
        if day >= self.nps_day:
            self.last_nps, self.nps_day = int(data["score"]), day

    def _on_csat(self, data: dict[str, Any], day: int) -> None:
        if day >= self.csat_day:
            self.last_csat, self.csat_day = int(data["score"]), day

    def _on_ticket_opened(self, data: dict[str, Any], day: int) -> None:
        sentiment = ticket_sentiment(data["subject"], data["text"])
        self.tickets.append([day, round(sentiment * 1000), _hash(data["ticket_id"]), _NONE, 0])

    def _on_ticket_closed(self, data: dict[str, Any], day: int) -> None:
        ticket = _hash(data["ticket_id"])
        for t in self.tickets:
            if t[2] == ticket and t[3] == _NONE:
                t[3] = day
                t[4] = int(data.get("satisfied") is False)
                return

    # -- reading features ----------------------------------------------------------------

    @property
    def cancellation_pending(self) -> bool:
        """The customer has cancelled (the subscription may run to its period end)."""
        return self.cancelled_day != _NONE

    def unadopted_sticky_features(self, as_of: date | int) -> tuple[str, ...]:
        """Sticky features the account has not used in the last ADOPTION_DAYS days."""
        a = _as_ordinal(as_of)
        return tuple(
            f
            for f in STICKY_FEATURES
            if not a - ADOPTION_DAYS < self.feature_days.get(f, _NONE) <= a
        )

    def daily_uses(self, as_of: date | int, days: int) -> list[int]:
        """Uses per day for the ``days`` days ending with ``as_of``, oldest first."""
        a = _as_ordinal(as_of)
        lo_valid, hi_valid = self.max_day - RING_DAYS + 1, self.max_day
        uses = self.uses
        return [
            uses[d % RING_DAYS] if lo_valid <= d <= hi_valid else 0
            for d in range(a - days + 1, a + 1)
        ]

    def active_users(self, as_of: date | int) -> tuple[int, int, int]:
        """Distinct users active in the 1, 7 and 30 days ending with ``as_of``."""
        a = _as_ordinal(as_of)
        n1 = n7 = n30 = 0
        for packed in self.users.values():
            ago = a - (packed >> 32)
            mask = packed & _U32
            if ago < 0:  # active after as_of: keep only the days up to it
                mask >>= -ago
                ago = 0
            # bit i of mask: active on day a - ago - i
            if ago < 30 and mask & ((1 << (30 - ago)) - 1):
                n30 += 1
                if ago < 7 and mask & ((1 << (7 - ago)) - 1):
                    n7 += 1
                    if ago == 0 and mask & 1:
                        n1 += 1
        return n1, n7, n30

    def features(self, as_of: date | int) -> AccountFeatures:
        """The feature vector as of the end of day ``as_of`` (a date or a day ordinal)."""
        a = _as_ordinal(as_of)
        daily = self.daily_uses(a, 2 * 30)
        last30 = daily[30:]
        activity_30d = sum(last30)
        activity_7d = sum(daily[-7:])
        prev_7d = sum(daily[-14:-7])
        prev_30d = sum(daily[:30])
        users_1d, users_7d, users_30d = self.active_users(a)

        if self.last_active_day != _NONE and self.last_active_day <= a:
            days_since_active = min(a - self.last_active_day, DAYS_CAP)
        elif self.last_active_day != _NONE:
            days_since_active = 0
        elif self.first_day != _NONE:
            days_since_active = min(max(a - self.first_day, 0), DAYS_CAP)
        else:
            days_since_active = DAYS_CAP

        features_used = sum(1 for d in self.feature_days.values() if a - 30 < d <= a)

        utilisation = -1.0
        if self.seats_purchased > 0 and self.seats_used >= 0:
            utilisation = self.seats_used / self.seats_purchased

        tickets_30d = 0
        sentiment_sum = 0
        open_tickets = unresolved = 0
        for opened, sentiment, _, closed, unsatisfied in self.tickets:
            if a - 30 < opened <= a:
                tickets_30d += 1
                sentiment_sum += sentiment
            if opened <= a and (closed == _NONE or closed > a):
                open_tickets += 1
            if unsatisfied and a - 30 < closed <= a:
                unresolved += 1
        mean_sentiment = sentiment_sum / tickets_30d / 1000 if tickets_30d else 0.0

        failed = sum(1 for d in self.failures if a - PAYMENT_DAYS < d <= a)
        unpaid = hard = 0
        for created, due, attempts, last_hard in self.invoices.values():
            if created <= a and (attempts > 0 or _NONE < due < a):
                unpaid += 1
                hard += last_hard

        interval = self._interval(a)
        mrr_now = self._mrr(a, interval)
        mrr_then = self._mrr(a - MRR_CHANGE_DAYS, interval, earliest=True)
        mrr_change = (mrr_now - mrr_then) / mrr_then if mrr_now >= 0 and mrr_then > 0 else 0.0

        if self.subscription_start_day != _NONE:
            tenure = a - self.subscription_start_day
        elif self.first_day != _NONE:
            tenure = a - self.first_day
        else:
            tenure = 0

        values = (
            float(daily[-1]),
            float(activity_7d),
            float(activity_30d),
            float(users_1d),
            float(users_7d),
            float(users_30d),
            float(sum(1 for u in last30 if u)),
            math.log((activity_7d + 1) / (prev_7d + 1)),
            math.log((activity_30d + 1) / (prev_30d + 1)),
            float(days_since_active),
            float(features_used),
            float(len(self.unadopted_sticky_features(a))),
            float(self.seats_purchased),
            utilisation,
            float(tickets_30d),
            mean_sentiment,
            float(open_tickets),
            float(unresolved),
            float(failed),
            float(unpaid),
            float(hard),
            float(self.last_nps),
            float(self.last_nps != _NONE),
            float(self.last_csat),
            float(self.last_csat != _NONE),
            mrr_now / 100 if mrr_now >= 0 else -1.0,
            mrr_change,
            {12: 1.0, 1: 0.0}.get(interval, -1.0),
            float(self._days_to_renewal(a, interval)),
            float(max(tenure, 0)),
        )
        return AccountFeatures(a, values)

    def _interval(self, a: int) -> int:
        """Billing interval in months; inferred when no subscription event stated it.

        A monthly account is invoiced every month, so no cycle invoice for more than 45 days
        of observed history means an annual one.
        """
        if self.interval_months:
            return self.interval_months
        since = self.last_invoice_day if self.last_invoice_day != _NONE else self.first_day
        if since != _NONE and a - since > 45:
            return 12
        return 0

    def _mrr(self, day: int, interval: int, *, earliest: bool = False) -> int:
        """MRR in effect at the end of ``day`` (minor units), or -1 when unknown.

        ``earliest``: if nothing was known that day, the first value known afterwards.
        """
        points = self.mrr_points
        value = _NONE
        for point_day, mrr in points:
            if point_day > day:
                break
            value = mrr
        if value == _NONE and points and earliest:
            value = points[0][1]
        if value == _NONE and not points and self.last_invoice_amount != _NONE:
            value = self.last_invoice_amount // (interval or 1)
        return value

    def _days_to_renewal(self, a: int, interval: int) -> int:
        if interval == 0:
            return _NONE
        anchor = self.last_invoice_day
        if anchor == _NONE or anchor < self.subscription_start_day:
            anchor = self.subscription_start_day
        if anchor == _NONE or anchor > a:
            return _NONE
        start, today = date.fromordinal(anchor), date.fromordinal(a)
        months = (today.year - start.year) * 12 + today.month - start.month
        months -= months % interval
        renewal = _add_months(start, months)
        while renewal <= today:
            months += interval
            renewal = _add_months(start, months)
        return (renewal - today).days

    # -- serialisation -------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """A compact binary form for the online worker's changelog (uncompressed: the
        worker compresses whole buckets of accounts at once, which compresses better and
        costs far less than one zlib stream per account)."""
        out = bytearray(
            _HEADER.pack(
                _FORMAT_VERSION,
                self.max_day,
                self.first_day,
                self.late_events,
                self.last_active_day,
                self.seats_purchased,
                self.seats_used,
                self.last_nps,
                self.nps_day,
                self.last_csat,
                self.csat_day,
                self.interval_months,
                self.last_invoice_day,
                self.subscription_start_day,
                self.cancelled_day,
                int(self.mrr_from_subscription),
                self.last_invoice_amount,
                len(self.users),
                len(self.feature_days),
                len(self.tickets),
                len(self.failures),
                len(self.invoices),
                len(self.mrr_points),
                len(self.feature_totals),
            )
        )
        out += struct.pack(f"<{RING_DAYS}I", *self.uses)
        for h, packed in self.users.items():
            out += _USER.pack(h, packed >> 32, packed & _U32)
        for key, day in self.feature_days.items():
            encoded = key.encode()
            out += struct.pack("<H", len(encoded)) + encoded + struct.pack("<i", day)
        for t in self.tickets:
            out += _TICKET.pack(*t)
        out += struct.pack(f"<{len(self.failures)}i", *self.failures)
        for h, inv in self.invoices.items():
            out += _INVOICE.pack(h, *inv)
        for day, mrr in self.mrr_points:
            out += _MRR.pack(day, mrr)
        for key, total in self.feature_totals.items():
            encoded = key.encode()
            out += struct.pack("<H", len(encoded)) + encoded + struct.pack("<Q", total)
        return bytes(out)

    @classmethod
    def from_bytes(cls, blob: bytes) -> AccountState:
        # format 1 was zlib-compressed (a zlib stream starts with 0x78); 2 on are raw
        raw = zlib.decompress(blob) if blob[:1] == b"\x78" else blob
        if raw[0] == 1:  # before feature totals: read as none so far
            head = (*_HEADER_V1.unpack_from(raw), 0)
            pos = _HEADER_V1.size
        elif raw[0] == _FORMAT_VERSION:
            head = _HEADER.unpack_from(raw)
            pos = _HEADER.size
        else:
            raise ValueError(f"account state format {raw[0]}, expected {_FORMAT_VERSION}")
        (
            _,
            max_day,
            first_day,
            late_events,
            last_active_day,
            seats_purchased,
            seats_used,
            last_nps,
            nps_day,
            last_csat,
            csat_day,
            interval_months,
            last_invoice_day,
            subscription_start_day,
            cancelled_day,
            mrr_from_subscription,
            last_invoice_amount,
            n_users,
            n_features,
            n_tickets,
            n_failures,
            n_invoices,
            n_mrr,
            n_totals,
        ) = head
        uses = list(struct.unpack_from(f"<{RING_DAYS}I", raw, pos))
        pos += 4 * RING_DAYS
        users = {}
        for _ in range(n_users):
            h, last, mask = _USER.unpack_from(raw, pos)
            users[h] = last << 32 | mask
            pos += _USER.size
        feature_days = {}
        for _ in range(n_features):
            (size,) = struct.unpack_from("<H", raw, pos)
            key = raw[pos + 2 : pos + 2 + size].decode()
            (feature_days[key],) = struct.unpack_from("<i", raw, pos + 2 + size)
            pos += 6 + size
        tickets = []
        for _ in range(n_tickets):
            tickets.append(list(_TICKET.unpack_from(raw, pos)))
            pos += _TICKET.size
        failures = list(struct.unpack_from(f"<{n_failures}i", raw, pos))
        pos += 4 * n_failures
        invoices = {}
        for _ in range(n_invoices):
            h, *inv = _INVOICE.unpack_from(raw, pos)
            invoices[h] = inv
            pos += _INVOICE.size
        mrr_points = []
        for _ in range(n_mrr):
            mrr_points.append(list(_MRR.unpack_from(raw, pos)))
            pos += _MRR.size
        feature_totals = {}
        for _ in range(n_totals):
            (size,) = struct.unpack_from("<H", raw, pos)
            key = raw[pos + 2 : pos + 2 + size].decode()
            (feature_totals[key],) = struct.unpack_from("<Q", raw, pos + 2 + size)
            pos += 10 + size
        if pos != len(raw):
            raise ValueError(f"account state has {len(raw) - pos} trailing bytes")
        return cls(
            max_day=max_day,
            first_day=first_day,
            late_events=late_events,
            last_active_day=last_active_day,
            uses=uses,
            users=users,
            feature_days=feature_days,
            feature_totals=feature_totals,
            seats_purchased=seats_purchased,
            seats_used=seats_used,
            tickets=tickets,
            failures=failures,
            invoices=invoices,
            last_nps=last_nps,
            nps_day=nps_day,
            last_csat=last_csat,
            csat_day=csat_day,
            interval_months=interval_months,
            last_invoice_day=last_invoice_day,
            last_invoice_amount=last_invoice_amount,
            mrr_points=mrr_points,
            mrr_from_subscription=bool(mrr_from_subscription),
            subscription_start_day=subscription_start_day,
            cancelled_day=cancelled_day,
        )


_FORMAT_VERSION: Final = 2
_HEADER = struct.Struct("<B14iBq7I")
_HEADER_V1 = struct.Struct("<B14iBq6I")
_USER = struct.Struct("<IiI")
_TICKET = struct.Struct("<ihIiB")
_INVOICE = struct.Struct("<IiiHB")
_MRR = struct.Struct("<iq")

Handler = Callable[[AccountState, dict[str, Any], int], None]
_HANDLERS: Final[dict[str, Handler]] = {
    "churnguard.usage.track": AccountState._on_track,
    "churnguard.usage.seats_changed": AccountState._on_seats_changed,
    "churnguard.billing.invoice_created": AccountState._on_invoice_created,
    "churnguard.billing.invoice_paid": AccountState._on_invoice_paid,
    "churnguard.billing.invoice_payment_failed": AccountState._on_payment_failed,
    "churnguard.billing.subscription_created": AccountState._on_subscription_created,
    "churnguard.billing.subscription_updated": AccountState._on_subscription,
    "churnguard.billing.subscription_cancelled": AccountState._on_subscription_cancelled,
    "churnguard.feedback.nps_submitted": AccountState._on_nps,
    "churnguard.feedback.csat_submitted": AccountState._on_csat,
    "churnguard.feedback.ticket_opened": AccountState._on_ticket_opened,
    "churnguard.feedback.ticket_closed": AccountState._on_ticket_closed,
}
"""Event types that change features besides feature_used (inlined in ``apply``). Others
(identify, group, refunds, derived events, action outcomes) cost one dict lookup."""
