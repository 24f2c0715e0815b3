"""Writing a simulated world to a folder, and the realism figures of a world.

A world written with ``--to DIR`` is:

* ``events.jsonl``: every event, one structured CloudEvent per line, in time order
  (what ingest would publish; validates against the registry's models), opening with the
  ``subscription_created`` of the customers who signed up before day 0, dated then;
* ``events.parquet``: the same, when pyarrow is installed (columns ``id``, ``type``,
  ``time``, ``subject`` and ``data`` as JSON text);
* ``ground_truth.jsonl``: one line per account: segment, plan, hidden persona, signup,
  whether and when it churned (``churn_date`` is when the subscription ended), voluntary
  or involuntary, and its MRR history;
* ``summary.json``: the configuration, event counts and the realism figures below.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import orjson

from churnguard.simulator.world import DayOutput, SimConfig, World

EVENTS = "events.jsonl"
GROUND_TRUTH = "ground_truth.jsonl"
SUMMARY = "summary.json"
PARQUET = "events.parquet"


@dataclass
class Realism:
    """The figures the default world is calibrated against (docs/simulator.md)."""

    monthly_logo_churn: float
    annual_logo_churn: float
    involuntary_share: float
    nps: float
    detractor_share: float
    promoter_share: float
    nrr: float
    grr: float
    churned_accounts: int
    accounts: int


def realism(
    ground_truth: Iterable[dict[str, Any]], nps_scores: Iterable[int], config: SimConfig
) -> Realism:
    """Logo churn per account-month at risk, the involuntary share of churned logos, NPS of
    all answers, and NRR/GRR of the customers at day 0 over the simulated period."""
    start, end = config.start, config.start + timedelta(days=config.days)
    months = 0.0
    churned = involuntary = accounts = 0
    mrr_start = mrr_end = mrr_kept = 0
    for row in ground_truth:
        accounts += 1
        signup = date.fromisoformat(row["signup_date"])
        until = date.fromisoformat(row["churn_date"]) if row["churned"] else end
        months += max(0, (min(until, end) - max(signup, start)).days) / 30.44
        if row["churned"]:
            churned += 1
            involuntary += row["churn_kind"] == "involuntary"
        if signup < start:
            mrr_start += row["mrr_start"]
            mrr_end += row["mrr_end"]
            mrr_kept += min(row["mrr_start"], row["mrr_end"])
    scores = list(nps_scores)
    promoters = sum(s >= 9 for s in scores) / max(1, len(scores))
    detractors = sum(s <= 6 for s in scores) / max(1, len(scores))
    monthly = churned / months if months else 0.0
    return Realism(
        monthly_logo_churn=monthly,
        annual_logo_churn=1 - (1 - monthly) ** 12,
        involuntary_share=involuntary / churned if churned else 0.0,
        nps=100 * (promoters - detractors),
        detractor_share=detractors,
        promoter_share=promoters,
        nrr=mrr_end / mrr_start if mrr_start else 0.0,
        grr=mrr_kept / mrr_start if mrr_start else 0.0,
        churned_accounts=churned,
        accounts=accounts,
    )


@dataclass
class WriteStats:
    events: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    nps_scores: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0


Progress = Callable[[int, DayOutput], None]


def _type_of(line: bytes) -> str:
    # the type attribute sits at a fixed place in the lines the world writes; avoid a parse
    start = line.index(b'"type":"') + 8
    return line[start : line.index(b'"', start)].decode()


def write_world(
    world: World, out: Path, on_day: Progress | None = None, *, parquet: bool = True
) -> WriteStats:
    """Run the world to its end, writing the folder described in the module docstring.

    ``parquet=False`` skips the Parquet copy even when pyarrow is installed.
    """
    out.mkdir(parents=True, exist_ok=True)
    stats = WriteStats()
    started = time.perf_counter()
    with (out / EVENTS).open("wb", buffering=1 << 20) as events:
        for day in world.run():
            for line in day.lines:
                kind = _type_of(line)
                stats.by_type[kind] += 1
                if kind == "churnguard.feedback.nps_submitted":
                    stats.nps_scores.append(orjson.loads(line)["data"]["score"])
            events.write(b"\n".join(day.lines))
            if day.lines:
                events.write(b"\n")
            stats.events += len(day.lines)
            if on_day is not None:
                on_day(stats.events, day)
    with (out / GROUND_TRUTH).open("wb") as truth:
        truth.writelines(orjson.dumps(row) + b"\n" for row in world.ground_truth())
    parquet = parquet and _write_parquet(out)
    stats.elapsed_s = time.perf_counter() - started
    ground_truth = read_ground_truth(out)
    summary = {
        "config": json.loads(world.config.model_dump_json()),
        "events": stats.events,
        "events_by_type": dict(sorted(stats.by_type.items())),
        "realism": realism(ground_truth, stats.nps_scores, world.config).__dict__,
        "elapsed_s": round(stats.elapsed_s, 2),
        "parquet": parquet,
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return stats


def read_ground_truth(folder: Path) -> list[dict[str, Any]]:
    with (folder / GROUND_TRUTH).open("rb") as f:
        return [orjson.loads(line) for line in f]


def _write_parquet(out: Path, chunk: int = 200_000) -> bool:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return False
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("type", pa.string()),
            ("time", pa.string()),
            ("subject", pa.string()),
            ("data", pa.string()),
        ]
    )
    with (out / EVENTS).open("rb") as f, pq.ParquetWriter(out / PARQUET, schema) as writer:
        columns: dict[str, list[str]] = {name: [] for name in schema.names}

        def flush() -> None:
            writer.write_table(pa.table(columns, schema=schema))
            for values in columns.values():
                values.clear()

        for line in f:
            event = orjson.loads(line)
            for name in ("id", "type", "time", "subject"):
                columns[name].append(event[name])
            columns["data"].append(orjson.dumps(event["data"]).decode())
            if len(columns["id"]) >= chunk:
                flush()
        if columns["id"]:
            flush()
    return True
