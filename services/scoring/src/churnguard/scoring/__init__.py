"""Scoring: the Faust stream processor that keeps per-account features and churn risk."""
