"""Ingest: the front door. HTTP APIs that validate events and publish them to Kafka."""
