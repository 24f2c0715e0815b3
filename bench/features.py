"""CPU cost of the scoring features per event, per account, and their serialised size.

Events of a simulated world (1,000 accounts x 60 days, seed 3) as plain dicts, applied in
time order to one AccountState per account, as the online worker and training do:

features_apply_usage_us_per_event: ``apply`` of feature_used events alone (the bulk of the
  stream), the per-account dict lookup of the loop subtracted (target: at most 5 µs).
features_apply_all_us_per_event: ``apply`` of every event (billing, tickets with their
  VADER sentiment once per ticket, ignored types).
features_compute_us_per_account: ``features(as_of)`` at the end of the world.
features_state_bytes_median / _p90: ``to_bytes()`` per account at the end of the world.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson

from bench.harness import median_rate, merge, report
from churnguard.scoring.features import AccountState
from churnguard.simulator.world import SimConfig, World

REPEATS = 5


def _events() -> list[dict[str, Any]]:
    world = World(SimConfig(accounts=1000, days=60, seed=3))
    return [orjson.loads(line) for day in world.run() for line in day.lines]


def _per_event_us(events: list[dict[str, Any]]) -> Callable[[], float]:
    def run() -> float:
        seen: dict[str, int] = {}
        started = time.perf_counter()
        for event in events:
            if seen.get(event["subject"]) is None:
                seen[event["subject"]] = 0
        loop = time.perf_counter() - started
        states: dict[str, AccountState] = {}
        started = time.perf_counter()
        for event in events:
            state = states.get(event["subject"])
            if state is None:
                state = states[event["subject"]] = AccountState()
            state.apply(event)
        return (time.perf_counter() - started - loop) / len(events) * 1e6

    return run


def run() -> dict[str, float]:
    events = _events()
    usage = [e for e in events if e["type"] == "churnguard.usage.feature_used"]
    usage_us, usage_runs = median_rate(_per_event_us(usage), REPEATS)
    all_us, all_runs = median_rate(_per_event_us(events), REPEATS)

    states: dict[str, AccountState] = {}
    for event in events:
        states.setdefault(event["subject"], AccountState()).apply(event)
    as_of = max(s.max_day for s in states.values())

    def compute() -> float:
        started = time.perf_counter()
        for state in states.values():
            state.features(as_of)
        return (time.perf_counter() - started) / len(states) * 1e6

    compute_us, compute_runs = median_rate(compute, REPEATS)
    sizes = sorted(len(s.to_bytes()) for s in states.values())
    median_bytes = statistics.median(sizes)
    p90_bytes = sizes[int(0.9 * (len(sizes) - 1))]

    def fmt(runs: list[float]) -> str:
        return ", ".join(f"{r:.2f}" for r in runs)

    report(
        f"features ({len(events):,} events, {len(states):,} accounts, one core)",
        [
            ("features_apply_usage_us_per_event", usage_us, fmt(usage_runs)),
            ("features_apply_all_us_per_event", all_us, fmt(all_runs)),
            ("features_compute_us_per_account", compute_us, fmt(compute_runs)),
            ("features_state_bytes_median", median_bytes, f"max {sizes[-1]}"),
            ("features_state_bytes_p90", p90_bytes, ""),
        ],
        [],
    )
    return {
        "features_apply_usage_us_per_event": usage_us,
        "features_apply_all_us_per_event": all_us,
        "features_compute_us_per_account": compute_us,
        "features_state_bytes_median": median_bytes,
        "features_state_bytes_p90": p90_bytes,
    }


if __name__ == "__main__":
    merge(run())
