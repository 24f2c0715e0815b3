"""Playbooks: decisions per second and signal-to-command latency, on the embedded broker
(Tansu) and PostgreSQL, through one service process with the shipped playbooks.

playbooks_decisions_per_s: 6,000 signals of every type over 2,000 accounts of every kind
(their traits, revenue and scores applied first), pre-filled on accounts.signals, then
taken by one service as fast as it goes: one PostgreSQL transaction per signal (the
account's row lock, the guard rails' reads, the decision and action rows, the touch,
timers, commands into the outbox), the commands sent and acknowledged, the offsets
committed. Timed by the decisions' own record times (first to last), median of runs.
playbooks_cpu_ms_per_decision: the service's CPU time over those decisions (robust to a
busy machine, unlike the rate).
playbooks_signal_to_command_p50_ms / _p99_ms: 400 signals at 40/s, each of which fires
(a tier crossing of an enterprise account): from the producer handing the signal to
Kafka to a consumer reading the command it caused, end to end through the broker twice.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from sqlalchemy import text

from bench.harness import report
from churnguard.common.db import create_engine
from churnguard.common.events.derived import (
    AccountScored,
    AccountScoredData,
    DetractorNps,
    DetractorNpsData,
    ExpansionSignal,
    ExpansionSignalData,
    MilestoneReached,
    MilestoneReachedData,
    PaymentFailedSignal,
    PaymentFailedSignalData,
    ReasonCode,
    RenewalAtRisk,
    RenewalAtRiskData,
    RevenueMovement,
    RevenueMovementData,
    RiskTierCrossed,
    RiskTierCrossedData,
    UsageDropped,
    UsageDroppedData,
)
from churnguard.common.events.usage import Group, GroupData, Identify, IdentifyData
from churnguard.common.kafka import ensure_topics
from churnguard.common.topics import Topic, planned_topics
from churnguard.devstack.postgres import EmbeddedPostgres
from churnguard.devstack.process import ManagedProcess, free_port, wait_until
from churnguard.devstack.stack import http_ready
from churnguard.devstack.tansu import TansuBroker
from churnguard.playbooks.commands import decision_id

REPO = Path(__file__).resolve().parents[1]
ACCOUNTS = 2_000
SIGNALS = 6_000
REPEATS = 3
LATENCY_SIGNALS = 400
LATENCY_RATE = 40.0
SOURCE = "/bench"
REASONS = [ReasonCode(code="usage_trend_down", description="Usage fell 46%", impact=0.2)]


def _profile(account: str, i: int, at: datetime, enterprise: bool) -> list[tuple[Topic, Any]]:
    segment = "enterprise" if enterprise else ("smb", "mid", "enterprise")[i % 3]
    traits: dict[str, Any] = {
        "name": account,
        "plan": "growth",
        "segment": segment,
        "csm": f"U0CSM{i % 40:02d}",
        "timezone": "Europe/Berlin",
    }
    if i % 2:
        traits["owner"] = f"U0AE{i % 20:02d}"
    mrr = (200_00, 1500_00, 6000_00)[i % 3] if not enterprise else 6000_00
    return [
        (
            Topic.USAGE,
            Group(
                id=f"g-{account}",
                source=SOURCE,
                time=at,
                subject=account,
                data=GroupData(user_id="u_admin", traits=traits),
            ),
        ),
        (
            Topic.USAGE,
            Identify(
                id=f"i-{account}",
                source=SOURCE,
                time=at,
                subject=account,
                data=IdentifyData(
                    user_id="u_admin", traits={"email": f"admin@{account}.test", "role": "admin"}
                ),
            ),
        ),
        (
            Topic.USAGE,
            Identify(
                id=f"m-{account}",
                source=SOURCE,
                time=at,
                subject=account,
                data=IdentifyData(
                    user_id="u_member", traits={"email": f"member@{account}.test", "role": "member"}
                ),
            ),
        ),
        (
            Topic.REVENUE_MOVEMENTS,
            RevenueMovement(
                id=f"r-{account}",
                source=SOURCE,
                time=at,
                subject=account,
                data=RevenueMovementData(
                    kind="new", mrr_before=0, mrr_after=mrr, delta=mrr, currency="usd"
                ),
            ),
        ),
        (
            Topic.SCORES,
            AccountScored(
                id=f"s-{account}",
                source=SOURCE,
                time=at,
                subject=account,
                data=AccountScoredData(
                    churn_probability=0.1,
                    health=70,
                    tier="watch",
                    reasons=REASONS,
                    model_version="bench",
                    features={
                        "tenure_days": float((30, 200, 500)[i % 3]),
                        "days_to_renewal": float(40 + i % 300),
                        "mrr": mrr / 100,
                    },
                    unadopted_sticky_features=["api", "automations"][: i % 3],
                ),
            ),
        ),
    ]


def _signal(account: str, i: int, n: int, at: datetime) -> Any:
    kind = (i + n) % 7
    sid = f"sig-{account}-{n}"
    common = {"id": sid, "source": SOURCE, "time": at, "subject": account}
    if kind == 0:
        return RiskTierCrossed(
            **common,
            data=RiskTierCrossedData(
                from_tier="watch",
                to_tier="critical",
                churn_probability=0.6,
                health=20,
                previous_health=60,
                reasons=REASONS,
            ),
        )
    if kind == 1:
        return UsageDropped(
            **common,
            data=UsageDroppedData(
                window_days=7,
                previous=300,
                current=60,
                drop_ratio=0.8,
                unadopted_sticky_features=["api", "integrations"],
            ),
        )
    if kind == 2:
        return MilestoneReached(
            **common,
            data=MilestoneReachedData(milestone="feature_uses.reports", value=1000 * (n + 1)),
        )
    if kind == 3:
        return DetractorNps(**common, data=DetractorNpsData(score=3, user_id="u_member"))
    if kind == 4:
        return ExpansionSignal(**common, data=ExpansionSignalData(reason="seats_near_limit"))
    if kind == 5:
        return RenewalAtRisk(
            **common,
            data=RenewalAtRiskData(
                days_to_renewal=55,
                window_days=60,
                churn_probability=0.4,
                tier="at_risk",
                mrr=6000_00,
            ),
        )
    return PaymentFailedSignal(
        **common,
        data=PaymentFailedSignalData(
            invoice_id=f"in_{account}_{n}",
            amount_due=4900,
            currency="usd",
            decline_code="insufficient_funds",
            decline_kind="soft",
            attempt_count=1,
            failed_payments_60d=1,
        ),
    )


async def _produce(bootstrap: str, prefix: str, events: list[tuple[Topic, Any]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(t.name_in(prefix), e.to_json(), key=e.subject.encode())
            for t, e in events
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _scalar(url: str, schema: str, sql: str) -> Any:
    engine = create_engine(url, schema=schema, pool_size=1)
    try:
        async with engine.connect() as conn:
            return (await conn.execute(text(sql))).scalar()
    finally:
        await engine.dispose()


def _wait_count(url: str, schema: str, sql: str, target: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            n = asyncio.run(_scalar(url, schema, sql)) or 0
        except Exception:  # the schema may not exist yet
            n = 0
        if n >= target:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{sql}: {n} of {target} after {timeout:.0f} s")
        time.sleep(0.2)


async def _latency(bootstrap: str, prefix: str, signals: list[Any]) -> list[float]:
    """Paced signals; ms from handing each to the producer to reading its command."""
    # fetch_max_wait_ms: Tansu holds each fetch that long, which would be measured too
    consumer = AIOKafkaConsumer(
        Topic.NOTIFICATIONS.name_in(prefix),
        bootstrap_servers=bootstrap,
        auto_offset_reset="latest",
        enable_auto_commit=False,
        fetch_max_wait_ms=10,
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await consumer.start()
    await producer.start()
    sent: dict[str, float] = {}
    got: dict[str, float] = {}
    by_decision = {decision_id(s.id, "high-risk-enterprise"): s.id for s in signals}
    await consumer.getmany(timeout_ms=1000)  # assigned and positioned at the end

    async def read() -> None:
        while len(got) < len(signals) * 0.9 or time.monotonic() < done_by:
            for batch in (await consumer.getmany(timeout_ms=100)).values():
                now = time.perf_counter()
                for record in batch:
                    (command,) = Topic.NOTIFICATIONS.codec.decode(record.value)
                    sid = by_decision.get(command.data.decision_id)
                    if sid in sent and sid not in got:
                        got[sid] = now
            if time.monotonic() > hard_stop:
                return

    done_by = time.monotonic() + len(signals) / LATENCY_RATE + 5
    hard_stop = done_by + 30
    reader = asyncio.create_task(read())
    try:
        start = time.perf_counter()
        for k, signal in enumerate(signals):
            await asyncio.sleep(max(0.0, start + k / LATENCY_RATE - time.perf_counter()))
            sent[signal.id] = time.perf_counter()
            await producer.send(
                Topic.SIGNALS.name_in(prefix), signal.to_json(), key=signal.subject.encode()
            )
        await reader
    finally:
        await producer.stop()
        await consumer.stop()
    return [(got[s] - sent[s]) * 1000 for s in got]


def _service(
    home: Path, run_no: int, bootstrap: str, url: str, prefix: str, schema: str
) -> tuple[ManagedProcess, str]:
    port = free_port()
    env = dict(os.environ) | {
        "CHURNGUARD_ENV": "dev",
        "CHURNGUARD_KAFKA_BOOTSTRAP": bootstrap,
        "CHURNGUARD_KAFKA_IDEMPOTENT_PRODUCER": "false",
        "CHURNGUARD_DATABASE_URL": url,
        "CHURNGUARD_TOPIC_PREFIX": prefix,
        "CHURNGUARD_PLAYBOOKS_PORT": str(port),
        "CHURNGUARD_PLAYBOOKS_DB_SCHEMA": schema,
        "CHURNGUARD_PLAYBOOKS_GROUP_ID": f"bench-{run_no}",
        "CHURNGUARD_PLAYBOOKS_QUIET_HOURS": "",
        "CHURNGUARD_LOG_LEVEL": "WARNING",
    }
    proc = ManagedProcess(
        f"playbooks-{run_no}",
        [sys.executable, "-m", "churnguard.playbooks"],
        home / f"playbooks-{run_no}.log",
        env=env,
    )
    proc.start()
    service_url = f"http://127.0.0.1:{port}"
    wait_until(
        lambda: http_ready(service_url + "/readyz"), timeout=90, what="playbooks", alive=proc.alive
    )
    return proc, service_url


def run() -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="cg-playbooks-bench-", dir=REPO / ".dev"))
    broker = TansuBroker(home / "kafka", free_port())
    pg = EmbeddedPostgres(home / "pg", free_port())
    rates: list[float] = []
    cpu_ms: list[float] = []
    latencies: list[float] = []
    fired: list[int] = []
    try:
        broker.start()
        pg.start()
        for run_no in range(REPEATS):
            prefix, schema = f"r{run_no}.", f"bench_r{run_no}"
            asyncio.run(ensure_topics(broker.bootstrap, planned_topics(prefix)))
            proc, _ = _service(home, run_no, broker.bootstrap, pg.url, prefix, schema)
            try:
                at = datetime.now(UTC) - timedelta(hours=1)
                accounts = [f"acct_{run_no}_{i:05d}" for i in range(ACCOUNTS)]
                lat_accounts = [f"lat_{run_no}_{i:05d}" for i in range(LATENCY_SIGNALS)]
                profile = [e for i, a in enumerate(accounts) for e in _profile(a, i, at, False)]
                profile += [e for i, a in enumerate(lat_accounts) for e in _profile(a, i, at, True)]
                asyncio.run(_produce(broker.bootstrap, prefix, profile))
                _wait_count(
                    pg.url,
                    schema,
                    "SELECT count(*) FROM accounts WHERE scored_at IS NOT NULL",
                    ACCOUNTS + LATENCY_SIGNALS,
                    300,
                )
                signals = [
                    (
                        Topic.SIGNALS,
                        _signal(
                            accounts[k % ACCOUNTS],
                            k % ACCOUNTS,
                            k // ACCOUNTS,
                            at + timedelta(seconds=k),
                        ),
                    )
                    for k in range(SIGNALS)
                ]
                server = psutil.Process(proc.pid)
                before = sum(server.cpu_times()[:2])
                asyncio.run(_produce(broker.bootstrap, prefix, signals))
                _wait_count(pg.url, schema, "SELECT count(*) FROM decisions", SIGNALS, 600)
                used = sum(server.cpu_times()[:2]) - before
                span = asyncio.run(
                    _scalar(
                        pg.url,
                        schema,
                        "SELECT extract(epoch FROM max(created_at) - min(created_at)) "
                        "FROM decisions",
                    )
                )
                rates.append((SIGNALS - 1) / float(span))
                cpu_ms.append(used / SIGNALS * 1000)
                fired.append(
                    int(
                        asyncio.run(
                            _scalar(
                                pg.url,
                                schema,
                                "SELECT count(*) FROM decisions WHERE outcome = 'fired'",
                            )
                        )
                    )
                )
                paced = [
                    _signal(a, 0, 0, datetime.now(UTC)).model_copy(update={"id": f"lat-{a}"})
                    for a in lat_accounts
                ]
                latencies += asyncio.run(_latency(broker.bootstrap, prefix, paced))
            finally:
                proc.stop()
    finally:
        pg.stop()
        broker.stop()
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    rate = statistics.median(rates)
    figures = {
        "playbooks_decisions_per_s": rate,
        "playbooks_cpu_ms_per_decision": statistics.median(cpu_ms),
        "playbooks_signal_to_command_p50_ms": p50,
        "playbooks_signal_to_command_p99_ms": p99,
    }
    report(
        "playbooks (Tansu + PostgreSQL, one service process, shipped playbooks)",
        [
            ("decisions/s", rate, ", ".join(f"{r:,.0f}" for r in rates)),
            (
                "CPU ms per decision",
                statistics.median(cpu_ms),
                ", ".join(f"{c:.2f}" for c in cpu_ms),
            ),
            ("fired of 6,000 decisions", statistics.median(fired), ", ".join(map(str, fired))),
            ("signal→command p50 ms", p50, f"{len(latencies)} commands at {LATENCY_RATE:.0f}/s"),
            ("signal→command p99 ms", p99, ""),
        ],
        [("p99 / p50 latency", p99 / p50)],
    )
    return figures


if __name__ == "__main__":
    from bench.harness import merge

    merge(run())
