"""Signals: the threshold crossings scoring tells playbooks about (pure logic, no Kafka).

Two kinds of input make signals:

* **a score** (:func:`score_signals`): the risk tier, with hysteresis, so a probability
  hovering at a threshold does not flap; a sharp usage drop; an expansion opportunity
  (seats nearly full); a renewal 90/60/30 days out while at risk. Each fires once per
  episode: it re-arms only after the condition has clearly cleared.
* **an event** (:func:`event_signals`): a failed payment, a detractor NPS answer. One
  signal per such event.

Ids are deterministic (the account, the kind, and what makes the occurrence unique), so
a worker that restarts from its changelog and processes the same records again produces
the same ids, and consumers drop the repeats.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Final

from churnguard.common.events.derived import RISK_TIERS, RiskTier
from churnguard.scoring.features import STICKY_FEATURES, AccountFeatures, AccountState
from churnguard.scoring.model import TIER_THRESHOLDS, Score

SOURCE: Final = "/scoring"

TIER_MARGIN: Final = 0.03
"""Hysteresis: a tier is entered at its threshold but left only below threshold - margin."""
USAGE_DROP_RATIO: Final = 0.5
"""A week with at most half the uses of the week before is a sharp drop..."""
USAGE_DROP_MIN_PREVIOUS: Final = 20
"""...when the week before had at least this many uses (noise below)."""
USAGE_DROP_REARM_RATIO: Final = 0.8
"""The usage-drop signal re-arms once a week has at least 80% of the week before."""
EXPANSION_UTILISATION: Final = 0.9
EXPANSION_REARM_UTILISATION: Final = 0.8
EXPANSION_MIN_SEATS: Final = 3
RENEWAL_WINDOWS: Final = (90, 60, 30)
RENEWAL_RISK_TIERS: Final = frozenset({"at_risk", "critical"})
DETRACTOR_MAX: Final = 6
FEATURE_USE_MILESTONES: Final = (100, 1_000, 10_000, 100_000, 1_000_000)
"""Lifetime uses of one product feature worth congratulating (``feature_uses.<feature>``)."""
ACTIVE_USER_MILESTONES: Final = (10, 25, 50, 100, 250, 500, 1_000)
"""Users active in 30 days (``active_users_30d``)."""
FAILED_PAYMENT: Final = "churnguard.billing.invoice_payment_failed"
NPS: Final = "churnguard.feedback.nps_submitted"


@dataclass(slots=True)
class SignalState:
    """What one account's signals remember between scores (serialised with its state)."""

    tier: str = ""
    """Current tier after hysteresis; "" before the first score."""
    probability: float = -1.0
    health: int = -1
    top_reason: str = ""
    scores: int = 0
    """Scores emitted so far: numbers the next score's id."""
    tier_changes: int = 0
    scored_day: int = -1
    """Day (ordinal) of the features the last score was computed from."""
    usage_drop_armed: bool = True
    expansion_armed: bool = True
    renewal_day: int = -1
    """The renewal the windows below refer to."""
    renewal_windows: int = 0
    """Bit per RENEWAL_WINDOWS entry already signalled for ``renewal_day``."""
    pending: bool = False
    """Touched since its last emitted score: recovered accounts with it set are scored."""
    last_nps: int = -1
    milestones: dict[str, int] = field(default_factory=dict)
    """Milestone name → the highest threshold signalled (each fires once per account)."""

    def to_list(self) -> list[Any]:
        return [
            self.tier,
            round(self.probability, 6),
            self.health,
            self.top_reason,
            self.scores,
            self.tier_changes,
            self.scored_day,
            int(self.usage_drop_armed),
            int(self.expansion_armed),
            self.renewal_day,
            self.renewal_windows,
            int(self.pending),
            self.last_nps,
            self.milestones,
        ]

    @classmethod
    def from_list(cls, items: Sequence[Any]) -> SignalState:
        milestones = dict(items[13]) if len(items) > 13 else {}  # older states have none
        (
            tier,
            probability,
            health,
            top_reason,
            scores,
            tier_changes,
            scored_day,
            drop,
            expansion,
            renewal_day,
            windows,
            pending,
            last_nps,
        ) = items[:13]
        return cls(
            tier,
            probability,
            health,
            top_reason,
            scores,
            tier_changes,
            scored_day,
            bool(drop),
            bool(expansion),
            renewal_day,
            windows,
            bool(pending),
            last_nps,
            milestones,
        )


