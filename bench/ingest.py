"""Ingest: events/s into Kafka (acks=all) through the batch endpoints, and single-event latency.

One ingest worker process, the embedded broker and PostgreSQL, a load generator in its own
process (bench/loadgen.py). Every run ends by counting the events on the topic, so a
figure only counts events Kafka holds.

ingest_events_per_s: Segment /v1/batch, 500 "Feature Used" tracks per request, 8 connections.
ingest_native_batch_events_per_s: /v1/events/usage/batch, 500 CloudEvents per request.
ingest_cpu_us_per_event: CPU time (user + system) the ingest process spent per event during
the Segment runs; unlike events/s it does not depend on what else runs on the machine.
ingest_single_p50_ms / ingest_single_p99_ms: /v1/events/usage, one event per request, 200
requests/s for 10 s, open loop.
ingest_raw_produce_msgs_per_s: aiokafka alone on the same broker in the same run, one ~300-byte
record per event, acks=all (bench/broker.py's raw_produce_msgs_per_s, kept apart so that this
benchmark writes only ingest figures).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.broker import MESSAGES, _events, _produce
from bench.harness import merge, report
from churnguard.common import envelope
from churnguard.common.db import create_engine, run_migrations_async, session_factory
from churnguard.common.kafka import ensure_topics
from churnguard.common.setup import installed_migrations
from churnguard.common.topics import Topic, planned_topics
from churnguard.devstack.postgres import EmbeddedPostgres
from churnguard.devstack.process import ManagedProcess, free_port, wait_until
from churnguard.devstack.stack import http_ready
from churnguard.devstack.tansu import TansuBroker
from churnguard.ingest.sources import SourceRepository

REPEATS = 3
REPO = Path(__file__).resolve().parents[1]


async def _prepare(pg_url: str) -> str:
    (location,) = [loc for schema, loc in installed_migrations() if schema == "ingest"]
    await run_migrations_async(pg_url, "ingest", location)
    engine = create_engine(pg_url, schema="ingest")
    try:
        async with session_factory(engine)() as session, session.begin():
            _, key = await SourceRepository(session).create("bench")
    finally:
        await engine.dispose()
    return key


async def _count_events(bootstrap: str, topic: str) -> int:
    """Events in every envelope of ``topic``, read from the beginning to the end offsets."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        await consumer.topics()  # metadata
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        total = 0

        async def behind() -> bool:
            for tp in partitions:
                if await consumer.position(tp) < end[tp]:
                    return True
            return False

        while await behind():
            for batch in (await consumer.getmany(timeout_ms=500, max_records=5000)).values():
                total += sum(len(envelope.unpack(r.value)) for r in batch)
        return total
    finally:
        await consumer.stop()


