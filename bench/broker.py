"""Raw Kafka client rates on the embedded broker: the ceiling every service is compared with.

raw_produce_msgs_per_s: aiokafka, acks=all, linger 5 ms, one ~300-byte record per message.
envelope_produce_events_per_s: the same producer sending 100-event partition envelopes.
raw_consume_msgs_per_s: one consumer reading the produced records back.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.harness import median_rate, merge, report
from churnguard.common import envelope
from churnguard.common.events.usage import FeatureUsed, FeatureUsedData
from churnguard.devstack.process import free_port
from churnguard.devstack.tansu import TansuBroker

MESSAGES = 20_000
ENVELOPE = 100
REPEATS = 3


def _events(n: int) -> list[FeatureUsed]:
    now = datetime(2026, 11, 1, tzinfo=UTC)
    return [
        FeatureUsed(
            id=f"evt-{i:08d}",
            source="/bench",
            time=now,
            subject=f"acct_{i % 5000:05d}",
            data=FeatureUsedData(user_id=f"u{i % 50}", feature="reports"),
        )
        for i in range(n)
    ]


async def _produce(bootstrap: str, topic: str, values: list[bytes]) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        start = time.perf_counter()
        futures = [await producer.send(topic, v, partition=i % 4) for i, v in enumerate(values)]
        await asyncio.gather(*futures)
        return time.perf_counter() - start
    finally:
        await producer.stop()


async def _consume(bootstrap: str, topic: str, count: int) -> float:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        seen = 0
        start = time.perf_counter()
        while seen < count:
            for batch in (await consumer.getmany(timeout_ms=500, max_records=5000)).values():
                seen += len(batch)
        return time.perf_counter() - start
    finally:
        await consumer.stop()


def run() -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="cg-bench-"))
    broker = TansuBroker(home, free_port())
    broker.start()
    events = _events(MESSAGES)
    singles = [e.to_json() for e in events]
    envelopes = [envelope.encode(events[i : i + ENVELOPE]) for i in range(0, MESSAGES, ENVELOPE)]
    counter = iter(range(1000))
    try:

        def produce_raw() -> float:
            return MESSAGES / asyncio.run(
                _produce(broker.bootstrap, f"raw{next(counter)}", singles)
            )

        def produce_env() -> float:
            t = f"env{next(counter)}"
            return MESSAGES / asyncio.run(_produce(broker.bootstrap, t, envelopes))

        def consume_raw() -> float:
            t = f"cons{next(counter)}"
            asyncio.run(_produce(broker.bootstrap, t, singles))
            return MESSAGES / asyncio.run(_consume(broker.bootstrap, t, MESSAGES))

        raw, raw_runs = median_rate(produce_raw, REPEATS)
        env, env_runs = median_rate(produce_env, REPEATS)
        cons, cons_runs = median_rate(consume_raw, REPEATS)
    finally:
        broker.stop()
        shutil.rmtree(home, ignore_errors=True)

    def fmt(runs: list[float]) -> str:
        return ", ".join(f"{r:,.0f}" for r in runs)

    figures = {
        "raw_produce_msgs_per_s": raw,
        "envelope_produce_events_per_s": env,
        "raw_consume_msgs_per_s": cons,
    }
    report(
        "broker (Tansu, aiokafka, acks=all)",
        [
            ("raw_produce_msgs_per_s", raw, fmt(raw_runs)),
            ("envelope_produce_events_per_s", env, fmt(env_runs)),
            ("raw_consume_msgs_per_s", cons, fmt(cons_runs)),
        ],
        [("envelope events/s ÷ raw msgs/s", env / raw)],
    )
    return figures


if __name__ == "__main__":
    merge(run())
