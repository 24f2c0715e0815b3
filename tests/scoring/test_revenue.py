"""Revenue movements: the per-account MRR ledger, by rule and against the simulator's truth."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from churnguard.common.events.derived import RevenueMovement
from churnguard.common.events.schemas import topic_example_files
from churnguard.common.topics import Topic
from churnguard.ingest.stripe_webhooks import MappedEvent, map_event
from churnguard.scoring.revenue import (
    RECENT_EVENT_IDS,
    CurrencyMismatch,
    RevenueLedger,
    movement_id,
)
from churnguard.simulator.http_sink import to_stripe
from churnguard.simulator.output import EVENTS, read_ground_truth, write_world
from churnguard.simulator.world import SimConfig, World

Event = dict[str, Any]
ACCOUNT = "acct_7f3a91"
T0 = datetime(2025, 3, 3, 9, 30, tzinfo=UTC)


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def subscription(
    kind: str,
    event_id: str,
    at: datetime,
    mrr: int,
    *,
    sub: str = "sub_base",
    status: str = "active",
    currency: str = "usd",
    account: str = ACCOUNT,
    **extra: Any,
) -> Event:
    """A billing subscription event as ``envelope.unpack`` gives it (a plain dict)."""
    data: Event = {
        "subscription_id": sub,
        "plan": "growth",
        "interval": "month",
        "quantity": max(1, mrr // 3000),
        "mrr": mrr,
        "currency": currency,
        "status": status,
    }
    if kind == "updated":
        data["previous_mrr"] = extra.pop("previous_mrr", mrr)
    data |= extra
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "/stripe",
        "type": f"churnguard.billing.subscription_{kind}",
        "time": _iso(at),
        "subject": account,
        "datacontenttype": "application/json",
        "schemaversion": 1,
        "data": data,
    }


def created(event_id: str, at: datetime, mrr: int, **kw: Any) -> Event:
    return subscription("created", event_id, at, mrr, **kw)


def updated(event_id: str, at: datetime, mrr: int, **kw: Any) -> Event:
    return subscription("updated", event_id, at, mrr, **kw)


def cancelled(
    event_id: str,
    at: datetime,
    mrr: int,
    *,
    effective: datetime | None = None,
    cancellation: str = "voluntary",
    **kw: Any,
) -> Event:
    return subscription(
        "cancelled",
        event_id,
        at,
        mrr,
        cancellation=cancellation,
        effective_at=_iso(effective or at),
        **kw,
    )


def invoice_paid(event_id: str, at: datetime, amount: int) -> Event:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "/stripe",
        "type": "churnguard.billing.invoice_paid",
        "time": _iso(at),
        "subject": ACCOUNT,
        "data": {"invoice_id": "in_1", "amount_paid": amount, "currency": "usd"},
    }


def apply_all(ledger: RevenueLedger, events: list[Event]) -> list[Event]:
    return [m for e in events for m in ledger.apply(e)]


def summary(movements: list[Event]) -> list[tuple[str, int, int]]:
    return [(m["data"]["kind"], m["data"]["mrr_before"], m["data"]["mrr_after"]) for m in movements]


def assert_valid_chain(movements: list[Event]) -> None:
    """Every movement is a valid RevenueMovement, and each starts where the previous ended."""
    after = 0
    for m in movements:
        RevenueMovement.model_validate(m)
        assert m["data"]["mrr_before"] == after, movements
        after = m["data"]["mrr_after"]


# -- one kind at a time ----------------------------------------------------------------------


def test_a_first_subscription_is_new_business() -> None:
    ledger = RevenueLedger(ACCOUNT)
    [movement] = ledger.apply(created("evt_c1", T0, 122_500))
    RevenueMovement.model_validate(movement)
    assert movement == {
        "specversion": "1.0",
        "id": "mrr_evt_c1_new",
        "source": "/scoring",
        "type": "churnguard.revenue.revenue_movement",
        "time": "2025-03-03T09:30:00Z",
        "subject": ACCOUNT,
        "datacontenttype": "application/json",
        "schemaversion": 1,
        "data": {
            "kind": "new",
            "mrr_before": 0,
            "mrr_after": 122_500,
            "delta": 122_500,
            "currency": "usd",
            "subscription_id": "sub_base",
        },
    }
    assert ledger.mrr == 122_500


def test_updates_expand_and_contract_from_the_events_own_mrr() -> None:
    ledger = RevenueLedger(ACCOUNT)
    movements = apply_all(
        ledger,
        [
            created("evt_c1", T0, 30_000),
            updated("evt_u1", T0 + timedelta(days=3), 45_000, previous_mrr=30_000),
            # a wrong previous_mrr does not matter: the subscription's own MRR is the truth
            updated("evt_u2", T0 + timedelta(days=9), 15_000, previous_mrr=99_999),
            # an update that does not change the MRR (a status or plan label) moves nothing
            updated("evt_u3", T0 + timedelta(days=10), 15_000, status="past_due"),
        ],
    )
    assert summary(movements) == [
        ("new", 0, 30_000),
        ("expansion", 30_000, 45_000),
        ("contraction", 45_000, 15_000),
    ]
    assert [m["time"] for m in movements[1:]] == ["2025-03-06T09:30:00Z", "2025-03-12T09:30:00Z"]
    assert_valid_chain(movements)


def test_a_cancellation_at_period_end_churns_then_not_when_requested() -> None:
    ledger = RevenueLedger(ACCOUNT)
    requested, period_end = T0 + timedelta(days=40), T0 + timedelta(days=59)
    ledger.apply(created("evt_c1", T0, 24_500))
    [churn] = ledger.apply(
        cancelled("evt_x1", requested, 24_500, effective=period_end, reason="too_expensive")
    )
    assert churn["time"] == _iso(period_end)
    assert churn["id"] == "mrr_evt_x1_churn"
    assert churn["data"] == {
        "kind": "churn",
        "mrr_before": 24_500,
        "mrr_after": 0,
        "delta": -24_500,
        "currency": "usd",
        "cancellation": "voluntary",
        "subscription_id": "sub_base",
    }
    # booked now (the billing system sends nothing more when it takes effect) ...
    assert ledger.mrr == 0
    # ... and a later change of the leaving subscription cannot book it again
    assert ledger.apply(updated("evt_u9", requested + timedelta(days=1), 30_000)) == []


def test_involuntary_churn_at_once() -> None:
    ledger = RevenueLedger(ACCOUNT)
    ledger.apply(created("evt_c1", T0, 58_800))
    [churn] = ledger.apply(
        cancelled(
            "evt_x1", T0 + timedelta(days=44), 58_800, cancellation="involuntary", status="canceled"
        )
    )
    assert churn["time"] == _iso(T0 + timedelta(days=44))
    assert (churn["data"]["kind"], churn["data"]["cancellation"]) == ("churn", "involuntary")


def test_a_return_after_churn_is_a_reactivation() -> None:
    ledger = RevenueLedger(ACCOUNT)
    movements = apply_all(
        ledger,
        [
            created("evt_c1", T0, 9_000),
            cancelled("evt_x1", T0 + timedelta(days=20), 9_000, effective=T0 + timedelta(days=31)),
            created("evt_c2", T0 + timedelta(days=90), 12_000, sub="sub_again"),
            updated("evt_u2", T0 + timedelta(days=95), 15_000, sub="sub_again"),
        ],
    )
    assert summary(movements) == [
        ("new", 0, 9_000),
        ("churn", 9_000, 0),
        ("reactivation", 0, 12_000),
        ("expansion", 12_000, 15_000),
    ]
    assert movements[2]["id"] == "mrr_evt_c2_reactivation"
    assert_valid_chain(movements)


def test_add_on_subscriptions_sum_to_the_accounts_mrr() -> None:
    ledger = RevenueLedger(ACCOUNT)
    movements = apply_all(
        ledger,
        [
            created("evt_c1", T0, 100_000),
            created("evt_c2", T0 + timedelta(days=5), 25_000, sub="sub_addon"),
            updated("evt_u1", T0 + timedelta(days=6), 120_000),
            cancelled("evt_x2", T0 + timedelta(days=30), 25_000, sub="sub_addon"),
            cancelled("evt_x1", T0 + timedelta(days=60), 120_000, cancellation="involuntary"),
        ],
    )
    assert summary(movements) == [
        ("new", 0, 100_000),
        ("expansion", 100_000, 125_000),
        ("expansion", 125_000, 145_000),
        ("contraction", 145_000, 120_000),  # the add-on leaves: no churn, no cancellation
        ("churn", 120_000, 0),
    ]
    assert "cancellation" not in movements[3]["data"]
    assert movements[4]["data"]["cancellation"] == "involuntary"
    assert ledger.subscription_mrr() == {"sub_base": 0, "sub_addon": 0}
    assert_valid_chain(movements)


def test_trials_count_from_their_conversion() -> None:
    ledger = RevenueLedger(ACCOUNT)
    assert ledger.apply(created("evt_c1", T0, 24_500, status="trialing")) == []
    assert ledger.mrr == 0
    [new] = ledger.apply(
        updated(
            "evt_u1", T0 + timedelta(days=14), 24_500, previous_status="trialing", status="active"
        )
    )
    assert (new["data"]["kind"], new["time"]) == ("new", _iso(T0 + timedelta(days=14)))


def test_unpaid_is_involuntary_churn_and_paying_again_a_reactivation() -> None:
    ledger = RevenueLedger(ACCOUNT)
    movements = apply_all(
        ledger,
        [
            created("evt_c1", T0, 9_000),
            updated("evt_u1", T0 + timedelta(days=31), 9_000, status="past_due"),
            updated("evt_u2", T0 + timedelta(days=45), 9_000, status="unpaid"),
            updated("evt_u3", T0 + timedelta(days=50), 9_000, status="active"),
        ],
    )
    assert summary(movements) == [
        ("new", 0, 9_000),
        ("churn", 9_000, 0),
        ("reactivation", 0, 9_000),
    ]
    assert movements[1]["data"]["cancellation"] == "involuntary"


def test_a_subscription_first_seen_through_an_update_counts_from_zero() -> None:
    """Revenue the ledger never saw booked is booked when it first shows, in one movement."""
    ledger = RevenueLedger(ACCOUNT)
    [movement] = ledger.apply(updated("evt_u1", T0, 45_000, previous_mrr=30_000))
    assert summary([movement]) == [("new", 0, 45_000)]
    # its cancellation, if that is all the ledger ever sees of a subscription, books nothing
    assert ledger.apply(cancelled("evt_x9", T0, 5_000, sub="sub_unseen")) == []


def test_invoices_and_refunds_move_no_mrr() -> None:
    ledger = RevenueLedger(ACCOUNT)
    ledger.apply(created("evt_c1", T0, 9_000))
    assert ledger.apply(invoice_paid("evt_i1", T0, 9_000)) == []
    assert ledger.mrr == 9_000


# -- duplicates, order, state -------------------------------------------------------------


def test_the_same_event_twice_books_once() -> None:
    ledger = RevenueLedger(ACCOUNT)
    events = [
        created("evt_c1", T0, 9_000),
        updated("evt_u1", T0 + timedelta(days=1), 12_000),
        cancelled("evt_x1", T0 + timedelta(days=2), 12_000, effective=T0 + timedelta(days=30)),
    ]
    once = [ledger.apply(e) for e in events]
    assert [ledger.apply(e) for e in events] == [[], [], []]
    assert [len(m) for m in once] == [1, 1, 1]


def test_same_second_updates_redelivered_do_not_revert_the_mrr() -> None:
    """Equal times cannot tell a redelivery from a later change: the id window does."""
    ledger = RevenueLedger(ACCOUNT)
    first, second = updated("evt_a", T0, 10_000), updated("evt_b", T0, 20_000)
    assert summary(apply_all(ledger, [first, second, first])) == [
        ("new", 0, 10_000),
        ("expansion", 10_000, 20_000),
    ]
    assert ledger.mrr == 20_000


def test_out_of_order_and_stale_updates_do_not_corrupt_the_mrr() -> None:
    ledger = RevenueLedger(ACCOUNT)
    later = updated("evt_u2", T0 + timedelta(hours=2), 30_000, previous_mrr=20_000)
    earlier = updated("evt_u1", T0 + timedelta(hours=1), 20_000, previous_mrr=10_000)
    movements = apply_all(ledger, [created("evt_c1", T0, 10_000), later, earlier])
    assert summary(movements) == [("new", 0, 10_000), ("expansion", 10_000, 30_000)]
    assert ledger.mrr == 30_000
    # a creation delivered after changes of its subscription is stale too
    assert ledger.apply(created("evt_c1-again", T0, 10_000)) == []
    # a duplicate older than the id window is stale by its time
    for i in range(RECENT_EVENT_IDS + 2):
        ledger.apply(invoice_paid(f"evt_i{i}", T0, 1))
        ledger.apply(updated(f"evt_f{i}", T0 + timedelta(hours=3), 30_000))
    assert ledger.apply(earlier) == []
    assert ledger.mrr == 30_000


def test_state_round_trips_and_a_replay_after_a_crash_gives_the_same_ids() -> None:
    ledger = RevenueLedger(ACCOUNT)
    ledger.apply(created("evt_c1", T0, 9_000))
    ledger.apply(created("evt_c2", T0, 25_000, sub="sub_addon"))
    saved = ledger.to_bytes()
    event = cancelled("evt_x1", T0 + timedelta(days=3), 9_000, effective=T0 + timedelta(days=9))
    first = ledger.apply(event)
    # the worker crashed before committing: the restored state sees the event again
    restored = RevenueLedger.from_bytes(saved)
    assert restored.to_state() == RevenueLedger.from_state(json.loads(saved)).to_state()
    assert restored.apply(event) == first
    assert first[0]["id"] == movement_id("evt_x1", "contraction")
    # and a state saved after the event makes its redelivery a no-op
    assert RevenueLedger.from_bytes(ledger.to_bytes()).apply(event) == []
    assert json.loads(ledger.to_bytes()) == ledger.to_state()


def test_long_event_ids_give_movement_ids_within_the_limit() -> None:
    long_id = "evt_" + "x" * 124
    assert len(movement_id(long_id, "reactivation")) <= 128
    assert movement_id(long_id, "new") != movement_id(long_id, "churn")
    assert movement_id("evt_1", "new") == "mrr_evt_1_new"


def test_a_second_currency_is_refused_while_the_account_pays_in_another() -> None:
    ledger = RevenueLedger(ACCOUNT)
    ledger.apply(created("evt_c1", T0, 9_000, currency="eur"))
    before = ledger.to_state()
    with pytest.raises(CurrencyMismatch, match="usd"):
        ledger.apply(created("evt_c2", T0, 5_000, sub="sub_addon"))
    assert ledger.to_state() == before
    ledger.apply(cancelled("evt_x1", T0 + timedelta(days=1), 9_000, currency="eur"))
    [back] = ledger.apply(created("evt_c3", T0 + timedelta(days=60), 5_000, sub="sub_usd"))
    assert (back["data"]["kind"], back["data"]["currency"]) == ("reactivation", "usd")


def test_another_accounts_event_is_refused() -> None:
    with pytest.raises(ValueError, match="acct_other"):
        RevenueLedger(ACCOUNT).apply(created("evt_c1", T0, 9_000, account="acct_other"))


def test_every_billing_example_goes_through() -> None:
    """The checked-in examples of events.billing, one ledger per account, in time order."""
    events = sorted(
        (json.loads(p.read_bytes()) for p in topic_example_files(Topic.BILLING.topic)),
        key=lambda e: e["time"],
    )
    ledgers: dict[str, RevenueLedger] = {}
    movements: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        account = event["subject"]
        ledger = ledgers.setdefault(account, RevenueLedger(account))
        movements[account] += ledger.apply(event)
        assert RevenueLedger.from_bytes(ledger.to_bytes()).to_state() == ledger.to_state()
    assert any(movements.values())
    for account_movements in movements.values():
        assert_valid_chain(account_movements)


@st.composite
def histories(draw: st.DrawFn) -> list[Event]:
    """Strictly time-ordered subscription events of up to three subscriptions."""
    events: list[Event] = []
    live: dict[str, bool] = {}
    at = T0
    for n in range(draw(st.integers(1, 25))):
        at += timedelta(minutes=draw(st.integers(1, 10_000)))
        sub = draw(st.sampled_from(["sub_a", "sub_b", "sub_c"]))
        mrr = draw(st.integers(0, 5) | st.integers(0, 10**7))
        status = draw(st.sampled_from(["active", "active", "past_due", "trialing", "unpaid"]))
        if sub not in live:
            events.append(created(f"e{n}", at, mrr, sub=sub, status=status))
            live[sub] = True
        elif live[sub] and draw(st.booleans()):
            effective = at + timedelta(days=draw(st.integers(0, 40)))
            events.append(cancelled(f"e{n}", at, mrr, sub=sub, effective=effective))
            live[sub] = False
        else:
            events.append(updated(f"e{n}", at, mrr, sub=sub, status=status))
    return events


@settings(max_examples=150, deadline=None)
@given(histories(), st.data())
def test_redeliveries_anywhere_change_nothing(history: list[Event], data: st.DataObject) -> None:
    clean = RevenueLedger(ACCOUNT)
    expected = apply_all(clean, history)
    assert_valid_chain(expected)
    noisy = RevenueLedger(ACCOUNT)
    got: list[Event] = []
    for i, event in enumerate(history):
        got += noisy.apply(event)
        for j in data.draw(st.lists(st.integers(0, i), max_size=3)):
            got += noisy.apply(history[j])  # a redelivery of this or any earlier event
        if data.draw(st.booleans()):
            noisy = RevenueLedger.from_bytes(noisy.to_bytes())
    assert got == expected
    assert noisy.mrr == clean.mrr


# -- against the simulator's ground truth ----------------------------------------------------

WORLD = SimConfig(accounts=500, days=365, seed=11)
"""500 customers at day 0 and ~130 new ones over a year. Seed 11 also has same-day chains of
subscription changes (a sign-up and its first upgrade, a change then a cancellation) that
the simulator once stamped out of order."""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("world")
    write_world(World(WORLD), folder, parquet=False)
    return folder


def billing_events(folder: Path) -> Iterator[Event]:
    with (folder / EVENTS).open("rb") as f:
        for line in f:
            if b'"type":"churnguard.billing.' in line:
                yield orjson.loads(line)


def through_stripe(events: Iterator[Event]) -> Iterator[Event]:
    """What ingest publishes for the same events sent as Stripe webhooks."""
    for event in events:
        mapped = map_event(to_stripe(event))
        assert isinstance(mapped, MappedEvent), mapped
        yield orjson.loads(mapped.event.model_dump_json(by_alias=True))


def mrr_on(history: list[tuple[date, int]], day: date) -> int:
    """A dated step function's value at the end of ``day`` (0 before its first step)."""
    value = 0
    for when, mrr in history:
        if when > day:
            break
        value = mrr
    return value


