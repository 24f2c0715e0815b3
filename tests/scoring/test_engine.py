"""The scoring engine without Kafka: time alone moves scores, state survives in buckets."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from pydantic import TypeAdapter

from churnguard.common.events.derived import RevenueMovement, ScoreEvent, SignalEvent
from churnguard.scoring.engine import Released, ScoringEngine, TimeAligner, decode_bucket
from churnguard.scoring.model import DEFAULT_MODEL_PATH, ModelWatcher

START = date(2025, 3, 1)
SCORES, SIGNALS = TypeAdapter(ScoreEvent), TypeAdapter(SignalEvent)


class Wall:
    """A wall clock the test moves."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at.timestamp()


def ts(day: date, hour: int = 10) -> str:
    return f"{day.isoformat()}T{hour:02d}:00:00Z"


def busy_account(account: str, days: int) -> list[dict[str, Any]]:
    """A subscribed account whose 8 users use 3 features every weekday for ``days`` days."""
    events: list[dict[str, Any]] = [
        {
            "specversion": "1.0",
            "id": f"{account}-sub",
            "source": "/test",
            "type": "churnguard.billing.subscription_created",
            "time": ts(START, 8),
            "subject": account,
            "data": {
                "subscription_id": f"sub_{account}",
                "status": "active",
                "plan": "growth",
                "quantity": 10,
                "mrr": 30000,
                "currency": "usd",
                "interval": "month",
            },
        }
    ]
    for d in range(days):
        day = START + timedelta(days=d)
        if day.weekday() >= 5:
            continue
        for user in range(8):
            for feature in ("reports", "integrations", "automations"):
                events.append(
                    {
                        "id": f"{account}-{d}-{user}-{feature}",
                        "type": "churnguard.usage.feature_used",
                        "time": ts(day),
                        "subject": account,
                        "data": {"user_id": f"u{user}", "feature": feature, "count": 3},
                    }
                )
    return events


def engine_at(day: date) -> tuple[ScoringEngine, Wall]:
    wall = Wall(datetime.combine(day, datetime.min.time(), UTC) + timedelta(hours=20))
    return ScoringEngine(ModelWatcher(DEFAULT_MODEL_PATH), wall=wall), wall


def assert_applied_once(engine: ScoringEngine, account: str, events: list[dict[str, Any]]) -> None:
    """``account`` in ``engine`` has the features of ``events`` applied once, in order."""
    once, _ = engine_at(date.fromordinal(engine.clock.today()))
    once.apply(0, events)
    today = once.clock.today()
    got, want = engine.account(account), once.account(account)
    assert got is not None
    assert want is not None
    assert got.features.features(today) == want.features.features(today)
    assert got.revenue.mrr == want.revenue.mrr