def _threshold(tier: str) -> float:
    for threshold, name in TIER_THRESHOLDS:
        if name == tier:
            return threshold
    return 0.0  # healthy: no lower bound


def raw_tier(probability: float) -> RiskTier:
    for threshold, tier in TIER_THRESHOLDS:
        if probability >= threshold:
            return tier
    return "healthy"


def next_tier(current: str, probability: float, margin: float = TIER_MARGIN) -> RiskTier:
    """The tier after ``probability``, with hysteresis.

    Worse tiers are entered at their threshold (risk is reported at once); the current
    tier is left downwards only when the probability is ``margin`` below its threshold,
    and then to the tier ``probability + margin`` falls in. A probability oscillating
    around a threshold by less than the margin therefore changes the tier at most once.
    """
    if not current:
        return raw_tier(probability)
    up = raw_tier(probability)
    if RISK_TIERS.index(up) > RISK_TIERS.index(current):
        return up
    if probability < _threshold(current) - margin:
        return raw_tier(probability + margin)
    return current  # type: ignore[return-value]


def event_id(kind: str, account: str, occurrence: str) -> str:
    """A deterministic id: readable when short, hashed when the account id is long."""
    readable = f"sig:{kind}:{account}:{occurrence}"
    if len(readable) <= 128:
        return readable
    digest = hashlib.blake2b(f"{account}|{occurrence}".encode(), digest_size=16).hexdigest()
    return f"sig:{kind}:{digest}"


def _event(
    type_: str, account: str, event_id_: str, time: str, data: dict[str, Any]
) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event_id_,
        "source": SOURCE,
        "type": type_,
        "time": time,
        "subject": account,
        "datacontenttype": "application/json",
        "schemaversion": 1,
        "data": data,
    }


