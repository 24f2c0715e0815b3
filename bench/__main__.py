"""Run the benchmarks and merge their figures into bench/results.json."""

from __future__ import annotations

import argparse
import importlib

from bench.harness import RESULTS, merge

BENCHMARKS = {
    "broker": "bench.broker",
    "envelope": "bench.envelope",
    "simulate": "bench.simulate",
    "ingest": "bench.ingest",
    "features": "bench.features",
    "scoring": "bench.scoring",
    "playbooks": "bench.playbooks",
    "notify": "bench.notify",
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), help="run one benchmark")
    args = parser.parse_args()
    names = [args.only] if args.only else list(BENCHMARKS)
    for name in names:
        merge(importlib.import_module(BENCHMARKS[name]).run())
    print(f"figures merged into {RESULTS.name} (bench/{RESULTS.name})")


if __name__ == "__main__":
    main()