def scores_of(outputs: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [e for kind, e in outputs if kind == "scores"]


def test_a_silent_account_rises_in_risk_by_the_clock_alone() -> None:
    days = 75
    engine, wall = engine_at(START + timedelta(days=days - 1))
    _outputs, rejected = engine.apply(0, busy_account("acct_busy", days))
    assert rejected == []
    (first,) = scores_of(engine.score_pending())
    SCORES.validate_python(first)
    assert engine.score_pending() == []  # nothing touched since

    probabilities = [first["data"]["churn_probability"]]
    for _ in range(4):  # four silent weeks: no event at all, only the clock moves
        wall.at += timedelta(days=7)
        assert engine.roll_days() == 1
        for kind, event in engine.score_pending():
            (SCORES if kind == "scores" else SIGNALS).validate_python(event)
            if kind == "scores":
                probabilities.append(event["data"]["churn_probability"])
    assert len(probabilities) >= 3  # re-scored by the clock, emitted when it changed
    assert probabilities[-1] > probabilities[0] + 0.05, probabilities
    record = engine.account("acct_busy")
    assert record is not None
    assert record.features.features(engine.clock.today())["days_since_active"] >= 28
    assert record.signals.tier != "healthy"


def test_state_survives_in_buckets() -> None:
    days = 40
    engine, _ = engine_at(START + timedelta(days=days - 1))
    for n in range(30):
        engine.apply(n % 2, busy_account(f"acct_{n}", days))
    engine.score_pending()
    blobs = list(engine.take_dirty())
    assert {p for p, _, _ in blobs} == {0, 1}
    assert list(engine.take_dirty()) == []  # clean once written

    restored, _ = engine_at(START + timedelta(days=days - 1))
    for partition, _, blob in blobs:
        restored.load_bucket(partition, blob)
    assert restored.accounts() == 30
    today = engine.clock.today()
    for n in range(30):
        before, after = engine.account(f"acct_{n}"), restored.account(f"acct_{n}")
        assert before is not None
        assert after is not None
        assert after.features.features(today) == before.features.features(today)
        assert after.signals == before.signals
        assert after.revenue.mrr == before.revenue.mrr == 30000
    size = sum(len(b) for _, _, b in blobs) / 30
    assert size < 4096, f"{size:.0f} bytes per account in the changelog"
    assert sum(len(decode_bucket(b)[1]) for _, _, b in blobs) == 30


def test_events_from_the_future_and_unreadable_ones_are_rejected_the_rest_applied() -> None:
    engine, _ = engine_at(START + timedelta(days=9))
    good = busy_account("acct_ok", 10)
    future = dict(good[-1], id="f", time=ts(START + timedelta(days=30)))
    nonsense = {"id": "x", "type": "churnguard.usage.feature_used", "subject": "acct_ok"}
    outputs, rejected = engine.apply(0, [*good, future, nonsense])
    assert [r.event["id"] for r in rejected] == ["f", "x"]
    assert "future" in rejected[0].reason
    assert "time" in rejected[1].reason
    (movement,) = [e for kind, e in outputs if kind == "revenue"]
    assert RevenueMovement.model_validate(movement).data.kind == "new"
    assert engine.events_applied == len(good)


def ev(day: int, topic: str, n: int) -> dict[str, Any]:
    return {"id": f"{topic}-{n}", "time": ts(START + timedelta(days=day))}


class Monotonic:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_aligner_merges_topics_by_event_time_and_acks_whole_envelopes() -> None:
    clock = Monotonic()
    highwater: dict[tuple[str, int], int] = {}
    aligner = TimeAligner(
        ["usage", "billing", "feedback"],
        max_wait_s=0.5,
        highwater=lambda t, p: highwater.get((t, p)),
        monotonic=clock,
    )
    # billing runs ahead: its one record covers days 0..90; usage has come up to day 5
    aligner.add(0, "billing", 0, [ev(0, "billing", 0), ev(90, "billing", 1)], "b0")
    aligner.add(0, "usage", 0, [ev(d, "usage", d) for d in range(6)], "u0")
    # feedback has not delivered and is not known to be empty: wait for it
    assert aligner.release(0) == Released()
    highwater[("feedback", 0)] = 0  # an empty partition: nothing to wait for
    highwater[("billing", 0)] = 1
    released = aligner.release(0)
    assert [e["id"] for e in released.events] == [
        "billing-0",
        *(f"usage-{d}" for d in range(6)),
    ]
    assert released.origins == ["b0", *["u0"] * 6]
    assert released.finished == ["u0"]  # b0 is not done: its day-90 event waits for usage
    assert aligner.release(0) == Released()  # usage is not caught up: billing-1 waits
    clock.now += 0.6  # ... but not for ever
    released = aligner.release(0)
    assert [e["id"] for e in released.events] == ["billing-1"]
    assert released.finished == ["b0"]
    # the idle lane counts again once it delivers
    aligner.add(0, "usage", 1, [ev(91, "usage", 91)], "u1")
    aligner.add(0, "billing", 1, [ev(95, "billing", 2)], "b1")
    assert [e["id"] for e in aligner.release(0).events] == ["usage-91"]


def test_a_record_consumed_again_after_a_crash_is_applied_once() -> None:
    days = 20
    engine, _ = engine_at(START + timedelta(days=days - 1))
    events = busy_account("acct_r", days)
    head = events[:-40]
    origins = [("usage", 7, i) for i in range(len(events) - 1)] + [("usage", 7, -1)]
    # the first part of the record was applied and persisted, then the worker died
    engine.apply(0, head, origins[: len(head)])
    blobs = list(engine.take_dirty())
    restored, _ = engine_at(START + timedelta(days=days - 1))
    for partition, _, blob in blobs:
        restored.load_bucket(partition, blob)
    # the record was not acknowledged: it is consumed again, whole
    restored.apply(0, events, origins)
    assert restored.replayed_skipped == len(head)
    assert_applied_once(restored, "acct_r", events)


def test_a_lane_known_to_be_behind_is_waited_for_however_long() -> None:
    clock = Monotonic()
    highwater = {("usage", 0): 5, ("feedback", 0): 0, ("billing", 0): 1}
    aligner = TimeAligner(
        ["usage", "billing", "feedback"],
        max_wait_s=0.5,
        highwater=lambda t, p: highwater.get((t, p)),
        monotonic=clock,
    )
    aligner.add(0, "usage", 0, [ev(1, "usage", 1)], "u0")
    aligner.add(0, "billing", 0, [ev(1, "billing", 0), ev(40, "billing", 1)], "b0")
    assert [e["id"] for e in aligner.release(0).events] == ["billing-0", "usage-1"]
    clock.now += 60  # usage has four more records to deliver: billing-1 must wait
    assert aligner.release(0).events == []
    aligner.add(0, "usage", 4, [ev(41, "usage", 41)], "u4")
    assert [e["id"] for e in aligner.release(0).events] == ["billing-1", "usage-41"]


def test_a_lane_that_has_not_delivered_is_waited_for_when_kafka_says_it_holds_more() -> None:
    """After a restart the lanes resume from their committed offsets: one whose partition
    holds records past it will deliver, however slowly (its events must not turn late);
    one whose committed offset is its highwater has nothing to deliver."""
    clock = Monotonic()
    highwater = {("usage", 0): 10, ("billing", 0): 3, ("feedback", 0): 7}
    start = {("usage", 0): 8, ("billing", 0): 3, ("feedback", 0): 5}
    aligner = TimeAligner(
        ["usage", "billing", "feedback"],
        max_wait_s=0.5,
        highwater=lambda t, p: highwater.get((t, p)),
        start=lambda t, p: start.get((t, p)),
        monotonic=clock,
    )
    aligner.add(0, "usage", 8, [ev(50, "usage", 50)], "u8")
    clock.now += 600  # feedback resumes at 5 of 7: it is waited for, not idled
    assert aligner.release(0).events == []
    aligner.add(0, "feedback", 5, [ev(49, "feedback", 1)], "f5")
    aligner.add(0, "feedback", 6, [ev(51, "feedback", 2)], "f6")
    # billing (committed offset = highwater) was never waited for; usage holds one more
    assert [e["id"] for e in aligner.release(0).events] == ["feedback-1", "usage-50"]
    aligner.add(0, "usage", 9, [ev(52, "usage", 52)], "u9")
    assert [e["id"] for e in aligner.release(0).events] == ["feedback-2", "usage-52"]


def test_a_bucket_written_before_the_replay_catches_up_keeps_what_it_holds() -> None:
    """Restart, score (which writes the restored bucket) before the records consumed again
    reach where the bucket was written, restart again: every event still counts once."""
    days = 20
    when = START + timedelta(days=days - 1)
    events = busy_account("acct_r", days)
    origins = [("usage", i, -1) for i in range(len(events))]
    first, _ = engine_at(when)
    first.apply(0, events, origins)
    blobs = list(first.take_dirty())  # persisted with everything; offsets never committed

    second, _ = engine_at(when)
    for partition, _, blob in blobs:
        second.load_bucket(partition, blob)
    half = len(events) // 2
    second.apply(0, events[:half], origins[:half])  # consumed again from offset 0 ...
    second.score_pending()
    blobs = list(second.take_dirty())  # ... and persisted again half way: killed
    assert blobs

    third, _ = engine_at(when)
    for partition, _, blob in blobs:
        third.load_bucket(partition, blob)
    third.apply(0, events, origins)  # the whole record range once more
    assert_applied_once(third, "acct_r", events)
    assert third.replayed_skipped == len(events)


def test_a_bucket_written_right_after_a_restart_claims_only_its_own_progress() -> None:
    """Two buckets persisted at different points; after a restart, scoring writes the one
    persisted earlier before anything is consumed: it must not claim the other's progress
    (a second restart would then skip events it never held)."""
    when = START + timedelta(days=9)
    a, b = busy_account("acct_a", 10), busy_account("acct_b", 10)
    engine, _ = engine_at(when)
    engine.apply(0, b, [("usage", i, -1) for i in range(len(b))])
    early = {bucket: blob for _, bucket, blob in engine.take_dirty()}
    engine.apply(0, a, [("usage", len(b) + i, -1) for i in range(len(a))])
    late = {bucket: blob for _, bucket, blob in engine.take_dirty()}
    b_bucket = engine.account("acct_b").bucket
    assert b_bucket not in late, "the test needs the accounts in different buckets"

    restarted, _ = engine_at(when)
    for blob in [*early.values(), *late.values()]:
        restarted.load_bucket(0, blob)
    restarted.account("acct_b").signals.pending = True
    restarted.partition(0).pending["acct_b"] = None
    restarted.score_pending()
    written = {bucket: blob for _, bucket, blob in restarted.take_dirty()}
    assert decode_bucket(written[b_bucket])[0] == {"usage": (len(b) - 1, -1)}


def test_a_record_delivered_twice_to_one_process_is_applied_once() -> None:
    """Faust seeks to the committed offset after recovery, which can deliver records the
    agent has already had: their events must count once."""
    engine, _ = engine_at(START + timedelta(days=9))
    events = busy_account("acct_twice", 10)
    origins = [("usage", 3, i) for i in range(len(events) - 1)] + [("usage", 3, -1)]
    engine.apply(0, events, origins)
    engine.apply(0, events, origins)
    assert_applied_once(engine, "acct_twice", events)
    assert engine.redelivered_skipped == len(events)
