"""Embedded development stack.

A Kafka-protocol broker, PostgreSQL and the services as supervised local processes; also
the Apache Kafka launcher the tests and CI use.
"""
