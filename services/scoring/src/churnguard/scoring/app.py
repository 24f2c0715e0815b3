"""The scoring Faust application.

Processing guarantee: at-least-once. Faust commits a record's offset after the agent
has finished with it; table writes go to the changelog through the same producer
before the commit, so after a crash the table is rebuilt from its changelog and the
records after the last commit are processed again.

For now the agent keeps one feature, the count of usage events per account, to prove
the path envelope → table → query end to end; the rolling features and the model
replace it in the scoring issue.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import Counter
from typing import Any

import faust
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from churnguard.common import envelope, metrics
from churnguard.common.kafka import DeadLetterBreaker, DeadLetterBreakerTripped, DeadLetters
from churnguard.common.topics import Topic
from churnguard.scoring.settings import ScoringSettings

log = logging.getLogger(__name__)

CONSUMER_NAME = "scoring"


def create_app(settings: ScoringSettings | None = None) -> faust.App:
    settings = settings or ScoringSettings()
    platform = settings.platform
    prefix = platform.topic_prefix
    settings.data_dir.mkdir(parents=True, exist_ok=True)

    app = faust.App(
        prefix + settings.app_id,
        broker=[f"kafka://{host}" for host in platform.kafka_bootstrap.split(",")],
        store="memory://",
        datadir=str(settings.data_dir),
        processing_guarantee="at_least_once",
        broker_commit_interval=settings.commit_interval_s,
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_session_timeout=settings.session_timeout_s,
        producer_acks=-1,
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_in_thread=False,
        consumer_auto_offset_reset="earliest",
    )

    usage_topic = app.topic(
        Topic.USAGE.name_in(prefix),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    usage_counts = app.Table("usage-event-counts", default=int, partitions=settings.partitions)
    dead_letter_topics: dict[str, faust.TopicT] = {}

    async def send_dead_letter(
        topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> Any:
        if topic not in dead_letter_topics:
            dead_letter_topics[topic] = app.topic(
                topic, key_serializer="raw", value_serializer="raw"
            )
        sent = await dead_letter_topics[topic].send(key=key, value=value, headers=headers)
        return await sent  # Faust buffers sends; wait for Kafka's acknowledgement

    dead_letters = DeadLetters(
        CONSUMER_NAME,
        send_dead_letter,
        DeadLetterBreaker(platform.dead_letter_max_ratio, platform.dead_letter_window),
    )

    @app.task
    async def announce() -> None:
        log.info(
            "scoring started: processing_guarantee=at_least_once commit_interval_s=%s "
            "kafka=%s topics=%s",
            settings.commit_interval_s,
            platform.kafka_bootstrap,
            [usage_topic.get_topic_name()],
        )

    @app.agent(usage_topic)
    async def count_usage(stream: faust.StreamT[bytes]) -> Any:
        async for event in stream.events():
            message = event.message
            try:
                events = Topic.USAGE.codec.decode(event.value)
            except envelope.InvalidEnvelope as exc:
                await dead_letters.reject(
                    message,
                    dead_letter_topic=Topic.USAGE.dead_letter_in(prefix),
                    reason=exc.reason,
                    error=type(exc).__name__,
                )
                try:
                    dead_letters.raise_if_tripped()
                except DeadLetterBreakerTripped:
                    # A crashed agent is only restarted by Faust, and a crashed app leaves
                    # the worker process up, so stop the worker the way an operator would:
                    # SIGTERM takes Faust's graceful path (flush the producer, commit).
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                continue
            dead_letters.accept()
            # one table write per account per envelope, not per event (DESIGN.md, Throughput)
            for account_id, n in Counter(e.subject for e in events).items():
                usage_counts[account_id] += n
            metrics.CONSUMER_RECORDS.labels(CONSUMER_NAME, message.topic).inc()
            metrics.CONSUMER_EVENTS.labels(CONSUMER_NAME, message.topic).inc(len(events))
            yield len(events)

    @app.page("/accounts/{account_id}/usage-count")
    async def usage_count(web: Any, request: Any, account_id: str) -> Any:
        return web.json({"account_id": account_id, "usage_events": usage_counts.get(account_id, 0)})

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        ready = not app.rebalancing and bool(app.consumer.assignment())
        return web.json({"status": "ready" if ready else "starting"}, status=200 if ready else 503)

    @app.page("/metrics")
    async def prometheus_metrics(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST)

    app.conf.table_cleanup_interval = 30.0
    return app
