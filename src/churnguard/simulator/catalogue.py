"""The simulated company: what it sells, to whom, and how its customers behave.

Every number here is a parameter of the world, chosen so that the default world lands in
the ranges of ``docs/simulator.md`` (logo churn, involuntary share, NPS, NRR), with the
sources of those ranges given there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    name: str
    share: float
    seats_median: float
    seats_sigma: float
    plans: tuple[tuple[str, float], ...]
    """(plan, probability) within the segment."""
    annual_share: float
    card_share: float
    """Share paying by card (the rest by invoice/transfer, which does not decline)."""
    card_failure: float
    """Probability that one card charge fails."""
    monthly_churn: float
    """Base monthly voluntary churn at average satisfaction."""
    active_rate: float
    """Daily share of users active on a weekday at full satisfaction."""


SEGMENTS: tuple[Segment, ...] = (
    Segment(
        "smb", 0.70, 4, 0.6, (("starter", 0.6), ("growth", 0.4)), 0.25, 0.97, 0.035, 0.020, 0.42
    ),
    Segment(
        "mid", 0.25, 20, 0.5, (("growth", 0.5), ("business", 0.5)), 0.50, 0.75, 0.025, 0.010, 0.36
    ),
    Segment(
        "ent",
        0.05,
        70,
        0.5,
        (("business", 0.3), ("enterprise", 0.7)),
        0.85,
        0.20,
        0.015,
        0.004,
        0.28,
    ),
)

PLAN_PRICES: dict[str, int] = {
    "starter": 1500,
    "growth": 3000,
    "business": 5000,
    "enterprise": 8000,
}
"""Monthly list price per seat, in cents. Annual plans bill 12× the same per-seat price."""
PLANS = tuple(PLAN_PRICES)
PLAN_INDEX = {name: i for i, name in enumerate(PLANS)}
PRICE_BY_PLAN = np.array([PLAN_PRICES[p] for p in PLANS], dtype=np.int64)

ADDON_MRR = 250_00
"""The analytics add-on: a flat monthly price on top of the seats, for mid-market and up."""

CSM_ARR_THRESHOLD_CENTS = 10_000_00
"""Accounts at or above this ARR ($10k) get a named CSM owner."""
CSMS = tuple(f"csm_{n}" for n in ("ana", "ben", "chloe", "dev", "eli", "farah", "gus", "hana"))

# (key, sticky): sticky features are the ones whose adoption lowers churn
FEATURES: tuple[tuple[str, bool], ...] = (
    ("dashboards", False),
    ("reports", False),
    ("exports", False),
    ("comments", False),
    ("templates", False),
    ("alerts", False),
    ("mobile_app", False),
    ("sso", False),
    ("integrations", True),
    ("automations", True),
    ("api", True),
    ("scheduled_reports", True),
)
FEATURE_KEYS = tuple(k for k, _ in FEATURES)
STICKY_MASK = sum(1 << i for i, (_, sticky) in enumerate(FEATURES) if sticky)
BASIC_MASK = sum(1 << i for i, (k, _) in enumerate(FEATURES) if k in ("dashboards", "reports"))

PERSONAS = ("power", "steady", "declining", "never_activated", "seasonal")
POWER, STEADY, DECLINING, NEVER_ACTIVATED, SEASONAL = range(5)
PERSONA_SHARES = np.array([0.15, 0.47, 0.20, 0.08, 0.10])
PERSONA_TARGET = np.array([0.88, 0.72, 0.70, 0.40, 0.72])
"""Satisfaction each persona drifts towards (a declining account's target falls once its
decline has begun, see ``World``)."""
PERSONA_ACTIVITY = np.array([1.25, 1.0, 1.0, 0.45, 1.0])

# decline code, probability among card failures, base recovery probability of a retry
DECLINES: tuple[tuple[str, float, float], ...] = (
    ("insufficient_funds", 0.42, 0.30),
    ("generic_decline", 0.16, 0.25),
    ("processing_error", 0.10, 0.65),
    ("try_again_later", 0.09, 0.55),
    ("card_velocity_exceeded", 0.03, 0.40),
    ("do_not_honor", 0.08, 0.0),
    ("expired_card", 0.07, 0.0),
    ("lost_card", 0.03, 0.0),
    ("stolen_card", 0.02, 0.0),
)
DECLINE_CODES = tuple(c for c, _, _ in DECLINES)
DECLINE_P = np.array([p for _, p, _ in DECLINES]) / sum(p for _, p, _ in DECLINES)
DECLINE_RECOVERY = np.array([r for _, _, r in DECLINES])
DECLINE_HARD = np.array([r == 0.0 for _, _, r in DECLINES])
BILLING_RETRY_OFFSETS = (3, 5, 7)
"""The billing system's own retries of a soft decline, days after the failure."""
DUNNING_GRACE_DAYS = 14
"""Days after a failure at which an unrecovered subscription is cancelled (involuntary)."""

