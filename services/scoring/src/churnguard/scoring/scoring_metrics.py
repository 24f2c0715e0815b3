"""Prometheus metrics of the scoring worker (the consumer-wide ones are in common.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

ENVELOPE_EVENTS = Histogram(
    "churnguard_scoring_envelope_events",
    "Events per consumed envelope",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
)
SCORE_BATCH_SECONDS = Histogram(
    "churnguard_scoring_batch_seconds",
    "Time to compute features and score one micro-batch of accounts",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
CHURN_PROBABILITY = Histogram(
    "churnguard_scoring_churn_probability",
    "Churn probability of emitted scores (the score distribution)",
    buckets=(0.02, 0.05, 0.08, 0.12, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0),
)
OUTPUTS = Counter(
    "churnguard_scoring_outputs_total",
    "Events scoring produced, by kind (scores, signals, revenue) and type",
    ["kind", "type"],
)
ACCOUNTS = Gauge("churnguard_scoring_accounts", "Accounts held by this worker")
SCORED = Counter(
    "churnguard_scoring_accounts_scored_total",
    "Accounts scored (a score event goes out only when the score says something new)",
)
PENDING = Gauge(
    "churnguard_scoring_pending_accounts",
    "Accounts touched since their last score, waiting for the scoring budget",
)
STATE_WRITES = Counter(
    "churnguard_scoring_state_writes_total", "State buckets written to the changelog"
)
STATE_BYTES = Histogram(
    "churnguard_scoring_state_bucket_bytes",
    "Size of a state bucket written to the changelog (compressed)",
    buckets=(256, 1024, 4096, 16384, 65536, 262144, 1048576),
)
READY_SECONDS = Gauge(
    "churnguard_scoring_ready_seconds", "Start to ready (state restored), in seconds"
)
MODEL_VERSION = Info("churnguard_scoring_model", "The churn model in use")