def scored_event(
    account: str,
    score: Score,
    model_version: str,
    state: SignalState,
    time: str,
    features: AccountFeatures | None = None,
    unadopted: Sequence[str] = (),
    values: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The AccountScored event of ``score`` (numbered by ``state.scores``, then counted),
    with the features it was computed from for conditions downstream."""
    state.scores += 1
    data: dict[str, Any] = {
        "churn_probability": round(score.churn_probability, 6),
        "health": score.health,
        "tier": state.tier,
        "reasons": [r.model_dump() for r in score.reasons],
        "model_version": model_version,
    }
    if features is not None:
        rounded = values if values is not None else [round(v, 6) for v in features.values]
        data["features"] = dict(zip(features.names, rounded, strict=True))
        data["unadopted_sticky_features"] = list(unadopted)
    return _event(
        "churnguard.scores.account_scored",
        account,
        event_id("score", account, str(state.scores)),
        time,
        data,
    )


def worth_emitting(state: SignalState, probability: float, health: int, tier: str) -> bool:
    """A new score is published when it says something new: the first score, another tier
    or health, or a probability moved by at least a point."""
    return (
        state.scores == 0
        or tier != state.tier
        or health != state.health
        or abs(probability - state.probability) >= 0.01
    )


def score_signals(
    account: str,
    features: AccountFeatures,
    account_state: AccountState,
    score: Score,
    model_version: str,
    state: SignalState,
    time: str,
    values: Sequence[float] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """The score event (if worth emitting) and the signals of a new score, as
    ``(topic kind, event)`` pairs with kind ``scores`` or ``signals``; updates ``state``.
    ``values``: the features rounded to 6 digits as the score event carries them (computed
    for a whole batch at once by the caller), else they are rounded here."""
    out: list[tuple[str, dict[str, Any]]] = []
    tier = next_tier(state.tier, score.churn_probability)
    previous_tier, previous_health = state.tier, state.health
    if worth_emitting(state, score.churn_probability, score.health, tier):
        state.tier = tier
        unadopted = account_state.unadopted_sticky_features(features.as_of)
        out.append(
            (
                "scores",
                scored_event(
                    account, score, model_version, state, time, features, unadopted, values
                ),
            )
        )
        state.probability = round(score.churn_probability, 6)
        state.health = score.health
        state.top_reason = score.reasons[0].code if score.reasons else ""
    state.tier = tier
    state.scored_day = features.as_of
    state.pending = False
    if previous_tier and tier != previous_tier:
        state.tier_changes += 1
        out.append(
            (
                "signals",
                _event(
                    "churnguard.signals.risk_tier_crossed",
                    account,
                    event_id("tier", account, str(state.tier_changes)),
                    time,
                    {
                        "from_tier": previous_tier,
                        "to_tier": tier,
                        "churn_probability": round(score.churn_probability, 6),
                        "health": score.health,
                        "previous_health": max(previous_health, 0),
                        "reasons": [r.model_dump() for r in score.reasons],
                    },
                ),
            )
        )
    out.extend(("signals", e) for e in _usage_drop(account, features, account_state, state, time))
    out.extend(("signals", e) for e in _expansion(account, features, state, time))
    out.extend(("signals", e) for e in _renewal(account, features, score, state, time))
    out.extend(("signals", e) for e in _milestones(account, features, account_state, state, time))
    return out


def _usage_drop(
    account: str,
    features: AccountFeatures,
    account_state: AccountState,
    state: SignalState,
    time: str,
) -> list[dict[str, Any]]:
    days = account_state.daily_uses(features.as_of, 14)
    previous, current = sum(days[:7]), sum(days[7:])
    if previous <= 0:
        return []
    if not state.usage_drop_armed:
        if current >= USAGE_DROP_REARM_RATIO * previous:
            state.usage_drop_armed = True
        return []
    if previous < USAGE_DROP_MIN_PREVIOUS or current > USAGE_DROP_RATIO * previous:
        return []
    state.usage_drop_armed = False
    day = date.fromordinal(features.as_of).isoformat()
    return [
        _event(
            "churnguard.signals.usage_dropped",
            account,
            event_id("usage_drop", account, day),
            time,
            {
                "window_days": 7,
                "previous": previous,
                "current": current,
                "drop_ratio": round((previous - current) / previous, 4),
                "unadopted_sticky_features": list(
                    account_state.unadopted_sticky_features(features.as_of)
                ),
            },
        )
    ]


def _expansion(
    account: str, features: AccountFeatures, state: SignalState, time: str
) -> list[dict[str, Any]]:
    seats = features["seats_purchased"]
    utilisation = features["seat_utilisation"]
    if seats < EXPANSION_MIN_SEATS or utilisation < 0:
        return []
    if not state.expansion_armed:
        if utilisation < EXPANSION_REARM_UTILISATION:
            state.expansion_armed = True
        return []
    if utilisation < EXPANSION_UTILISATION:
        return []
    state.expansion_armed = False
    day = date.fromordinal(features.as_of).isoformat()
    return [
        _event(
            "churnguard.signals.expansion_signal",
            account,
            event_id("expansion", account, day),
            time,
            {"reason": "seats_near_limit", "seats_utilisation": round(utilisation, 4)},
        )
    ]


def _renewal(
    account: str, features: AccountFeatures, score: Score, state: SignalState, time: str
) -> list[dict[str, Any]]:
    days = int(features["days_to_renewal"])
    if days < 0 or days > RENEWAL_WINDOWS[0]:
        return []
    renewal_day = features.as_of + days
    if abs(renewal_day - state.renewal_day) > 3:  # another renewal (small drift is the same)
        state.renewal_day, state.renewal_windows = renewal_day, 0
    if state.tier not in RENEWAL_RISK_TIERS:
        return []
    # the narrowest window the renewal is in; wider ones it skipped are not sent late
    window_index = max(i for i, w in enumerate(RENEWAL_WINDOWS) if days <= w)
    bit = 1 << window_index
    if state.renewal_windows & bit:
        return []
    state.renewal_windows |= (bit << 1) - 1  # this window and every wider one
    window = RENEWAL_WINDOWS[window_index]
    mrr = features["mrr"]
    return [
        _event(
            "churnguard.signals.renewal_at_risk",
            account,
            event_id("renewal", account, f"{window}d:{date.fromordinal(renewal_day)}"),
            time,
            {
                "days_to_renewal": days,
                "window_days": window,
                "churn_probability": round(score.churn_probability, 6),
                "tier": state.tier,
                "mrr": max(0, round(mrr * 100)) if mrr >= 0 else 0,
            },
        )
    ]


def _milestones(
    account: str,
    features: AccountFeatures,
    account_state: AccountState,
    state: SignalState,
    time: str,
) -> list[dict[str, Any]]:
    """Milestones crossed since the last score, each once per account; a jump over several
    thresholds signals the highest (a backfilled history is not congratulated four times)."""
    reached: list[tuple[str, int]] = []
    for feature, total in account_state.feature_totals.items():
        reached.append((f"feature_uses.{feature}", _highest(FEATURE_USE_MILESTONES, total)))
        if feature in STICKY_FEATURES:
            reached.append((f"first_use.{feature}", 1))
    reached.append(
        ("active_users_30d", _highest(ACTIVE_USER_MILESTONES, int(features["active_users_30d"])))
    )
    reached.append(("customer_years", max(0, int(features["tenure_days"])) // 365))
    out = []
    done = state.milestones
    for name, value in reached:
        if value <= done.get(name, 0):
            continue
        done[name] = value
        out.append(
            _event(
                "churnguard.signals.milestone_reached",
                account,
                event_id("milestone", account, f"{name}:{value}"),
                time,
                {"milestone": name, "value": value},
            )
        )
    return out


def _highest(thresholds: Sequence[int], value: int) -> int:
    """The highest threshold ``value`` reached, 0 for none."""
    best = 0
    for threshold in thresholds:
        if value >= threshold:
            best = threshold
    return best


def event_signals(
    event: dict[str, Any],
    account_state: AccountState,
    state: SignalState,
    as_of: int,
) -> list[dict[str, Any]]:
    """Signals one incoming event makes by itself: a failed payment, a detractor answer.

    Call after the event was applied to ``account_state`` (the counts include it).
    """
    kind = event.get("type")
    if kind == FAILED_PAYMENT:
        data = event["data"]
        features = account_state.features(max(as_of, account_state.max_day))
        return [
            _event(
                "churnguard.signals.payment_failed",
                event["subject"],
                event_id("payment_failed", event["subject"], event["id"]),
                event["time"],
                {
                    "invoice_id": data["invoice_id"],
                    "amount_due": data["amount_due"],
                    "currency": data["currency"],
                    "decline_code": data.get("decline_code"),
                    "decline_kind": data.get("decline_kind", "soft"),
                    "attempt_count": data.get("attempt_count", 1),
                    "failed_payments_60d": max(1, int(features["failed_payments_60d"])),
                    "churn_probability": (
                        round(state.probability, 6) if state.probability >= 0 else None
                    ),
                },
            )
        ]
    if kind == NPS:
        data = event["data"]
        score = data.get("score")
        previous = state.last_nps
        if isinstance(score, int):
            state.last_nps = score
        if not isinstance(score, int) or score > DETRACTOR_MAX:
            return []
        return [
            _event(
                "churnguard.signals.detractor_nps",
                event["subject"],
                event_id("detractor", event["subject"], event["id"]),
                event["time"],
                {
                    "score": score,
                    "comment": data.get("comment"),
                    "user_id": data.get("user_id"),
                    "previous_score": previous if previous >= 0 else None,
                },
            )
        ]
    return []


def iso_time(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
