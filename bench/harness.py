"""Shared pieces of the benchmarks: repeat-and-median, a result table, results.json merging.

The machine is shared and noisy, so each figure is the median of several runs and every
table sets figures measured side by side in the same run against each other as ratios.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results.json"


def median_rate(run: Callable[[], float], repeats: int) -> tuple[float, list[float]]:
    """``run`` returns a rate; the median over ``repeats`` runs and all runs."""
    rates = [run() for _ in range(repeats)]
    return statistics.median(rates), rates


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def report(name: str, rows: list[tuple[str, float, str]], ratios: list[tuple[str, float]]) -> None:
    console = Console()
    table = Table(title=f"bench: {name}", title_justify="left")
    table.add_column("figure")
    table.add_column("median", justify="right")
    table.add_column("runs")
    for key, value, runs in rows:
        table.add_row(key, f"{value:,.0f}" if value >= 100 else f"{value:.3g}", runs)
    for key, value in ratios:
        table.add_row(key, f"{value:.2f}x", "ratio of medians, same run")
    console.print(table)


def merge(figures: dict[str, float]) -> None:
    """Merge flat figures (units in the key names) into bench/results.json."""
    try:
        current = json.loads(RESULTS.read_text())
    except FileNotFoundError:
        current = {}
    current.update({k: round(v, 3) for k, v in figures.items()})
    current["_machine"] = f"{platform.machine()}, {platform.python_implementation()} " + (
        platform.python_version()
    )
    RESULTS.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