def _loadgen(url: str, key: str, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", "--url", url, "--key", key, *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def run() -> dict[str, float]:
    load_at_start = os.getloadavg()[0]  # other work on the machine skews events/s, not CPU/event
    (REPO / ".dev").mkdir(exist_ok=True)  # a fresh checkout has none yet
    home = Path(tempfile.mkdtemp(prefix="cg-ingest-bench-", dir=REPO / ".dev"))
    broker = TansuBroker(home / "kafka", free_port())
    pg = EmbeddedPostgres(home / "pg", free_port())
    ingest: ManagedProcess | None = None
    try:
        broker.start()
        pg.start()
        asyncio.run(ensure_topics(broker.bootstrap, planned_topics()))
        key = asyncio.run(_prepare(pg.url))
        port = free_port()
        env = dict(os.environ) | {
            "CHURNGUARD_ENV": "dev",
            "CHURNGUARD_KAFKA_BOOTSTRAP": broker.bootstrap,
            "CHURNGUARD_KAFKA_IDEMPOTENT_PRODUCER": "false",
            "CHURNGUARD_DATABASE_URL": pg.url,
            "CHURNGUARD_INGEST_PORT": str(port),
            "CHURNGUARD_LOG_LEVEL": "WARNING",
        }
        ingest = ManagedProcess(
            "ingest", [sys.executable, "-m", "churnguard.ingest"], home / "ingest.log", env=env
        )
        ingest.start()
        url = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: http_ready(url + "/readyz"), timeout=60, what="ingest", alive=ingest.alive
        )
        topic = Topic.USAGE.name_in("")

        expected = 0
        rates: dict[str, list[float]] = {"segment": [], "native": []}
        cpu_us: dict[str, list[float]] = {"segment": [], "native": []}
        server = psutil.Process(ingest.pid)
        for run_no in range(REPEATS):
            for mode in ("segment", "native"):
                before = sum(server.cpu_times()[:2])
                result = _loadgen(
                    url, key, "--mode", mode, "--run", str(run_no * 2 + (mode == "native"))
                )
                used = sum(server.cpu_times()[:2]) - before
                if result["failures"]:
                    raise RuntimeError(f"{mode}: {result['failures']} requests failed")
                expected += result["events"]
                rates[mode].append(result["events"] / result["elapsed_s"])
                cpu_us[mode].append(used / result["events"] * 1e6)
        landed = asyncio.run(_count_events(broker.bootstrap, topic))
        if landed < expected:
            raise RuntimeError(f"only {landed} of {expected} acknowledged events are on {topic}")
        single = _loadgen(
            url, key, "--mode", "single", "--run", "99", "--rate", "200", "--seconds", "10"
        )
        singles = [e.to_json() for e in _events(MESSAGES)]
        raw_rates = [
            MESSAGES / asyncio.run(_produce(broker.bootstrap, f"raw{i}", singles))
            for i in range(REPEATS)
        ]
    finally:
        if ingest is not None:
            ingest.stop()
        pg.stop()
        broker.stop()
        shutil.rmtree(home, ignore_errors=True)

    def fmt(values: list[float]) -> str:
        return ", ".join(f"{v:,.0f}" for v in values)

    def fmt_us(values: list[float]) -> str:
        return ", ".join(f"{v:.1f}" for v in values)

    seg, nat, raw = (statistics.median(v) for v in (rates["segment"], rates["native"], raw_rates))
    seg_cpu, nat_cpu = (statistics.median(cpu_us[m]) for m in ("segment", "native"))
    report(
        "ingest (one worker, Tansu, acks=all; events counted on the topic afterwards)",
        [
            ("ingest_events_per_s (Segment /v1/batch)", seg, fmt(rates["segment"])),
            ("ingest_native_batch_events_per_s", nat, fmt(rates["native"])),
            ("ingest_raw_produce_msgs_per_s (same run)", raw, fmt(raw_rates)),
            (
                "ingest_single_p50_ms (200 req/s)",
                single["p50_ms"],
                f"{single['requests']} requests",
            ),
            ("ingest_single_p99_ms (200 req/s)", single["p99_ms"], f"{single['failures']} failed"),
            ("ingest_cpu_us_per_event (Segment batch)", seg_cpu, fmt_us(cpu_us["segment"])),
            ("ingest_native_cpu_us_per_event", nat_cpu, fmt_us(cpu_us["native"])),
            ("one core's events/s, 1e6 ÷ CPU us per event (Segment)", 1e6 / seg_cpu, ""),
            (
                "machine load average, 1 min (at the end)",
                os.getloadavg()[0],
                f"{load_at_start:.2f} at the start",
            ),
        ],
        [
            ("Segment batch events/s ÷ raw produce msgs/s", seg / raw),
            ("target 50,000 ÷ measured", 50_000 / seg),
        ],
    )
    return {
        "ingest_events_per_s": seg,
        "ingest_native_batch_events_per_s": nat,
        "ingest_raw_produce_msgs_per_s": raw,
        "ingest_single_p50_ms": single["p50_ms"],
        "ingest_single_p99_ms": single["p99_ms"],
        "ingest_cpu_us_per_event": seg_cpu,
        "ingest_native_cpu_us_per_event": nat_cpu,
    }


if __name__ == "__main__":
    merge(run())
