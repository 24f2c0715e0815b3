"""A seeded, reproducible B2B SaaS customer base, stepped one day at a time.

Each account has a hidden satisfaction ``sat`` in [0, 1] that evolves daily towards a
target set by its persona (power, steady, declining, never activated, seasonal), with
noise, and is nudged by what happens to it (a failed payment, a bad support experience,
adopting a sticky feature, an action of churnguard's). Everything observable follows
from it: how many users are active and how much they use which features, seat changes,
support tickets and their tone, NPS and CSAT answers, upgrades and downgrades, and the
decision to cancel. Card payments fail with realistic decline codes independently of
satisfaction; the billing system retries soft declines on a fixed schedule and cancels
subscriptions whose payment never recovers (involuntary churn).

All accounts are numpy arrays stepped together, so a day costs a few vector operations
plus the formatting of that day's events. Output is byte-identical for the same seed:
one ``numpy.random.Generator`` drives everything, in a fixed order, and event ids are a
counter.

Time: day 0 is ``SimConfig.start``; existing customers signed up in the two years
before it (the stream opens with their ``subscription_created``, dated at sign-up, as a
backfill from the billing system would give them); new customers sign up during the run.
One account's subscription events are stamped in the order they build on each other, so
the stream gives every account's MRR at every moment, as the ground truth records it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field

from churnguard.simulator import catalogue as cat

ACTIVE, PENDING, CHURNED, NOT_YET = 0, 1, 2, 3
NO_DUNNING = -1
_HMS = [f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}" for s in range(86400)]
_MASK_FEATURES = np.full((1 << len(cat.FEATURES), len(cat.FEATURES)), -1, dtype=np.int16)
for _mask in range(1 << len(cat.FEATURES)):
    _bits = [i for i in range(len(cat.FEATURES)) if _mask >> i & 1]
    _MASK_FEATURES[_mask, : len(_bits)] = _bits
_POPCOUNT = np.array([bin(m).count("1") for m in range(1 << len(cat.FEATURES))], dtype=np.int16)


class ActionEffects(BaseModel):
    """How much churnguard's actions move a simulated customer (effect sizes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    csm_call_reach: float = Field(0.7, ge=0, le=1, description="Share of CSM calls that connect")
    csm_call: float = Field(0.15, ge=0, le=1, description="Satisfaction gained by a call")
    guide_adoption: float = Field(
        0.3, ge=0, le=1, description="Share of in-app guides that lead to adopting the feature"
    )
    email_open: float = Field(0.45, ge=0, le=1)
    email: float = Field(0.02, ge=0, le=1, description="Satisfaction gained by an opened email")
    sticky_adoption: float = Field(
        0.06, ge=0, le=1, description="Satisfaction gained when a sticky feature is adopted"
    )


class SimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    accounts: int = Field(2000, ge=1, description="Customers at the start")
    days: int = Field(365, ge=1, le=3650)
    seed: int = Field(1, ge=0)
    start: date = Field(date(2025, 1, 1), description="Day 0 (fixed, so output is reproducible)")
    new_per_month: float = Field(
        0.025, ge=0, description="New customers per month, as a share of the starting base"
    )
    effects: ActionEffects = Field(default_factory=ActionEffects)


ActionKind = Literal["csm_call", "in_app_guide", "email", "payment_retry", "card_update_email"]


@dataclass
class DayOutput:
    day: int
    date: date
    lines: list[bytes]
    """That day's events as structured CloudEvents JSON, in time order. Day 0's begin with
    the subscriptions of the customers who signed up before it, dated at their sign-up."""


@dataclass
class _Buffer:
    """One day's events before sorting: (second of day, sequence, line)."""

    rows: list[tuple[int, int, bytes]] = field(default_factory=list)


