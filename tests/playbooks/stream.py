"""A simulated stream for the shipped playbooks, with what each should do (the oracle).

A seeded population of accounts of every kind (segments, ARR, tenure, with or without a
CSM or an owner, time zones) gets the signals a scoring worker would emit: tier
crossings both ways, usage drops early and late in life, detractors, renewals in every
window and tier, expansion, milestones, soft and hard payment failures. The oracle says,
independently of the engine, which command each (signal, playbook) must produce, or
that it must stay silent, or that the account is held out.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from churnguard.common.topics import Topic
from churnguard.playbooks.facts import LiftRanking
from churnguard.playbooks.guardrails import in_holdout
from churnguard.playbooks.settings import DEFAULT_LIFT_PATH
from tests.playbooks import builders as b

STICKY = ["integrations", "automations", "api", "scheduled_reports"]
HOLDOUT = {
    "high-risk-enterprise": 5,
    "onboarding-usage-drop": 10,
    "detractor-nps": 10,
    "expansion-owner": 10,
    "milestone-congratulation": 10,
}


@dataclass
class Acct:
    id: str
    segment: str
    mrr: int
    tenure: float
    csm: str | None
    owner: str | None
    unadopted: list[str]
    days_to_renewal: float
    tier: str = "healthy"

    @property
    def arr(self) -> float:
        return self.mrr * 12 / 100


Expected = tuple[str, str, str, str]
"""(account, playbook, channel, recipient) of one expected notification."""


@dataclass
class Stream:
    profile: list[tuple[Topic, Any]] = field(default_factory=list)
    signals: list[Any] = field(default_factory=list)
    expected: set[Expected] = field(default_factory=set)
    held_out: set[tuple[str, str]] = field(default_factory=set)
    """(account, playbook) pairs the oracle expects held out: logged, never sent."""
    decisions: int = 0
    """Decision rows the stream must produce (one per signal and matching-trigger playbook)."""
    soft_failures: set[str] = field(default_factory=set)
    hard_failures: set[str] = field(default_factory=set)
    guides: dict[str, str | None] = field(default_factory=dict)
    """Account → the feature its in-app guide must name."""


def build(now: datetime, accounts: int = 60, seed: int = 7) -> Stream:
    rng = random.Random(seed)
    lift = LiftRanking.load(DEFAULT_LIFT_PATH)
    out = Stream()
    people: list[Acct] = []
    for i in range(accounts):
        segment = rng.choice(["smb", "smb", "mid", "enterprise"])
        mrr = {
            "smb": rng.choice([200_00, 600_00]),
            "mid": rng.choice([900_00, 2500_00]),
            "enterprise": rng.choice([3000_00, 8000_00, 25000_00]),
        }[segment]
        a = Acct(
            id=f"acct_s{i:03d}",
            segment=segment,
            mrr=mrr,
            tenure=rng.choice([20.0, 60.0, 85.0, 120.0, 400.0]),
            csm=f"U0CSM{i:03d}" if mrr * 12 >= 10_000_00 and rng.random() < 0.8 else None,
            owner=f"U0AE{i:03d}" if rng.random() < 0.5 else None,
            unadopted=rng.sample(STICKY, rng.choice([0, 1, 2, 3])),
            days_to_renewal=rng.choice([200.0, 95.0, 90.0, 80.0]),
            tier=rng.choice(["healthy", "watch", "critical"]),
        )
        people.append(a)
        t = now - timedelta(hours=3)
        traits: dict[str, Any] = {
            "name": f"Account {i}",
            "plan": "growth",
            "segment": segment,
            "timezone": rng.choice(["Europe/Berlin", "America/Chicago"]),
        }
        if a.csm:
            traits["csm"] = a.csm
        if a.owner:
            traits["owner"] = a.owner
        out.profile += [
            (Topic.USAGE, b.group(a.id, t, **traits)),
            (Topic.USAGE, b.identify(a.id, t, "u_admin", f"admin@{a.id}.test", "admin")),
            (Topic.USAGE, b.identify(a.id, t, "u_member", f"member@{a.id}.test", "member")),
            (Topic.REVENUE_MOVEMENTS, b.revenue(a.id, t, a.mrr)),
            (
                Topic.SCORES,
                b.score(
                    a.id,
                    t,
                    tier=a.tier,
                    unadopted=a.unadopted,
                    features={
                        "tenure_days": a.tenure,
                        "days_to_renewal": a.days_to_renewal,
                        "mrr": a.mrr / 100,
                    },
                ),
            ),
        ]
        if a.days_to_renewal == 90 and a.csm and a.arr >= 10_000:
            out.expected.add((a.id, "renewal-prep", "csm_task", a.csm))
        # a renewal 90 days out is the schedule's moment: its timer is due at once
        out.decisions += int(a.days_to_renewal == 90)

    def expect(a: Acct, playbook: str, channel: str, recipient: str) -> None:
        if in_holdout(playbook, a.id, HOLDOUT.get(playbook, 0)):
            out.held_out.add((a.id, playbook))
        else:
            out.expected.add((a.id, playbook, channel, recipient))

    kinds = ["tier", "usage", "nps", "renewal", "expansion", "milestone", "payment"]
    for n, a in enumerate(people):
        at = now - timedelta(minutes=60 - n % 50)
        kind = kinds[n % len(kinds)]
        if kind == "tier":
            to = rng.choice(["at_risk", "critical", "watch"])
            frm = "healthy" if n % 3 else "critical"
            if to == frm:
                frm = "watch"
            out.signals.append(b.tier_crossed(a.id, at, to=to, frm=frm))
            worsened = ["healthy", "watch", "at_risk", "critical"].index(to) > [
                "healthy",
                "watch",
                "at_risk",
                "critical",
            ].index(frm)
            if (
                worsened
                and to in ("at_risk", "critical")
                and (a.segment == "enterprise" or a.arr >= 50_000)
            ):
                expect(a, "high-risk-enterprise", "slack", a.csm or "#cs-alerts")
        elif kind == "usage":
            out.signals.append(b.usage_dropped(a.id, at, unadopted=a.unadopted))
            if a.tenure < 90 and a.unadopted:
                expect(a, "onboarding-usage-drop", "in_app", "u_admin")
                out.guides[a.id] = lift.best(a.unadopted)
        elif kind == "nps":
            out.signals.append(b.detractor(a.id, at, user="u_member"))
            expect(a, "detractor-nps", "csm_task", a.csm or "cs-queue")
            if not in_holdout("detractor-nps", a.id, 10):
                out.expected.add((a.id, "detractor-nps", "email", f"member@{a.id}.test"))
        elif kind == "renewal":
            window = rng.choice([30, 60, 90])
            tier = rng.choice(["at_risk", "critical", "watch"])
            out.signals.append(b.renewal(a.id, at, days=window - 3, window=window, tier=tier))
            if window == 60 and tier != "watch":
                out.expected.add((a.id, "renewal-risk-executive", "slack", "#exec-renewals"))
        elif kind == "expansion":
            out.signals.append(b.expansion(a.id, at))
            expect(a, "expansion-owner", "slack", a.owner or a.csm or "#sales")
        elif kind == "milestone":
            out.signals.append(b.milestone(a.id, at))
            if a.tier != "critical":
                expect(a, "milestone-congratulation", "in_app", "u_admin")
        else:
            hard = n % 2 == 0
            out.signals.append(
                b.payment_failed(
                    a.id,
                    at,
                    invoice=f"in_{a.id}",
                    code="expired_card" if hard else "processing_error",
                    kind="hard" if hard else "soft",
                )
            )
            (out.hard_failures if hard else out.soft_failures).add(a.id)
            template_recipient = f"admin@{a.id}.test"
            out.expected.add((a.id, "failed-payment-dunning", "email", template_recipient))
        out.decisions += 1  # one shipped playbook per signal type
    return out