CANCEL_REASONS = (
    "too_expensive",
    "missing_features",
    "switched_service",
    "unused",
    "customer_service",
    "too_complex",
    "low_quality",
    "other",
)

TICKET_THEMES = ("billing", "performance", "missing_feature", "onboarding", "bug", "pricing")
TICKET_THEME_P = np.array([0.12, 0.18, 0.2, 0.15, 0.28, 0.07])

# subject, text; {feature} is filled in. Tone follows satisfaction: 0 angry, 1 neutral, 2 warm
TICKET_TEXTS: dict[str, tuple[tuple[tuple[str, str], ...], ...]] = {
    "billing": (
        (
            (
                "Charged twice AGAIN",
                "We were billed twice this month and nobody answered my last email. This is unacceptable, fix it or we cancel.",
            ),
        ),
        (
            (
                "Question about our invoice",
                "Our latest invoice shows more seats than we use. Can you check the seat count?",
            ),
        ),
        (
            (
                "Updating billing contact",
                "Could you switch the billing email to our finance team? Thanks a lot!",
            ),
        ),
    ),
    "performance": (
        (
            (
                "Everything is painfully slow",
                "The {feature} page takes 30+ seconds to load every morning. Our team has stopped using it.",
            ),
        ),
        (
            (
                "Slow {feature} page",
                "Loading {feature} has been slower since last week, around 8 seconds. Is there an incident?",
            ),
        ),
        (
            (
                "Small speed question",
                "Is there a way to make {feature} load faster for large workspaces? Otherwise all good.",
            ),
        ),
    ),
    "missing_feature": (
        (
            (
                "Still no export to our BI tool",
                "We asked for this six months ago. Without it {feature} is useless to us and we are evaluating alternatives.",
            ),
        ),
        (
            (
                "Feature request for {feature}",
                "It would help if {feature} supported custom fields. Is this on the roadmap?",
            ),
        ),
        (
            (
                "Idea for {feature}",
                "Love {feature}! One idea: let us pin favourites. Keep up the great work.",
            ),
        ),
    ),
    "onboarding": (
        (
            (
                "Can't get started",
                "We still cannot figure out how to set up {feature}. The docs are confusing and the setup keeps failing.",
            ),
        ),
        (
            (
                "Help setting up {feature}",
                "Which permissions do we need to connect {feature}? Our admin is unsure.",
            ),
        ),
        (
            (
                "Onboarding call follow-up",
                "Thanks for the onboarding session, the team is set up. Quick question about {feature} roles.",
            ),
        ),
    ),
    "bug": (
        (
            (
                "{feature} broken AGAIN",
                "{feature} throws an error every time we save. Third time this month. Our team is losing work.",
            ),
        ),
        (
            (
                "Error in {feature}",
                "We see an error when saving in {feature} for some users. Steps to reproduce attached.",
            ),
        ),
        (
            (
                "Minor glitch in {feature}",
                "Tiny thing: the {feature} button is misaligned on Safari. Not urgent at all, thanks!",
            ),
        ),
    ),
    "pricing": (
        (
            (
                "Price increase is outrageous",
                "The new pricing doubles our bill for the same product. We will not renew at this price.",
            ),
        ),
        (("Pricing for more seats", "What would it cost to add 10 seats on our current plan?"),),
        (
            (
                "Annual plan discount?",
                "We are happy customers and would like to switch to annual billing. Is there a discount?",
            ),
        ),
    ),
}

NPS_COMMENTS = (
    ("Too buggy and support is slow.", "Hard to justify the price.", "We barely use it anymore."),
    ("Does the job.", "Good but the {feature} page needs work.", "Fine for our needs."),
    (
        "Our team loves {feature}!",
        "Indispensable for our weekly reporting.",
        "Great product and support.",
    ),
)