@pytest.mark.parametrize("feed", ["simulator", "stripe"])
def test_the_ledger_reproduces_the_simulators_mrr_to_the_cent(world: Path, feed: str) -> None:
    """Every billing event of a simulated year through one ledger per account.

    Each account's MRR (the deltas of its movements, by when they take effect) equals the
    ground truth's MRR history at the end of every day either records within the period,
    and at its start and end; churn hits the same accounts on the same day with the same
    voluntary/involuntary kind. ``stripe`` feeds the same events as ingest publishes them
    from the Stripe webhooks the simulator would send.
    """
    started = time.perf_counter()
    events = billing_events(world)
    if feed == "stripe":
        events = through_stripe(events)
    ledgers: dict[str, RevenueLedger] = {}
    booked: dict[str, list[Event]] = defaultdict(list)
    n_events = 0
    for event in events:
        n_events += 1
        account = event["subject"]
        ledger = ledgers.get(account) or ledgers.setdefault(account, RevenueLedger(account))
        booked[account] += ledger.apply(event)
    replay_s = time.perf_counter() - started

    day0 = WORLD.start
    end = day0 + timedelta(days=WORLD.days)  # the first day not simulated
    truth = read_ground_truth(world)
    assert set(booked) == {row["account_id"] for row in truth}
    mismatches = []
    kinds: Counter[str] = Counter()
    churns: Counter[str] = Counter()
    scheduled_beyond_end = 0
    for row in truth:
        account = row["account_id"]
        movements = booked[account]
        assert_valid_chain(movements)
        kinds.update(m["data"]["kind"] for m in movements)
        # the ledger's MRR over time: the deltas of its movements, by when each takes effect
        steps: list[tuple[date, int]] = []
        mrr = 0
        for m in sorted(movements, key=lambda m: m["time"]):
            mrr += m["data"]["delta"]
            steps.append((date.fromisoformat(m["time"][:10]), mrr))
        expected = [(date.fromisoformat(d), v) for d, v in row["mrr_history"]]
        days = sorted({d for d, _ in expected} | {d for d, _ in steps} | {day0, end})
        for day in (d for d in days if d < end):
            if mrr_on(steps, day) != mrr_on(expected, day):
                mismatches.append((account, day, mrr_on(steps, day), mrr_on(expected, day)))
        before_day0 = day0 - timedelta(days=1)
        assert mrr_on(steps, before_day0) == row["mrr_start"], account
        assert mrr_on(steps, end - timedelta(days=1)) == row["mrr_end"], account
        # churn: the same accounts, on the same day, voluntary or not, as the truth
        churn = [m for m in movements if m["data"]["kind"] == "churn"]
        assert len(churn) <= 1, churn
        if row["cancel_date"] is None:
            assert churn == [], account
            continue
        [movement] = churn
        effective = date.fromisoformat(movement["time"][:10])
        assert movement["data"]["cancellation"] == row["churn_kind"], account
        if row["churned"]:
            assert effective.isoformat() == row["churn_date"], account
            churns[row["churn_kind"]] += 1
        else:  # decided within the period, effective at a period end after it
            assert effective >= end, account
            scheduled_beyond_end += 1

    churned = Counter(row["churn_kind"] for row in truth if row["churned"])
    print(
        f"\n{feed}: {len(truth)} accounts, {n_events} billing events, "
        f"{sum(kinds.values())} movements {dict(sorted(kinds.items()))}, churned "
        f"{dict(churns)} (+{scheduled_beyond_end} effective after the period), "
        f"{len(mismatches)} mismatches, replay {replay_s:.2f} s"
    )
    assert mismatches == []
    assert churns == churned
    assert churned["voluntary"] > 0
    assert churned["involuntary"] > 0
    assert kinds["new"] == len(truth)  # every account has paid since its sign-up
    assert kinds["reactivation"] == 0  # the simulator's churned customers do not come back
    assert kinds["expansion"] > 0
    assert kinds["contraction"] > 0
