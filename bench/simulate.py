"""The simulator: the default world (2,000 accounts x 365 days) written to a folder.

simulate_s_2k_accounts_365_days: wall time of `write_world` (target: under 60 s).
simulate_events_per_s: events written per second.
simulate_rss_mib_2k_accounts: peak resident memory of the process that ran it.
Each run is a fresh process, so the memory figure is that run's own peak.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile

from bench.harness import merge, report

REPEATS = 3
RUN = """
import json, resource, sys, time
from pathlib import Path
from churnguard.simulator.output import write_world
from churnguard.simulator.world import SimConfig, World
started = time.perf_counter()
stats = write_world(World(SimConfig(accounts=2000, days=365, seed=1)), Path(sys.argv[1]))
print(json.dumps({"s": time.perf_counter() - started, "events": stats.events,
                  "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _once() -> dict[str, float]:
    out = tempfile.mkdtemp(prefix="cg-sim-bench-")
    try:
        done = subprocess.run(
            [sys.executable, "-c", RUN, out], capture_output=True, text=True, check=True
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    result: dict[str, float] = json.loads(done.stdout)
    return result


def run() -> dict[str, float]:
    runs = [_once() for _ in range(REPEATS)]
    seconds = statistics.median(r["s"] for r in runs)
    rates = [r["events"] / r["s"] for r in runs]
    rss = [r["rss_kib"] / 1024 for r in runs]
    report(
        "simulate (2,000 accounts x 365 days, written to a folder)",
        [
            ("simulate_s_2k_accounts_365_days", seconds, ", ".join(f"{r['s']:.1f}" for r in runs)),
            (
                "simulate_events_per_s",
                statistics.median(rates),
                ", ".join(f"{r:,.0f}" for r in rates),
            ),
            (
                "simulate_rss_mib_2k_accounts",
                statistics.median(rss),
                ", ".join(f"{r:.0f}" for r in rss),
            ),
        ],
        [("target 60 s / measured", 60 / seconds)],
    )
    return {
        "simulate_s_2k_accounts_365_days": seconds,
        "simulate_events_per_s": statistics.median(rates),
        "simulate_rss_mib_2k_accounts": statistics.median(rss),
    }


if __name__ == "__main__":
    merge(run())
