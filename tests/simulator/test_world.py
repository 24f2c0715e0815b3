"""The simulated world: reproducible, valid against the registry, realistic, responsive."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest

from churnguard.common.events import event_class_for
from churnguard.common.topics import Topic
from churnguard.simulator import catalogue as cat
from churnguard.simulator.baseline import auc, evaluate
from churnguard.simulator.output import (
    EVENTS,
    GROUND_TRUTH,
    SUMMARY,
    read_ground_truth,
    realism,
    write_world,
)
from churnguard.simulator.world import SimConfig, World

# the ranges docs/simulator.md documents, with their sources
MONTHLY_LOGO_CHURN = (0.012, 0.042)
INVOLUNTARY_SHARE = (0.20, 0.40)
NPS = (10, 50)
DETRACTOR_SHARE = (0.10, 0.30)
NRR = (0.92, 1.12)
GRR = (0.80, 0.95)


def world_to(folder: Path, **config: object) -> Path:
    write_world(World(SimConfig(**config)), folder, parquet=False)  # type: ignore[arg-type]
    return folder


def test_same_seed_gives_byte_identical_output(tmp_path: Path) -> None:
    a = world_to(tmp_path / "a", accounts=300, days=60, seed=7)
    b = world_to(tmp_path / "b", accounts=300, days=60, seed=7)
    c = world_to(tmp_path / "c", accounts=300, days=60, seed=8)
    for name in (EVENTS, GROUND_TRUTH):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()


def test_every_event_validates_against_the_registry(tmp_path: Path) -> None:
    """Each line through its topic's union (what a consumer uses) and its own model."""
    folder = world_to(tmp_path, accounts=600, days=120, seed=3)
    topic_of = {"usage": Topic.USAGE, "billing": Topic.BILLING, "feedback": Topic.FEEDBACK}
    rejects = []
    seen: Counter[str] = Counter()
    last_time = ""
    with (folder / EVENTS).open("rb") as f:
        for n, line in enumerate(f):
            raw = orjson.loads(line)
            try:
                event = topic_of[raw["type"].split(".")[1]].adapter.validate_json(line)
                assert isinstance(event, event_class_for(raw["type"]))
            except Exception as exc:
                rejects.append((n, str(exc)[:200]))
                continue
            seen[event.type] += 1
            assert raw["time"] >= last_time, f"line {n} is out of time order"
            last_time = raw["time"]
    assert rejects == []
    assert sum(seen.values()) > 100_000
    assert {t.split(".")[1] for t in seen} == set(topic_of)


