"""Scoring: events/s through one worker with features and scoring on, beside bare Faust;
restart-to-ready and memory with 100,000 accounts of state.

Pre-filled topics on the embedded broker (Tansu), then one worker process consumes them:

scoring_events_per_s: 600,000 usage events in 200-event partition envelopes (what ingest
produces under load) over 100,000 accounts and 3 days, every account twice a day, in time
order (a replay of recent history), through the worker: features, revenue, signals,
micro-batch ONNX scoring of touched accounts within its budget, dirty buckets to the
changelog at each commit. Timed from its first processed event to its last.
scoring_scores_per_s: accounts scored per second from the first event until every touched
account has its score; scoring_drain_s: how long after the last event that took.
faust_bare_records_per_s (same run): a Faust agent that does nothing, one event per record.
scoring_ready_s_100k_accounts: SIGTERM the worker, start a new one: start to ready (every
account restored from the changelog). scoring_rss_mib_100k_accounts: the worker's RSS then.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson
import psutil
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from bench.harness import report
from churnguard.common import envelope
from churnguard.common.kafka import ensure_topics
from churnguard.common.topics import Topic, planned_topics
from churnguard.devstack.process import ManagedProcess, free_port, wait_until
from churnguard.devstack.stack import http_ready
from churnguard.devstack.tansu import TansuBroker

REPO = Path(__file__).resolve().parents[1]
ACCOUNTS = 100_000
EVENTS = 600_000
DAYS = 3
BARE_RECORDS = 60_000
PARTITIONS = 4
ENVELOPE = 200
REPEATS = 2
FEATURES = ("reports", "dashboards", "integrations", "automations", "api", "exports")


def _usage_envelopes(run: int) -> list[tuple[int, bytes]]:
    """EVENTS feature-used events over ACCOUNTS accounts and the last DAYS days, as
    envelopes: every account twice a day (two of its users), the day's events interleaved
    across accounts and in time order, as a replay of recent history reads."""
    start = datetime.now(UTC) - timedelta(days=DAYS)
    per_day = EVENTS // DAYS
    pending: dict[int, list[bytes]] = {p: [] for p in range(PARTITIONS)}
    out: list[tuple[int, bytes]] = []
    partition_of: dict[str, int] = {}
    for i in range(EVENTS):
        day, j = divmod(i, per_day)
        account = f"acct_{(j * 7919) % ACCOUNTS:06d}"
        if (p := partition_of.get(account)) is None:
            p = partition_of[account] = envelope.partition_for(account, PARTITIONS)
        when = start + timedelta(days=day, seconds=j * 86_400 // per_day)
        pending[p].append(
            orjson.dumps(
                {
                    "specversion": "1.0",
                    "id": f"r{run}-{i}",
                    "source": "/bench",
                    "type": "churnguard.usage.feature_used",
                    "time": when.isoformat(),
                    "subject": account,
                    "data": {
                        "user_id": f"u{j // ACCOUNTS}",
                        "feature": FEATURES[i % len(FEATURES)],
                        "count": 1 + i % 3,
                    },
                }
            )
        )
        if len(pending[p]) == ENVELOPE:
            out.append((p, envelope.encode_raw(pending[p])))
            pending[p] = []
    out += [(p, envelope.encode_raw(v)) for p, v in pending.items() if v]
    return out


async def _fill(bootstrap: str, topic: str, records: list[tuple[int, bytes]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, compression_type="zstd"
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, v, partition=p) for p, v in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def _await_count(read: Callable[[], float], target: int, timeout: float) -> tuple[float, float]:
    """Poll ``read()`` until it reaches ``target``; (time of first progress, time done)."""
    first = None
    deadline = time.monotonic() + timeout
    while True:
        n = read()
        now = time.monotonic()
        if n > 0 and first is None:
            first = now
        if n >= target:
            return first or now, now
        if now > deadline:
            raise RuntimeError(f"only {n} of {target} after {timeout} s")
        time.sleep(0.05)


def _scoring_process(home: Path, bootstrap: str, prefix: str, port: int, n: int) -> ManagedProcess:
    env = dict(os.environ) | {
        "CHURNGUARD_ENV": "dev",
        "CHURNGUARD_KAFKA_BOOTSTRAP": bootstrap,
        "CHURNGUARD_KAFKA_IDEMPOTENT_PRODUCER": "false",
        "CHURNGUARD_TOPIC_PREFIX": prefix,
        "CHURNGUARD_SCORING_WEB_PORT": str(port),
        "CHURNGUARD_SCORING_DATA_DIR": str(home / f"scoring-{n}"),
        "CHURNGUARD_SCORING_SESSION_TIMEOUT_S": "6",
        "CHURNGUARD_SCORING_REBALANCE_TIMEOUT_S": "3",
        "CHURNGUARD_LOG_LEVEL": "WARNING",
    }
    return ManagedProcess(
        f"scoring-{n}",
        [sys.executable, "-m", "churnguard.scoring", "worker", "--loglevel", "warn"],
        home / f"scoring-{n}.log",
        env=env,
    )


def _bare_rate(home: Path, bootstrap: str, run: int) -> float:
    topic = f"bare{run}"
    values = [
        (i % PARTITIONS, orjson.dumps({"id": f"b{i}", "subject": f"acct_{i % ACCOUNTS}"}))
        for i in range(BARE_RECORDS)
    ]
    asyncio.run(_fill(bootstrap, topic, values))
    port = free_port()
    bare = ManagedProcess(
        f"bare-{run}",
        [sys.executable, "-m", "bench.faust_bare", "worker", "--loglevel", "warn"],
        home / f"bare-{run}.log",
        env=dict(os.environ)
        | {"BARE_TOPIC": topic, "BARE_BROKER": bootstrap, "BARE_PORT": str(port)},
        cwd=REPO,
    )
    bare.start()
    try:
        url = f"http://127.0.0.1:{port}/count"
        wait_until(lambda: http_ready(url), timeout=90, what="bare faust", alive=bare.alive)
        first, done = _await_count(
            lambda: httpx.get(url, timeout=10).json()["records"], BARE_RECORDS, 600
        )
        return BARE_RECORDS / max(done - first, 1e-6)
    finally:
        bare.stop()


async def _committed_async(bootstrap: str, group: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
        return sum(o.offset for o in offsets.values() if o.offset > 0)
    finally:
        await admin.close()


def _committed(bootstrap: str, prefix: str) -> int:
    """Offsets the scoring group committed, summed over the source partitions."""
    return asyncio.run(_committed_async(bootstrap, prefix + "churnguard-scoring"))


def _one_run(home: Path, bootstrap: str, run_no: int) -> dict[str, float]:
    """One worker over the pre-filled topic, then a restart."""
    prefix = f"b{run_no}."
    asyncio.run(ensure_topics(bootstrap, planned_topics(prefix)))
    records = _usage_envelopes(run_no)
    asyncio.run(_fill(bootstrap, Topic.USAGE.name_in(prefix), records))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    worker = _scoring_process(home, bootstrap, prefix, port, 2 * run_no)
    worker.start()
    try:
        wait_until(
            lambda: http_ready(url + "/healthz"), timeout=90, what="scoring", alive=worker.alive
        )
        first, done = _await_count(
            lambda: _metric(url, "churnguard_consumer_events_total"), EVENTS, 900
        )
        rate = EVENTS / max(done - first, 1e-6)
        # every account scored once: how long the scores take to catch up after the stream
        _await_count(
            lambda: _metric(url, 'churnguard_scoring_outputs_total{kind="scores"'), ACCOUNTS, 600
        )
        _await_count(
            lambda: float(_metric(url, "churnguard_scoring_pending_accounts") == 0), 1, 600
        )
        drained = time.monotonic()
        scores_per_s = _metric(url, "churnguard_scoring_accounts_scored_total") / (drained - first)
        # the state of every record written and committed before the restart
        wait_until(
            lambda: _committed(bootstrap, prefix) >= len(records),
            timeout=120,
            what="offsets committed",
        )
    finally:
        worker.stop()  # SIGTERM
    again = _scoring_process(home, bootstrap, prefix, port, 2 * run_no + 1)
    started = time.monotonic()
    again.start()
    try:
        wait_until(
            lambda: http_ready(url + "/readyz"),
            timeout=600,
            what="scoring restart",
            alive=again.alive,
        )
        ready_s = time.monotonic() - started
        accounts = httpx.get(url + "/readyz", timeout=10).json()["accounts"]
        if accounts != ACCOUNTS:
            raise RuntimeError(f"restored {accounts} accounts, not {ACCOUNTS}")
        assert again.pid is not None
        rss_mib = psutil.Process(again.pid).memory_info().rss / 2**20
    finally:
        again.stop()
    return {
        "rate": rate,
        "scores_per_s": scores_per_s,
        "drain_s": drained - done,
        "ready_s": ready_s,
        "rss_mib": rss_mib,
    }


def run() -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="cg-scoring-bench-", dir=REPO / ".dev"))
    broker = TansuBroker(home / "kafka", free_port())
    runs: list[dict[str, float]] = []
    bare: list[float] = []
    try:
        broker.start()
        for run_no in range(REPEATS):
            runs.append(_one_run(home, broker.bootstrap, run_no))
            bare.append(_bare_rate(home, broker.bootstrap, run_no))
    finally:
        broker.stop()
        shutil.rmtree(home, ignore_errors=True)

    def column(key: str) -> list[float]:
        return [r[key] for r in runs]

    def fmt(values: list[float], spec: str = ",.0f") -> str:
        return ", ".join(format(v, spec) for v in values)

    rate, bare_rate = statistics.median(column("rate")), statistics.median(bare)
    scores, drain = statistics.median(column("scores_per_s")), statistics.median(column("drain_s"))
    ready_s, rss_mib = statistics.median(column("ready_s")), statistics.median(column("rss_mib"))
    report(
        f"scoring (one worker, Tansu, {PARTITIONS} partitions, {ACCOUNTS:,} accounts)",
        [
            ("scoring_events_per_s (features + scoring on)", rate, fmt(column("rate"))),
            ("scoring_scores_per_s (accounts scored)", scores, fmt(column("scores_per_s"))),
            ("scoring_drain_s (last event to every score)", drain, fmt(column("drain_s"), ".1f")),
            ("faust_bare_records_per_s (same run)", bare_rate, fmt(bare)),
            ("scoring_ready_s_100k_accounts (restart)", ready_s, fmt(column("ready_s"), ".1f")),
            ("scoring_rss_mib_100k_accounts", rss_mib, fmt(column("rss_mib"), ".0f")),
        ],
        [
            ("scoring events/s ÷ bare Faust records/s", rate / bare_rate),
            ("target 50,000 ÷ measured", 50_000 / rate),
        ],
    )
    return {
        "scoring_events_per_s": rate,
        "scoring_scores_per_s": scores,
        "scoring_drain_s": drain,
        "faust_bare_records_per_s": bare_rate,
        "scoring_ready_s_100k_accounts": ready_s,
        "recovery_s_100k_accounts": ready_s,
        "scoring_rss_mib_100k_accounts": rss_mib,
    }


if __name__ == "__main__":
    from bench.harness import merge

    merge(run())
