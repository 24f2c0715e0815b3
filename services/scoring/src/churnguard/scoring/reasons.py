"""Reason codes: which group of features moves an account's churn probability, in words.

Each feature belongs to exactly one :class:`ReasonGroup`. The model's reasons for an
account are found by replacing a whole group by its reference values (the training
population's medians, stored in the model artifact) and measuring how much the
probability falls: a group whose typical values would lower the risk is a reason for it.
Groups rather than single features, because correlated features (7- and 30-day activity)
would each look harmless alone while together they carry the signal.

Codes are stable identifiers for playbooks (``usage_trend_down``); sentences state the
account's own values, ready for a CSM.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from churnguard.scoring.features import FEATURE_NAMES, STICKY_FEATURES

Values = Mapping[str, float]


def _n(value: float) -> int:
    return round(value)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _usage_trend(v: Values) -> str:
    month = math.exp(v["usage_trend_30d"]) - 1
    if v["activity_7d"] == 0 and v["usage_trend_7d"] == 0:
        week = "no use in the last 14 days"
    else:
        week = f"{math.exp(v['usage_trend_7d']) - 1:+.0%} over the last 7 days against the 7 before"
    return f"Usage {week}, {month:+.0%} over 30 days against the 30 before"


def _activity(v: Values) -> str:
    return (
        f"{_plural(_n(v['activity_30d']), 'feature use')} in 30 days "
        f"({_n(v['activity_7d'])} in the last 7), active on {_n(v['active_days_30d'])} of 30 days"
    )


def _users(v: Values) -> str:
    users = f"{_plural(_n(v['active_users_30d']), 'user')} active in 30 days"
    return f"{users}, {_n(v['active_users_7d'])} in the last 7"


def _inactive(v: Values) -> str:
    days = _n(v["days_since_active"])
    return "Active today" if days == 0 else f"No product activity for {_plural(days, 'day')}"


def _breadth(v: Values) -> str:
    return f"{_plural(_n(v['features_used_30d']), 'product feature')} used in the last 30 days"


def _sticky(v: Values) -> str:
    n = _n(v["sticky_unadopted"])
    names = ", ".join(f.replace("_", " ") for f in STICKY_FEATURES)
    return f"{n} of the {len(STICKY_FEATURES)} sticky features ({names}) unused in 90 days"


def _seats(v: Values) -> str:
    if v["seat_utilisation"] < 0 or v["seats_purchased"] <= 0:
        return "Seat assignment unknown"
    bought = _n(v["seats_purchased"])
    used = _n(v["seat_utilisation"] * v["seats_purchased"])
    return f"{used} of {_plural(bought, 'seat')} assigned ({v['seat_utilisation']:.0%})"


def _support(v: Values) -> str:
    tickets = _n(v["tickets_30d"])
    text = f"{_plural(tickets, 'support ticket')} in 30 days"
    if tickets:
        s = v["ticket_sentiment_30d"]
        tone = "negative" if s < -0.25 else ("positive" if s > 0.25 else "neutral")
        text += f", {tone} in tone ({s:+.2f})"
    text += f"; {_n(v['open_tickets'])} open"
    if v["tickets_unresolved_30d"] > 0:
        text += f", {_n(v['tickets_unresolved_30d'])} closed unresolved"
    return text


def _payments(v: Values) -> str:
    text = f"{_plural(_n(v['failed_payments_60d']), 'failed payment')} in 60 days"
    unpaid = _n(v["unpaid_invoices"])
    if unpaid:
        text += f"; {_plural(unpaid, 'invoice')} unpaid"
        if v["unpaid_hard_declines"] > 0:
            text += " after a hard decline (the card must be updated)"
    return text


def _nps(v: Values) -> str:
    if v["has_nps"] <= 0:
        return "No NPS answer"
    score = _n(v["last_nps"])
    band = "detractor" if score <= 6 else ("passive" if score <= 8 else "promoter")
    return f"Last NPS answer {score} ({band})"


def _csat(v: Values) -> str:
    if v["has_csat"] <= 0:
        return "No CSAT answer"
    return f"Last CSAT answer {_n(v['last_csat'])} of 5"


def _mrr_change(v: Values) -> str:
    return f"MRR {v['mrr_change_90d']:+.0%} over 90 days"


def _mrr(v: Values) -> str:
    return "MRR unknown" if v["mrr"] < 0 else f"MRR {v['mrr']:,.0f}"


def _renewal(v: Values) -> str:
    plan = {1.0: "annual plan", 0.0: "monthly plan"}.get(
        v["billing_annual"], "billing interval unknown"
    )
    days = _n(v["days_to_renewal"])
    return (
        f"{plan}, renewal in {_plural(days, 'day')}"
        if days >= 0
        else f"{plan}, renewal date unknown"
    )


def _tenure(v: Values) -> str:
    return f"Customer for {_plural(_n(v['tenure_days']), 'day')}"


@dataclass(frozen=True)
class ReasonGroup:
    code: str
    """The reason code when this group raises the risk."""
    features: tuple[str, ...]
    describe: Callable[[Values], str]
    applies: Callable[[Values, Values], bool]
    """Whether the account's values (first) against the reference (second) are what the
    code says. A group that raises the risk but does not fit its code (a long-standing
    customer whose tenure the model happens to dislike is not a ``new_account``) is left
    out rather than named wrongly."""


def _below(*names: str) -> Callable[[Values, Values], bool]:
    return lambda v, ref: any(v[n] < ref[n] for n in names)


def _above(*names: str) -> Callable[[Values, Values], bool]:
    return lambda v, ref: any(v[n] > ref[n] for n in names)


NEW_ACCOUNT_DAYS = 180
RENEWAL_WINDOW_DAYS = 90

REASON_GROUPS: tuple[ReasonGroup, ...] = (
    ReasonGroup(
        "usage_trend_down",
        ("usage_trend_7d", "usage_trend_30d"),
        _usage_trend,
        lambda v, _: v["usage_trend_7d"] < 0 or v["usage_trend_30d"] < 0,
    ),
    ReasonGroup(
        "low_activity",
        ("activity_1d", "activity_7d", "activity_30d", "active_days_30d"),
        _activity,
        _below("activity_7d", "activity_30d", "active_days_30d"),
    ),
    ReasonGroup(
        "few_active_users",
        ("active_users_1d", "active_users_7d", "active_users_30d"),
        _users,
        _below("active_users_7d", "active_users_30d"),
    ),
    ReasonGroup("inactive", ("days_since_active",), _inactive, _above("days_since_active")),
    ReasonGroup("narrow_adoption", ("features_used_30d",), _breadth, _below("features_used_30d")),
    ReasonGroup(
        "sticky_features_unadopted",
        ("sticky_unadopted",),
        _sticky,
        lambda v, ref: (
            v["sticky_unadopted"] > 0 and v["sticky_unadopted"] >= ref["sticky_unadopted"]
        ),
    ),
    ReasonGroup(
        "low_seat_utilisation",
        ("seat_utilisation", "seats_purchased"),
        _seats,
        lambda v, _: 0 <= v["seat_utilisation"] < 0.8,
    ),
    ReasonGroup(
        "support_friction",
        ("tickets_30d", "ticket_sentiment_30d", "open_tickets", "tickets_unresolved_30d"),
        _support,
        lambda v, _: v["tickets_30d"] > 0 or v["open_tickets"] > 0,
    ),
    ReasonGroup(
        "payment_failed",
        ("failed_payments_60d", "unpaid_invoices", "unpaid_hard_declines"),
        _payments,
        lambda v, _: v["failed_payments_60d"] > 0 or v["unpaid_invoices"] > 0,
    ),
    ReasonGroup(
        "low_nps",
        ("last_nps", "has_nps"),
        _nps,
        lambda v, _: v["has_nps"] > 0 and v["last_nps"] <= 8,
    ),
    ReasonGroup(
        "low_csat",
        ("last_csat", "has_csat"),
        _csat,
        lambda v, _: v["has_csat"] > 0 and v["last_csat"] <= 3,
    ),
    ReasonGroup("mrr_down", ("mrr_change_90d",), _mrr_change, lambda v, _: v["mrr_change_90d"] < 0),
    ReasonGroup("low_mrr", ("mrr",), _mrr, lambda v, ref: 0 <= v["mrr"] < ref["mrr"]),
    ReasonGroup(
        "renewal_approaching",
        ("billing_annual", "days_to_renewal"),
        _renewal,
        lambda v, _: v["billing_annual"] == 1 and 0 <= v["days_to_renewal"] <= RENEWAL_WINDOW_DAYS,
    ),
    ReasonGroup(
        "new_account",
        ("tenure_days",),
        _tenure,
        lambda v, _: v["tenure_days"] < NEW_ACCOUNT_DAYS,
    ),
)

GROUP_COLUMNS: tuple[tuple[int, ...], ...] = tuple(
    tuple(FEATURE_NAMES.index(f) for f in group.features) for group in REASON_GROUPS
)
