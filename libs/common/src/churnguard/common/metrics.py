"""Every Prometheus metric churnguard exports, declared once.

Names follow Prometheus conventions (``churnguard_<area>_<what>_<unit>``); labels are
bounded sets (topic, event type, reason class), never account or event ids. Services
import the objects from here so the dashboards and alert rules in ``deploy/`` and the
code cannot drift apart.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# ingest
INGEST_EVENTS = Counter(
    "churnguard_ingest_events_total",
    "Events accepted by ingest and acknowledged by Kafka",
    ["topic", "type"],
)
INGEST_REJECTED = Counter(
    "churnguard_ingest_rejected_total",
    "Requests or events rejected by ingest (4xx), by reason",
    ["endpoint", "reason"],
)
INGEST_WEBHOOKS_UNHANDLED = Counter(
    "churnguard_ingest_webhooks_unhandled_total",
    "Verified webhooks of a type churnguard does not book (acknowledged, not published)",
    ["provider", "type"],
)
INGEST_DEDUPE_HITS = Counter(
    "churnguard_ingest_dedupe_hits_total",
    "Events whose id was already published within the dedupe window",
    ["topic"],
)
INGEST_ENVELOPE_EVENTS = Histogram(
    "churnguard_ingest_envelope_events",
    "Events per envelope record produced by ingest",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
)
INGEST_PUBLISH_SECONDS = Histogram(
    "churnguard_ingest_publish_seconds",
    "Time from request received to Kafka acknowledgement",
    ["topic"],
    buckets=LATENCY_BUCKETS,
)

# Kafka consumers (plain aiokafka loops and Faust agents alike)
CONSUMER_RECORDS = Counter(
    "churnguard_consumer_records_total",
    "Records processed by a consumer",
    ["consumer", "topic"],
)
CONSUMER_EVENTS = Counter(
    "churnguard_consumer_events_total",
    "Events processed by a consumer (an envelope record holds one or more)",
    ["consumer", "topic"],
)
DEAD_LETTERS = Counter(
    "churnguard_dead_letters_total",
    "Records sent to a dead-letter topic",
    ["consumer", "topic"],
)
CONSUMER_BATCH_SECONDS = Histogram(
    "churnguard_consumer_batch_seconds",
    "Time to process one fetched batch, commit included",
    ["consumer"],
    buckets=LATENCY_BUCKETS,
)
CONSUMER_LAG = Gauge(
    "churnguard_consumer_lag_records",
    "Records a consumer is behind the partition's high watermark (after its last commit)",
    ["consumer", "topic", "partition"],
)
CONSUMER_STOPPED = Gauge(
    "churnguard_consumer_stopped",
    "1 when a consumer stopped itself (dead-letter breaker tripped)",
    ["consumer"],
)
