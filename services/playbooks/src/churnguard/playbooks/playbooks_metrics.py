"""Prometheus metrics of the playbooks service (consumer-wide ones are in common.metrics:
records, dead letters, batch time and lag per consumer)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from churnguard.common.metrics import LATENCY_BUCKETS

DECISIONS = Counter(
    "churnguard_playbooks_decisions_total",
    "Decisions by playbook and outcome (fired, suppressed, not_matched, failed) and the "
    "reason class (cooldown, budget, holdout, dedupe, dunning, conditions, no recipient)",
    ["playbook", "outcome", "reason"],
)
REDELIVERED = Counter(
    "churnguard_playbooks_redelivered_total",
    "Decisions not taken again because their key existed (redelivered signals, outcomes)",
)
COMMANDS = Counter(
    "churnguard_playbooks_commands_published_total",
    "Commands Kafka acknowledged, by topic and how they were sent (direct, or swept from "
    "the outbox after a crash or an outage)",
    ["topic", "path"],
)
SIGNAL_TO_COMMAND = Histogram(
    "churnguard_playbooks_signal_to_command_seconds",
    "From the signal's Kafka timestamp to Kafka acknowledging the command it caused",
    buckets=LATENCY_BUCKETS,
)
TIMERS_FIRED = Counter(
    "churnguard_playbooks_timers_fired_total",
    "Timers fired, by kind (message, dunning_retry, dunning_final, schedule)",
    ["kind"],
)
TIMER_LAG = Histogram(
    "churnguard_playbooks_timer_lag_seconds",
    "How late a timer fired after its due time",
    ["kind"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0),
)
TIMERS_PENDING = Gauge(
    "churnguard_playbooks_timers_pending", "Timers waiting to fire, by kind", ["kind"]
)
TIMERS_OVERDUE_SECONDS = Gauge(
    "churnguard_playbooks_timers_overdue_seconds",
    "How far past its due time the oldest pending timer is (0 when none is due)",
)
OUTBOX_UNSENT = Gauge(
    "churnguard_playbooks_outbox_unsent", "Commands recorded but not yet acknowledged by Kafka"
)
PLAYBOOKS_LOADED = Gauge("churnguard_playbooks_loaded", "Playbooks in force")
RELOADS = Counter(
    "churnguard_playbooks_reloads_total",
    "Loads of the playbook folder after a change: ok (swapped in) or error (kept the last "
    "good set)",
    ["result"],
)
RELOAD_ERRORS = Counter(
    "churnguard_playbooks_reload_errors_total",
    "Errors found in changed playbook files (each file, line and field counts once)",
)