class World:
    """The simulated customer base. ``run()`` yields one :class:`DayOutput` per day."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self._counter = 0
        self._id_base = f"s{config.seed}-"
        self.day = 0
        self._init_accounts()
        self._ticket_closes: dict[int, list[tuple[int, str, bool]]] = defaultdict(list)
        self._buffer = _Buffer()
        self._card_update_boost = np.ones(self.n)
        self._subscription_sec: dict[int, int] = {}

    # -- set-up ----------------------------------------------------------------------------

    def _init_accounts(self) -> None:
        c, rng = self.config, self.rng
        n_new = int(rng.poisson(c.accounts * c.new_per_month * c.days / 30.44))
        n = self.n = c.accounts + n_new
        existing = np.arange(n) < c.accounts
        self.signup_day = np.where(
            existing,
            -rng.integers(1, 731, n),
            np.sort(rng.integers(0, c.days, n)),
        ).astype(np.int32)
        shares = np.array([s.share for s in cat.SEGMENTS])
        self.seg = rng.choice(len(cat.SEGMENTS), n, p=shares).astype(np.int8)
        seg_rows = [cat.SEGMENTS[s] for s in self.seg]
        self.plan = np.array(
            [
                cat.PLAN_INDEX[s.plans[0][0]]
                if u < s.plans[0][1]
                else cat.PLAN_INDEX[s.plans[1][0]]
                for s, u in zip(seg_rows, rng.random(n), strict=True)
            ],
            dtype=np.int8,
        )
        self.annual = rng.random(n) < np.array([s.annual_share for s in seg_rows])
        self.card = rng.random(n) < np.array([s.card_share for s in seg_rows])
        median = np.array([s.seats_median for s in seg_rows])
        sigma = np.array([s.seats_sigma for s in seg_rows])
        self.seats = np.maximum(1, np.round(rng.lognormal(np.log(median), sigma))).astype(np.int32)
        self.users = np.maximum(1, np.ceil(self.seats * rng.uniform(0.55, 1.0, n))).astype(np.int32)
        self.users = np.minimum(self.users, self.seats)
        # a flat-priced add-on some larger customers already have
        self.addon = np.where(
            (self.seg > 0) & existing & (rng.random(n) < 0.2), cat.ADDON_MRR, 0
        ).astype(np.int64)
        self.mrr = self.seats.astype(np.int64) * cat.PRICE_BY_PLAN[self.plan] + self.addon

        persona = rng.choice(len(cat.PERSONAS), n, p=cat.PERSONA_SHARES).astype(np.int8)
        # customers who never reached value would have left before becoming old customers
        persona[(persona == cat.NEVER_ACTIVATED) & (self.signup_day < -90)] = cat.DECLINING
        self.persona = persona
        self.decline_start = np.where(
            persona == cat.DECLINING, rng.integers(-60, c.days + 1, n), 10**6
        ).astype(np.int32)
        self.decline_speed = rng.uniform(0.008, 0.035, n)
        self.season_phase = rng.uniform(0, 2 * np.pi, n)
        self.sat = np.clip(cat.PERSONA_TARGET[persona] + rng.normal(0, 0.08, n), 0.05, 0.99)
        already = (persona == cat.DECLINING) & (self.decline_start < 0)
        self.sat[already] = np.clip(
            self.sat[already] - rng.uniform(0.1, 0.35, already.sum()), 0.05, 1
        )

        # feature adoption: existing customers have adopted more, by tenure and persona
        tenure_years = np.clip(-self.signup_day, 0, 730) / 365
        extra_p = np.clip(0.15 + 0.25 * tenure_years + 0.2 * (persona == cat.POWER), 0, 0.9)
        extra_p[persona == cat.NEVER_ACTIVATED] = 0.0
        extra_p[~existing] = 0.0
        bits = rng.random((n, len(cat.FEATURES))) < extra_p[:, None]
        weights = 1 << np.arange(len(cat.FEATURES))
        self.adopted = (cat.BASIC_MASK | (bits * weights).sum(axis=1)).astype(np.int16)
        self.adopted[~existing] = 1  # new customers start on dashboards only

        self.anchor_dom = np.minimum(
            [(c.start + timedelta(days=int(d))).day for d in self.signup_day], 28
        ).astype(np.int8)
        self.anchor_month = np.array(
            [(c.start + timedelta(days=int(d))).month for d in self.signup_day], dtype=np.int8
        )
        arr = self.mrr * 12
        self.csm = np.where(
            arr >= cat.CSM_ARR_THRESHOLD_CENTS, rng.integers(0, len(cat.CSMS), n), -1
        ).astype(np.int8)
        self.nps_phase = rng.integers(0, 90, n).astype(np.int16)
        self.user_offset = rng.integers(0, 10_000, n)

        self.state = np.where(existing, ACTIVE, NOT_YET).astype(np.int8)
        self.effective_day = np.full(n, -1, dtype=np.int32)
        self.churn_kind: list[str | None] = [None] * n
        self.cancel_day = np.full(n, -1, dtype=np.int32)
        self.dun_code = np.full(n, NO_DUNNING, dtype=np.int8)
        self.dun_day = np.zeros(n, dtype=np.int32)
        self.dun_tries = np.zeros(n, dtype=np.int8)
        self.dun_invoice: dict[int, tuple[str, int]] = {}
        self.account_ids = [f"acct_{(i * 2654435761 + c.seed * 97) % 16**7:07x}" for i in range(n)]
        self._index = {a: i for i, a in enumerate(self.account_ids)}
        self.sub_ids = [f"sub_{a[5:]}{c.seed:x}" for a in self.account_ids]
        self.mrr_history: list[list[tuple[int, int]]] = [
            [(int(self.signup_day[i]), int(self.mrr[i]))] if existing[i] else [] for i in range(n)
        ]
        self.mrr_at_start = np.where(existing, self.mrr, 0)

    # -- identity and emission ---------------------------------------------------------------

    def account_index(self, account_id: str) -> int:
        return self._index[account_id]

    def _id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}_{self._id_base}{self._counter:x}"

    def _time(self, sec: int) -> str:
        return f"{self._date_iso}T{_HMS[sec]}Z"

    def _emit(
        self, sec: int, prefix: str, type_: str, source: str, acct: int, data: dict[str, Any]
    ) -> None:
        line = self._line(self._time(sec), prefix, type_, source, acct, data)
        self._buffer.rows.append((sec, self._counter, line))

    def _line(
        self, time: str, prefix: str, type_: str, source: str, acct: int, data: dict[str, Any]
    ) -> bytes:
        event = {
            "specversion": "1.0",
            "id": self._id(prefix),
            "source": source,
            "type": type_,
            "time": time,
            "subject": self.account_ids[acct],
            "datacontenttype": "application/json",
            "schemaversion": 1,
            "data": data,
        }
        return orjson.dumps(event)

    def _user(self, acct: int, j: int) -> str:
        return f"{self.account_ids[acct]}_u{j}"

    def _subscription(self, acct: int, status: str) -> dict[str, Any]:
        return {
            "subscription_id": self.sub_ids[acct],
            "plan": cat.PLANS[self.plan[acct]],
            "interval": "year" if self.annual[acct] else "month",
            "quantity": int(self.seats[acct]),
            "mrr": int(self.mrr[acct]),
            "currency": "usd",
            "status": status,
        }

    def _sec(self) -> int:
        return int(self.rng.integers(6 * 3600, 22 * 3600))

    def _subscription_change_sec(self, a: int, sec: int) -> int:
        """``sec``, or the second of the account's previous subscription change today if later.

        A day's changes are decided in a fixed order (sign-up, seats, plan, add-on, dunning,
        cancellation), each building on the one before, but their seconds are drawn at
        random. Without this an expansion could be stamped before its sign-up, or a
        cancellation before the upgrade whose MRR it carries, and a consumer that follows
        the billing system's time order (as it must) would end on a stale MRR. Equal
        seconds keep the decision order: a day's events are sorted by (second, sequence).
        """
        sec = max(sec, self._subscription_sec.get(a, sec))
        self._subscription_sec[a] = sec
        return sec

    # -- the day ---------------------------------------------------------------------------

    def run(self) -> Iterator[DayOutput]:
        while self.day < self.config.days:
            yield self.step()

    def step(self) -> DayOutput:
        """Advance one day and return its events in time order."""
        d = self.day
        today = self.config.start + timedelta(days=d)
        self._date = today
        self._date_iso = today.isoformat()
        self._subscription_sec = {}
        opening = self._opening_subscriptions() if d == 0 else []
        self._signups(d)
        alive = np.flatnonzero((self.state == ACTIVE) | (self.state == PENDING))
        self._satisfaction(d, alive)
        self._usage(d, today, alive)
        self._seats(d, alive)
        self._tickets(d, alive)
        self._nps(d, alive)
        self._billing(d, today, alive)
        self._dunning(d, today)
        self._voluntary_churn(d, today, alive)
        self._effective_cancellations(d)
        rows = self._buffer.rows
        rows.sort(key=lambda r: (r[0], r[1]))
        self._buffer = _Buffer()
        self.day += 1
        return DayOutput(d, today, opening + [r[2] for r in rows])

    def _opening_subscriptions(self) -> list[bytes]:
        """``subscription_created`` of each customer who signed up before day 0, dated then.

        The billing system holds these subscriptions before the simulated period, and a
        backfill of its subscriptions hands them over when churnguard is connected. Without
        them nothing in the stream says what the existing customers pay: MRR and tenure
        would be known only for customers who sign up or change during the period. The
        second of the day is spread over business hours without the random generator, so
        the rest of the world does not depend on them.
        """
        existing = np.flatnonzero(self.signup_day < 0)
        secs = 6 * 3600 + (existing * 7919) % (16 * 3600)
        lines = []
        for i in np.lexsort((existing, secs, self.signup_day[existing])).tolist():
            a, sec = int(existing[i]), int(secs[i])
            signup = self.config.start + timedelta(days=int(self.signup_day[a]))
            lines.append(
                self._line(
                    f"{signup.isoformat()}T{_HMS[sec]}Z",
                    "sub",
                    "churnguard.billing.subscription_created",
                    "/simulator/billing",
                    a,
                    self._subscription(a, "active"),
                )
            )
        return lines

    def _signups(self, d: int) -> None:
        for a in np.flatnonzero((self.state == NOT_YET) & (self.signup_day == d)).tolist():
            self.state[a] = ACTIVE
            self.mrr_history[a].append((d, int(self.mrr[a])))
            sec = self._subscription_change_sec(a, self._sec())
            self._emit(
                sec,
                "sub",
                "churnguard.billing.subscription_created",
                "/simulator/billing",
                a,
                self._subscription(a, "active"),
            )
            self._invoice(a, sec + 1, first=True)
            for j in range(int(self.users[a])):
                self._join(a, j, min(sec + 60 + j * 30, 86399), invited=j > 0)

    def _join(self, a: int, j: int, sec: int, invited: bool) -> None:
        user = self._user(a, j)
        role = "admin" if j == 0 else ("manager" if j % 5 == 1 else "member")
        self._emit(
            sec,
            "idf",
            "churnguard.usage.identify",
            "/simulator/app",
            a,
            {"user_id": user, "traits": {"email": f"{user}@example.com", "role": role}},
        )
        self._emit(
            sec,
            "grp",
            "churnguard.usage.group",
            "/simulator/app",
            a,
            {
                "user_id": user,
                "traits": {
                    "plan": cat.PLANS[self.plan[a]],
                    "segment": cat.SEGMENTS[self.seg[a]].name,
                },
            },
        )
        if invited:
            self._emit(
                sec,
                "trk",
                "churnguard.usage.track",
                "/simulator/app",
                a,
                {
                    "user_id": self._user(a, 0),
                    "event": "User Invited",
                    "properties": {"invitee": user},
                },
            )

    def _satisfaction(self, d: int, a: np.ndarray) -> None:
        persona = self.persona[a]
        target = cat.PERSONA_TARGET[persona].copy()
        kappa = np.full(a.size, 0.03)
        declining = (persona == cat.DECLINING) & (d >= self.decline_start[a])
        target[declining] = 0.1
        kappa[declining] = self.decline_speed[a][declining]
        no_value = (
            (persona == cat.NEVER_ACTIVATED)
            & ((self.adopted[a] & cat.STICKY_MASK) == 0)
            & (d - self.signup_day[a] > 30)
        )
        target[no_value] = 0.2
        sat = self.sat[a] + kappa * (target - self.sat[a]) + self.rng.normal(0, 0.015, a.size)
        sat -= 0.004 * (self.dun_code[a] != NO_DUNNING)
        self.sat[a] = np.clip(sat, 0.0, 1.0)

    def _usage(self, d: int, today: date, a: np.ndarray) -> None:
        rng = self.rng
        weekday = 1.0 if today.weekday() < 5 else 0.2
        persona = self.persona[a]
        seasonal = np.where(
            persona == cat.SEASONAL,
            1 + 0.7 * np.sin(2 * np.pi * today.timetuple().tm_yday / 365 + self.season_phase[a]),
            1.0,
        )
        rate = np.array([s.active_rate for s in cat.SEGMENTS])[self.seg[a]]
        engagement = (0.05 + 0.95 * self.sat[a]) ** 1.5  # disengagement shows in usage first
        p = rate * cat.PERSONA_ACTIVITY[persona] * engagement * weekday * seasonal
        p = np.where(self.state[a] == PENDING, p * 0.5, p)
        k = rng.binomial(self.users[a], np.clip(p, 0, 0.95))
        act = a[k > 0]
        k = k[k > 0]
        if act.size == 0:
            return
        # k distinct users per account: consecutive ids from a random offset
        acct = np.repeat(act, k)
        first = np.repeat(np.cumsum(k) - k, k)
        rank = np.arange(acct.size) - first
        user = (self.user_offset[acct] + d * 7 + rank) % self.users[acct]
        sat = self.sat[acct]
        nfeat = np.minimum(1 + rng.binomial(2, 0.5 * sat), _POPCOUNT[self.adopted[acct]])
        acct = np.repeat(acct, nfeat)
        user = np.repeat(user, nfeat)
        choice = (rng.random(acct.size) * _POPCOUNT[self.adopted[acct]]).astype(np.int64)
        feature = _MASK_FEATURES[self.adopted[acct], choice]
        key = (acct.astype(np.int64) << 24) | (user.astype(np.int64) << 5) | feature
        key, first_index = np.unique(key, return_index=True)
        acct, user, feature = acct[first_index], user[first_index], feature[first_index]
        count = 1 + rng.poisson(1.5 + 4 * self.sat[acct])
        secs = rng.integers(6 * 3600, 22 * 3600, acct.size)
        prefix = self._id_base
        rows = self._buffer.rows
        date_iso = self._date_iso
        ids = self.account_ids
        keys = cat.FEATURE_KEYS
        start = self._counter
        for n, (ac, us, fe, co, se) in enumerate(
            zip(
                acct.tolist(),
                user.tolist(),
                feature.tolist(),
                count.tolist(),
                secs.tolist(),
                strict=True,
            ),
            start=start + 1,
        ):
            account = ids[ac]
            rows.append(
                (
                    se,
                    n,
                    (
                        f'{{"specversion":"1.0","id":"fu_{prefix}{n:x}","source":"/simulator/app",'
                        f'"type":"churnguard.usage.feature_used","time":"{date_iso}T{_HMS[se]}Z",'
                        f'"subject":"{account}","datacontenttype":"application/json","schemaversion":1,'
                        f'"data":{{"user_id":"{account}_u{us}","feature":"{keys[fe]}","count":{co}}}}}'
                    ).encode(),
                )
            )
        self._counter = start + acct.size
        self._adoption(d, act)

    def _adoption(self, d: int, act: np.ndarray) -> None:
        rng = self.rng
        tenure = d - self.signup_day[act]
        p = 0.004 + 0.02 * self.sat[act] * np.where(tenure < 90, 2.0, 1.0)
        never = self.persona[act] == cat.NEVER_ACTIVATED
        p[never] = 0.003
        for a in act[rng.random(act.size) < p].tolist():
            allowed = ~int(self.adopted[a]) & ((1 << len(cat.FEATURES)) - 1)
            if self.persona[a] == cat.NEVER_ACTIVATED:
                allowed &= ~cat.STICKY_MASK
            candidates = [i for i in range(len(cat.FEATURES)) if allowed >> i & 1]
            if candidates:
                self._adopt(a, candidates[int(rng.integers(len(candidates)))])

    def _adopt(self, a: int, feature: int) -> None:
        self.adopted[a] |= 1 << feature
        if cat.STICKY_MASK >> feature & 1:
            self.sat[a] = min(1.0, self.sat[a] + self.config.effects.sticky_adoption)

    def _seats(self, d: int, a: np.ndarray) -> None:
        rng = self.rng
        active = a[self.state[a] == ACTIVE]
        sat = self.sat[active]
        draws = rng.random((7, active.size))
        grow = active[(self.users[active] < self.seats[active]) & (sat > 0.55) & (draws[0] < 0.008)]
        shrink = active[(sat < 0.35) & (self.users[active] > 1) & (draws[1] < 0.01)]
        expand = active[
            (self.users[active] >= 0.9 * self.seats[active]) & (sat > 0.6) & (draws[2] < 0.012)
        ]
        contract = active[(sat < 0.35) & (self.seats[active] > 1) & (draws[3] < 0.004)]
        upgrade = active[
            (sat > 0.8) & (self.plan[active] < len(cat.PLANS) - 1) & (draws[4] < 0.0012)
        ]
        has_addon = self.addon[active] > 0
        buy_addon = active[(self.seg[active] > 0) & ~has_addon & (sat > 0.7) & (draws[5] < 0.0008)]
        drop_addon = active[has_addon & (sat < 0.35) & (draws[6] < 0.004)]
        for acc in grow.tolist():
            self.users[acc] += 1
            sec = self._sec()
            self._join(acc, int(self.users[acc]) - 1, sec, invited=True)
            self._seats_changed(acc, sec)
        for acc in shrink.tolist():
            self.users[acc] -= 1
            self._seats_changed(acc, self._sec())
        for acc in expand.tolist():
            self._resize(d, acc, max(1, round(self.seats[acc] * rng.uniform(0.1, 0.3))))
        for acc in contract.tolist():
            self._resize(
                d,
                acc,
                -max(
                    1, min(int(self.seats[acc]) - 1, round(self.seats[acc] * rng.uniform(0.1, 0.3)))
                ),
            )
        for acc in upgrade.tolist():
            previous = self._subscription(acc, "active")
            self.plan[acc] += 1
            self._change_mrr(d, acc, previous, self._sec())
        for acc, price in [(x, cat.ADDON_MRR) for x in buy_addon.tolist()] + [
            (x, 0) for x in drop_addon.tolist()
        ]:
            previous = self._subscription(acc, "active")
            self.addon[acc] = price
            self._change_mrr(d, acc, previous, self._sec())

    def _resize(self, d: int, a: int, delta: int) -> None:
        previous = self._subscription(a, "active")
        self.seats[a] += delta
        self.users[a] = min(self.users[a], self.seats[a])
        sec = self._change_mrr(d, a, previous, self._sec())
        self._seats_changed(a, sec)

    def _change_mrr(self, d: int, a: int, previous: dict[str, Any], sec: int) -> int:
        """Book the subscription's new MRR; returns the second it is stamped with."""
        sec = self._subscription_change_sec(a, sec)
        self.mrr[a] = int(self.seats[a]) * int(cat.PRICE_BY_PLAN[self.plan[a]]) + int(self.addon[a])
        self.mrr_history[a].append((d, int(self.mrr[a])))
        data = self._subscription(a, "active") | {
            "previous_mrr": previous["mrr"],
            "previous_plan": previous["plan"],
            "previous_quantity": previous["quantity"],
        }
        self._emit(
            sec, "sub", "churnguard.billing.subscription_updated", "/simulator/billing", a, data
        )
        return sec

    def _seats_changed(self, a: int, sec: int) -> None:
        self._emit(
            sec,
            "seat",
            "churnguard.usage.seats_changed",
            "/simulator/app",
            a,
            {"seats_purchased": int(self.seats[a]), "seats_used": int(self.users[a])},
        )

    def _tickets(self, d: int, a: np.ndarray) -> None:
        rng = self.rng
        dunning = self.dun_code[a] != NO_DUNNING
        lam = 0.008 * np.sqrt(self.users[a]) * (1.6 - self.sat[a]) * np.where(dunning, 1.5, 1.0)
        opened = rng.poisson(lam)
        for acc, n in zip(a[opened > 0].tolist(), opened[opened > 0].tolist(), strict=True):
            for _ in range(n):
                self._open_ticket(d, acc)
        for acc, ticket, satisfied in self._ticket_closes.pop(d, []):
            if self.state[acc] in (ACTIVE, PENDING):
                self._close_ticket(acc, ticket, satisfied)

    def _open_ticket(self, d: int, a: int) -> None:
        rng = self.rng
        sat = float(self.sat[a])
        if self.dun_code[a] != NO_DUNNING and rng.random() < 0.5:
            theme = 0
        else:
            theme = int(rng.choice(len(cat.TICKET_THEMES), p=cat.TICKET_THEME_P))
        tone = 0 if sat < 0.35 else (1 if sat < 0.7 else 2)
        subject, text = cat.TICKET_TEXTS[cat.TICKET_THEMES[theme]][tone][0]
        feature = cat.FEATURE_KEYS[int(_MASK_FEATURES[self.adopted[a], 0])]
        ticket = self._id("tkt")
        priority = ("urgent", "high", "normal")[tone] if rng.random() < 0.7 else "normal"
        self._emit(
            self._sec(),
            "tko",
            "churnguard.feedback.ticket_opened",
            "/simulator/helpdesk",
            a,
            {
                "ticket_id": ticket,
                "user_id": self._user(a, int(rng.integers(self.users[a]))),
                "subject": subject.format(feature=feature),
                "text": text.format(feature=feature),
                "channel": ("email", "web", "chat")[int(rng.integers(3))],
                "priority": priority,
            },
        )
        satisfied = bool(rng.random() < 0.3 + 0.6 * sat)
        self._ticket_closes[d + 1 + int(rng.geometric(0.4))].append((a, ticket, satisfied))

    def _close_ticket(self, a: int, ticket: str, satisfied: bool) -> None:
        rng = self.rng
        self.sat[a] = min(1.0, self.sat[a] + 0.01) if satisfied else max(0.0, self.sat[a] - 0.03)
        sec = self._sec()
        self._emit(
            sec,
            "tkc",
            "churnguard.feedback.ticket_closed",
            "/simulator/helpdesk",
            a,
            {
                "ticket_id": ticket,
                "resolution": "Resolved by support" if satisfied else "Closed without a fix",
                "satisfied": satisfied,
            },
        )
        if rng.random() < 0.45:
            score = int(
                np.clip(round(1 + 3.6 * self.sat[a] + satisfied + rng.normal(0, 0.7)), 1, 5)
            )
            self._emit(
                min(sec + 600, 86399),
                "csat",
                "churnguard.feedback.csat_submitted",
                "/simulator/surveys",
                a,
                {"user_id": self._user(a, 0), "score": score, "ticket_id": ticket},
            )

    def _nps(self, d: int, a: np.ndarray) -> None:
        rng = self.rng
        due = a[((d - self.nps_phase[a]) % 90 == 0) & (d - self.signup_day[a] >= 30)]
        responding = due[rng.random(due.size) < 0.35]
        for acc in responding.tolist():
            score = int(np.clip(round(rng.normal(1.5 + 9.5 * self.sat[acc], 1.4)), 0, 10))
            data: dict[str, Any] = {
                "user_id": self._user(acc, int(rng.integers(self.users[acc]))),
                "score": score,
            }
            if rng.random() < 0.4:
                band = 0 if score <= 6 else (1 if score <= 8 else 2)
                options = cat.NPS_COMMENTS[band]
                feature = cat.FEATURE_KEYS[int(_MASK_FEATURES[self.adopted[acc], 0])]
                data["comment"] = options[int(rng.integers(len(options)))].format(feature=feature)
            self._emit(
                self._sec(),
                "nps",
                "churnguard.feedback.nps_submitted",
                "/simulator/surveys",
                acc,
                data,
            )

    # -- billing ---------------------------------------------------------------------------

    def _invoice(self, a: int, sec: int, first: bool = False) -> None:
        """Invoice the coming period; a card payment may fail and start dunning."""
        rng = self.rng
        invoice = self._id("in")
        amount = int(self.mrr[a]) * (12 if self.annual[a] else 1)
        base = {"invoice_id": invoice, "subscription_id": self.sub_ids[a], "currency": "usd"}
        self._emit(
            sec,
            "inv",
            "churnguard.billing.invoice_created",
            "/simulator/billing",
            a,
            base
            | {
                "amount_due": amount,
                "billing_reason": "subscription_create" if first else "subscription_cycle",
            },
        )
        fail_p = cat.SEGMENTS[self.seg[a]].card_failure
        if self.card[a] and not first and rng.random() < fail_p:
            code = int(rng.choice(len(cat.DECLINE_CODES), p=cat.DECLINE_P))
            self.dun_code[a], self.dun_day[a], self.dun_tries[a] = code, self.day, 1
            self.dun_invoice[a] = (invoice, amount)
            self.sat[a] = max(0.0, self.sat[a] - 0.02)
            self._payment_failed(a, sec + 2, code, 1)
        else:
            self._emit(
                sec + 2,
                "pay",
                "churnguard.billing.invoice_paid",
                "/simulator/billing",
                a,
                base | {"amount_paid": amount, "attempt_count": 1},
            )

    def _payment_failed(self, a: int, sec: int, code: int, attempt: int) -> None:
        invoice, amount = self.dun_invoice[a]
        hard = bool(cat.DECLINE_HARD[code])
        offsets = [o for o in cat.BILLING_RETRY_OFFSETS if o > self.day - self.dun_day[a]]
        next_attempt = None
        if not hard and offsets:
            nxt = self.config.start + timedelta(days=int(self.dun_day[a]) + offsets[0])
            next_attempt = f"{nxt.isoformat()}T{_HMS[sec]}Z"
        self._emit(
            sec,
            "fail",
            "churnguard.billing.invoice_payment_failed",
            "/simulator/billing",
            a,
            {
                "invoice_id": invoice,
                "subscription_id": self.sub_ids[a],
                "amount_due": amount,
                "currency": "usd",
                "attempt_count": attempt,
                "decline_code": cat.DECLINE_CODES[code],
                "decline_kind": "hard" if hard else "soft",
                "next_payment_attempt": next_attempt,
            },
        )

    def _recovered(self, a: int, sec: int) -> None:
        invoice, amount = self.dun_invoice.pop(a)
        self._emit(
            sec,
            "pay",
            "churnguard.billing.invoice_paid",
            "/simulator/billing",
            a,
            {
                "invoice_id": invoice,
                "subscription_id": self.sub_ids[a],
                "currency": "usd",
                "amount_paid": amount,
                "attempt_count": int(self.dun_tries[a]),
            },
        )
        self.dun_code[a] = NO_DUNNING

    def _retry_succeeds(self, a: int, today: date) -> bool:
        code = int(self.dun_code[a])
        payday = 1.5 if today.day in (1, 2, 15, 16) or today.day >= 28 else 1.0
        p = cat.DECLINE_RECOVERY[code] * payday * 0.85 ** (int(self.dun_tries[a]) - 1)
        return bool(self.rng.random() < min(p, 0.95))

    def _billing(self, d: int, today: date, a: np.ndarray) -> None:
        due = a[
            (self.state[a] == ACTIVE)
            & (self.dun_code[a] == NO_DUNNING)
            & (self.anchor_dom[a] == today.day)
            & (~self.annual[a] | (self.anchor_month[a] == today.month))
            & (self.signup_day[a] < d)
        ]
        for acc in due.tolist():
            self._invoice(acc, int(self.rng.integers(2 * 3600, 6 * 3600)))

    def _dunning(self, d: int, today: date) -> None:
        for a in np.flatnonzero(self.dun_code != NO_DUNNING).tolist():
            if self.state[a] != ACTIVE:
                continue
            since = d - int(self.dun_day[a])
            code = int(self.dun_code[a])
            sec = int(self.rng.integers(6 * 3600, 12 * 3600))
            if cat.DECLINE_HARD[code]:
                # the customer may update the card on their own (more likely when satisfied)
                p = 0.06 * (0.4 + self.sat[a]) * self._card_update_boost[a]
                if since <= 10 and self.rng.random() < p:
                    self.dun_tries[a] += 1
                    self._recovered(a, sec)
                    continue
            elif since in cat.BILLING_RETRY_OFFSETS:
                self.dun_tries[a] += 1
                if self._retry_succeeds(a, today):
                    self._recovered(a, sec)
                    continue
                self._payment_failed(a, sec, code, int(self.dun_tries[a]))
            if since >= cat.DUNNING_GRACE_DAYS:
                self._cancel(d, a, "involuntary", "payment_failed", sec, effective_now=True)

    def _voluntary_churn(self, d: int, today: date, a: np.ndarray) -> None:
        rng = self.rng
        active = a[(self.state[a] == ACTIVE) & (self.dun_code[a] == NO_DUNNING)]
        base = np.array([s.monthly_churn for s in cat.SEGMENTS])[self.seg[active]] / 30.44
        sat = self.sat[active]
        tenure = d - self.signup_day[active]
        hazard = base * np.exp(5.0 * (0.62 - sat)) * np.where(tenure < 90, 1.8, 1.0)
        hazard *= np.where((self.adopted[active] & cat.STICKY_MASK) != 0, 0.55, 1.0)
        # annual customers decide in the 45 days before renewal, at the same yearly rate
        annual = self.annual[active]
        days_to_renewal = np.array(
            [self._days_to_renewal(int(x), today) for x in active[annual].tolist()], dtype=np.int32
        )
        annual_hazard = hazard[annual] * np.where(days_to_renewal <= 45, 365 / 45, 0.0)
        hazard[annual] = annual_hazard
        for acc in active[rng.random(active.size) < hazard].tolist():
            if self.sat[acc] < 0.35:
                reason = cat.CANCEL_REASONS[int(rng.choice([0, 1, 2, 4, 6]))]
            else:
                reason = cat.CANCEL_REASONS[int(rng.choice([0, 2, 3, 5, 7]))]
            now = not self.annual[acc] and rng.random() < 0.1
            sec = self._sec()
            if now and rng.random() < 0.3:
                self._refund(acc, sec, today)
            self._cancel(d, acc, "voluntary", reason, sec, effective_now=now)

    def _refund(self, a: int, sec: int, today: date) -> None:
        """Refund the unused part of the month to a customer who cancels at once."""
        unused = (self._period_end(a, today) - today).days / 30.44
        amount = int(int(self.mrr[a]) * min(unused, 1.0))
        if amount > 0:
            self._emit(
                sec,
                "rfd",
                "churnguard.billing.charge_refunded",
                "/simulator/billing",
                a,
                {
                    "charge_id": self._id("ch"),
                    "refund_id": self._id("re"),
                    "amount": amount,
                    "currency": "usd",
                    "reason": "requested_by_customer",
                },
            )

    def _days_to_renewal(self, a: int, today: date) -> int:
        year = today.year
        for y in (year, year + 1):
            try:
                renewal = date(y, int(self.anchor_month[a]), int(self.anchor_dom[a]))
            except ValueError:
                continue
            if renewal > today:
                return (renewal - today).days
        return 365

    def _period_end(self, a: int, today: date) -> date:
        if self.annual[a]:
            return today + timedelta(days=self._days_to_renewal(a, today))
        dom = int(self.anchor_dom[a])
        month, year = (
            (today.month, today.year)
            if today.day < dom
            else ((today.month % 12) + 1, today.year + (today.month == 12))
        )
        return date(year, month, dom)

    def _cancel(
        self, d: int, a: int, kind: str, reason: str, sec: int, *, effective_now: bool
    ) -> None:
        today = self.config.start + timedelta(days=d)
        sec = self._subscription_change_sec(a, sec)
        effective = today if effective_now else self._period_end(a, today)
        data = self._subscription(a, "canceled" if effective_now else "active") | {
            "cancellation": kind,
            "reason": reason,
            "effective_at": f"{effective.isoformat()}T{_HMS[sec]}Z",
        }
        self._emit(
            sec, "sub", "churnguard.billing.subscription_cancelled", "/simulator/billing", a, data
        )
        self.cancel_day[a] = d
        self.churn_kind[a] = kind
        self.effective_day[a] = (effective - self.config.start).days
        self.dun_code[a] = NO_DUNNING
        self.dun_invoice.pop(a, None)
        if effective_now:
            self._churn(a, d)
        else:
            self.state[a] = PENDING

    def _effective_cancellations(self, d: int) -> None:
        for a in np.flatnonzero((self.state == PENDING) & (self.effective_day <= d)).tolist():
            self._churn(a, d)

    def _churn(self, a: int, d: int) -> None:
        self.state[a] = CHURNED
        self.mrr[a] = 0
        self.mrr_history[a].append((d, 0))

    # -- churnguard's actions --------------------------------------------------------------

    def apply_action(self, account_id: str, kind: ActionKind) -> str:
        """What one of churnguard's actions does to a customer today; returns the outcome.

        Effects land in the current day's state and events (a retry's invoice_paid or
        invoice_payment_failed is emitted on the day after the last ``step()``).
        """
        a = self.account_index(account_id)
        effects = self.config.effects
        rng = self.rng
        if self.state[a] not in (ACTIVE, PENDING):
            return "no_effect"
        if kind == "csm_call":
            if rng.random() < effects.csm_call_reach:
                self.sat[a] = min(1.0, self.sat[a] + effects.csm_call)
                return "delivered"
            return "failed"
        if kind == "email":
            if rng.random() < effects.email_open:
                self.sat[a] = min(1.0, self.sat[a] + effects.email)
                return "opened"
            return "delivered"
        if kind == "in_app_guide":
            unadopted = [
                i
                for i in range(len(cat.FEATURES))
                if cat.STICKY_MASK >> i & 1 and not int(self.adopted[a]) >> i & 1
            ]
            if unadopted and rng.random() < effects.guide_adoption:
                self._adopt(a, unadopted[0])
                return "clicked"
            return "delivered"
        if kind == "card_update_email":
            self._card_update_boost[a] = 2.5
            return "delivered"
        if kind == "payment_retry":
            if self.dun_code[a] == NO_DUNNING:
                return "no_effect"
            today = self.config.start + timedelta(days=self.day)
            self._date_iso = today.isoformat()
            self.dun_tries[a] += 1
            sec = int(rng.integers(6 * 3600, 20 * 3600))
            if not cat.DECLINE_HARD[self.dun_code[a]] and self._retry_succeeds(a, today):
                self._recovered(a, sec)
                return "payment_succeeded"
            self._payment_failed(a, sec, int(self.dun_code[a]), int(self.dun_tries[a]))
            return "payment_failed"
        raise ValueError(f"unknown action {kind!r}")

    # -- ground truth ------------------------------------------------------------------------

    def ground_truth(self) -> Iterator[dict[str, Any]]:
        start = self.config.start
        for i in range(self.n):
            churned = bool(self.state[i] == CHURNED)
            yield {
                "account_id": self.account_ids[i],
                "segment": cat.SEGMENTS[self.seg[i]].name,
                "plan": cat.PLANS[self.plan[i]],
                "interval": "year" if self.annual[i] else "month",
                "persona": cat.PERSONAS[self.persona[i]],
                "csm": cat.CSMS[self.csm[i]] if self.csm[i] >= 0 else None,
                "signup_date": (start + timedelta(days=int(self.signup_day[i]))).isoformat(),
                "churned": churned,
                "churn_date": (start + timedelta(days=int(self.effective_day[i]))).isoformat()
                if churned
                else None,
                "cancel_date": (start + timedelta(days=int(self.cancel_day[i]))).isoformat()
                if self.cancel_day[i] >= 0
                else None,
                "churn_kind": self.churn_kind[i],
                "mrr_start": int(self.mrr_at_start[i]),
                "mrr_end": int(self.mrr[i]),
                "mrr_history": [
                    [(start + timedelta(days=day)).isoformat(), mrr]
                    for day, mrr in self.mrr_history[i]
                ],
            }
