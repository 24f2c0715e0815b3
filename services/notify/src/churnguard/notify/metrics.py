"""Prometheus metrics of notify (the consumer-wide ones are in churnguard.common.metrics).

Labels are bounded: channel (slack, email, in_app, csm_task, webhook, payment_retry),
status (an outcome status or ``retry``), reason class. Never a recipient or command id.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from churnguard.common.metrics import LATENCY_BUCKETS

SENDS = Counter(
    "churnguard_notify_sends_total",
    "Finished delivery attempts by channel and resulting status (delivered, failed, "
    "suppressed, payment_succeeded, payment_failed, retry)",
    ["channel", "status"],
)
SEND_SECONDS = Histogram(
    "churnguard_notify_send_seconds",
    "Provider call latency per attempt",
    ["channel"],
    buckets=LATENCY_BUCKETS,
)
DELIVERY_SECONDS = Histogram(
    "churnguard_notify_delivery_seconds",
    "From the command's time to its final outcome (first attempts and retries alike)",
    ["channel"],
    buckets=(*LATENCY_BUCKETS, 30.0, 60.0, 300.0, 1800.0, 3600.0),
)
RETRIES = Counter(
    "churnguard_notify_retries_total",
    "Transient failures scheduled for another attempt",
    ["channel"],
)
DEFERRALS = Counter(
    "churnguard_notify_deferrals_total",
    "Deliveries held back without an attempt (a rate-limited Slack target)",
    ["channel"],
)
DEAD_LETTERS = Counter(
    "churnguard_notify_dead_letters_total",
    "Commands sent to their topic's dead-letter twin (retries exhausted, or unusable)",
    ["channel", "reason"],
)
DUPLICATES = Counter(
    "churnguard_notify_duplicate_commands_total",
    "Commands already claimed (redelivered or replayed): no-ops",
    ["topic"],
)
IN_DOUBT = Counter(
    "churnguard_notify_in_doubt_total",
    "Attempts interrupted during the provider call, by how they were resolved",
    ["channel", "resolution"],
)
QUEUED = Gauge(
    "churnguard_notify_queued",
    "Deliveries waiting in this process's lane queues",
    ["channel"],
)
OUTBOX_PENDING = Gauge(
    "churnguard_notify_outbox_pending",
    "Outcomes and dead letters written but not yet acknowledged by Kafka",
)
INBOX_STREAMS = Gauge(
    "churnguard_notify_inbox_streams", "Open server-sent-event streams of the inbox API"
)