def test_default_world_is_realistic_and_complete(tmp_path: Path) -> None:
    """`churnguard simulate` with defaults, as a user runs it; ranges from docs/simulator.md."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "churnguard.cli.main",
            "simulate",
            "--to",
            str(tmp_path),
            "--seed",
            "11",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = orjson.loads((tmp_path / SUMMARY).read_bytes())
    r = summary["realism"]
    assert MONTHLY_LOGO_CHURN[0] <= r["monthly_logo_churn"] <= MONTHLY_LOGO_CHURN[1], r
    assert INVOLUNTARY_SHARE[0] <= r["involuntary_share"] <= INVOLUNTARY_SHARE[1], r
    assert NPS[0] <= r["nps"] <= NPS[1], r
    assert DETRACTOR_SHARE[0] <= r["detractor_share"] <= DETRACTOR_SHARE[1], r
    assert NRR[0] <= r["nrr"] <= NRR[1], r
    assert GRR[0] <= r["grr"] <= GRR[1], r
    assert "logo churn" in result.stdout
    assert summary["parquet"] is True
    assert pq.read_metadata(tmp_path / "events.parquet").num_rows == summary["events"]
    produced = set(summary["events_by_type"])
    for cls in (c for c in _input_event_types()):
        assert cls in produced, f"the default world never produces {cls}"
    truth = [orjson.loads(line) for line in (tmp_path / GROUND_TRUTH).read_bytes().splitlines()]
    assert len(truth) > 2000
    assert {row["segment"] for row in truth} == {s.name for s in cat.SEGMENTS}
    churned = [row for row in truth if row["churned"]]
    assert all(row["mrr_history"][-1][1] == 0 for row in churned)
    assert all(row["cancel_date"] <= row["churn_date"] for row in churned)


def _input_event_types() -> list[str]:
    from churnguard.common.events import ALL_EVENT_TYPES

    return [
        cls.model_fields["type"].default
        for cls in ALL_EVENT_TYPES
        if cls.model_fields["type"].default.split(".")[1] in ("usage", "billing", "feedback")
    ]


def test_csm_calls_to_declining_accounts_prevent_churn() -> None:
    """Responses to actions: treated decliners churn clearly less than untreated ones."""
    config = SimConfig(accounts=1500, days=240, seed=5)
    world = World(config)
    declining = [i for i in range(world.n) if world.persona[i] == cat.DECLINING]
    treated = {world.account_ids[i] for i in declining[::2]}
    control = {world.account_ids[i] for i in declining[1::2]}
    for day in world.run():
        if day.day % 14 == 0:
            for account in sorted(treated):
                world.apply_action(account, "csm_call")
    truth = {row["account_id"]: row for row in world.ground_truth()}
    treated_churn = np.mean([truth[a]["churned"] for a in treated])
    control_churn = np.mean([truth[a]["churned"] for a in control])
    assert control_churn - treated_churn > 0.1, (treated_churn, control_churn)


def test_payment_retry_recovers_soft_declines_and_never_hard_ones() -> None:
    """Daily retries recover most soft-declined payments and no hard-declined one."""
    world = World(SimConfig(accounts=3000, days=60, seed=9))
    retried: dict[str, set[str]] = {"soft": set(), "hard": set()}
    recovered: dict[str, set[str]] = {"soft": set(), "hard": set()}
    for _ in world.run():
        for a in np.flatnonzero(world.dun_code >= 0).tolist():
            kind = "hard" if cat.DECLINE_HARD[world.dun_code[a]] else "soft"
            account = world.account_ids[a]
            retried[kind].add(account)
            if world.apply_action(account, "payment_retry") == "payment_succeeded":
                recovered[kind].add(account)
    assert len(retried["hard"]) > 10
    assert recovered["hard"] == set()
    assert len(recovered["soft"]) > 0.5 * len(retried["soft"])


def test_in_app_guide_adopts_a_sticky_feature() -> None:
    world = World(SimConfig(accounts=200, days=2, seed=1, effects={"guide_adoption": 1.0}))
    world.step()
    a = next(
        i
        for i in range(world.n)
        if world.adopted[i] & cat.STICKY_MASK != cat.STICKY_MASK and world.state[i] == 0
    )
    before = int(world.adopted[a]) & cat.STICKY_MASK
    assert world.apply_action(world.account_ids[a], "in_app_guide") == "clicked"
    assert (int(world.adopted[a]) & cat.STICKY_MASK) != before


def test_baseline_separates_churners_on_another_seed_but_no_count_is_perfect(
    tmp_path: Path,
) -> None:
    train = world_to(tmp_path / "train", accounts=1500, days=270, seed=1)
    test = world_to(tmp_path / "test", accounts=1500, days=270, seed=2)
    report = evaluate(train, test)
    assert report.test_accounts > 1000
    assert report.trend_auc > 0.7
    name, best = report.best_single
    assert best < 0.9, f"{name} alone separates churners almost perfectly ({best:.3f})"


def test_auc_of_known_rankings() -> None:
    label = np.array([0, 0, 1, 1], dtype=float)
    assert auc(np.array([0.1, 0.2, 0.8, 0.9]), label) == 1.0
    assert auc(np.array([0.9, 0.8, 0.2, 0.1]), label) == 0.0
    assert auc(np.array([0.5, 0.5, 0.5, 0.5]), label) == 0.5


def test_realism_figures_from_a_hand_made_world() -> None:
    config = SimConfig(accounts=2, days=365, start=date(2025, 1, 1))
    rows = [
        {
            "signup_date": "2024-01-01",
            "churned": False,
            "churn_date": None,
            "churn_kind": None,
            "mrr_start": 1000,
            "mrr_end": 1500,
        },
        {
            "signup_date": "2024-06-01",
            "churned": True,
            "churn_date": "2025-07-02",
            "churn_kind": "involuntary",
            "mrr_start": 1000,
            "mrr_end": 0,
        },
    ]
    r = realism(rows, [10, 9, 7, 3], config)
    assert r.involuntary_share == 1.0
    assert r.nrr == pytest.approx(1500 / 2000)
    assert r.grr == pytest.approx(1000 / 2000)
    assert r.nps == pytest.approx(25.0)
    assert r.monthly_logo_churn == pytest.approx(1 / ((365 + 182) / 30.44))


def test_subscription_events_give_every_accounts_mrr_in_time_order(tmp_path: Path) -> None:
    """Following the stream in time order, a consumer knows each account's MRR all along.

    Every account's first subscription event is its creation, dated at its sign-up, also for
    customers who signed up before day 0; each change builds on the one before it. Seed 9
    once stamped a day's second change of an account before its first (changes are decided
    in order but drawn at random seconds), which a time-ordered consumer cannot undo.
    """
    folder = world_to(tmp_path, accounts=300, days=365, seed=9)
    truth = {row["account_id"]: row for row in read_ground_truth(folder)}
    last: dict[str, dict[str, Any]] = {}
    with (folder / EVENTS).open("rb") as f:
        for line in f:
            if b'"churnguard.billing.subscription_' not in line:
                continue
            event = orjson.loads(line)
            account, data, kind = event["subject"], event["data"], event["type"].split(".")[-1]
            before = last.get(account)
            if kind == "subscription_created":
                assert before is None, event
                assert event["time"][:10] == truth[account]["signup_date"]
                assert data["mrr"] == truth[account]["mrr_history"][0][1]
            else:
                assert before is not None, f"{kind} before the subscription exists: {event}"
                assert before["type"] != "churnguard.billing.subscription_cancelled", event
                expected = data["previous_mrr"] if kind == "subscription_updated" else data["mrr"]
                assert expected == before["data"]["mrr"], (before, event)
            last[account] = event
    assert set(last) == set(truth)


def test_revenue_moves_include_seats_plans_and_add_ons(tmp_path: Path) -> None:
    folder = world_to(tmp_path, accounts=1000, days=180, seed=6)
    moves: Counter[str] = Counter()
    with (folder / EVENTS).open("rb") as f:
        for line in f:
            if b"subscription_updated" not in line:
                continue
            data = orjson.loads(line)["data"]
            if data["quantity"] != data["previous_quantity"]:
                moves[
                    "seats up" if data["quantity"] > data["previous_quantity"] else "seats down"
                ] += 1
            elif data["plan"] != data["previous_plan"]:
                moves["plan upgrade"] += 1
            else:
                moves[
                    "add-on bought" if data["mrr"] > data["previous_mrr"] else "add-on dropped"
                ] += 1
    assert set(moves) == {
        "seats up",
        "seats down",
        "plan upgrade",
        "add-on bought",
        "add-on dropped",
    }, moves
