"""Embedded development stack: Kafka-protocol broker, PostgreSQL and the services as supervised local processes."""
