"""Notify's tables (migration 0001), declared once for the queries in :mod:`repository`.

* ``deliveries``: one row per command, UNIQUE on the command id: the claim that makes a
  redelivered or replayed command a no-op, and the durable queue its retries and due
  times live in (``state`` queued → sending → done).
* ``delivery_attempts``: one row per attempt (time, channel, status, provider response,
  latency), written *before* the provider call and completed after it.
* ``outbox``: outcomes and dead letters, written in the transaction that records the
  attempt and published to Kafka afterwards, so a crash never loses one.
* ``inbox_messages``, ``csm_tasks``: the in-app inbox and the CSM task list, where the
  delivery *is* the row (UNIQUE command id, same transaction as the claim).
* ``unsubscribes``: contacts who asked for no more email.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    Table,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB

from churnguard.common.db import metadata_for

metadata = metadata_for()


def _now() -> Column[object]:
    return Column("created_at", DateTime(timezone=True), server_default=func.now(), nullable=False)


deliveries = Table(
    "deliveries",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("command_id", Text, nullable=False, unique=True),
    Column("action", Text, nullable=False),
    Column("channel", Text, nullable=False),
    Column("account_id", Text, nullable=False),
    Column("template", Text),
    Column("recipient", Text),
    Column("priority", Integer, nullable=False, server_default="0"),
    Column("command", JSONB, nullable=False),
    Column("command_time", DateTime(timezone=True), nullable=False),
    Column("source_topic", Text),
    Column("source_partition", Integer),
    Column("source_offset", BigInteger),
    Column("state", Text, nullable=False),
    Column("status", Text),
    Column("detail", Text),
    Column("attempts", Integer, nullable=False, server_default="0"),
    # the last attempt's process died during the provider call: its result is unknown
    Column("in_doubt", Boolean, nullable=False, server_default="false"),
    Column("due_at", DateTime(timezone=True), nullable=False),
    Column("locked_by", Integer),
    Column("locked_until", DateTime(timezone=True)),
    Column("received_at", DateTime(timezone=True), server_default=func.now(), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
)

delivery_attempts = Table(
    "delivery_attempts",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("delivery_id", BigInteger, ForeignKey("deliveries.id"), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("channel", Text, nullable=False),
    Column("instance", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), server_default=func.now(), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Column("status", Text, nullable=False),
    Column("provider_response", Text),
    Column("latency_ms", Float),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("dedupe_key", Text, nullable=False, unique=True),
    Column("topic", Text, nullable=False),
    Column("dead_letter", Integer, nullable=False, server_default="0"),
    Column("key", LargeBinary),
    Column("value", LargeBinary, nullable=False),
    Column("headers", JSONB, nullable=False, server_default="[]"),
    _now(),
    Column("published_at", DateTime(timezone=True)),
)

inbox_messages = Table(
    "inbox_messages",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("command_id", Text, nullable=False, unique=True),
    Column("account_id", Text, nullable=False),
    Column("user_id", Text, nullable=False),
    Column("template", Text, nullable=False),
    Column("title", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("link", Text),
    _now(),
    Column("read_at", DateTime(timezone=True)),
    Column("dismissed_at", DateTime(timezone=True)),
)

csm_tasks = Table(
    "csm_tasks",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("command_id", Text, nullable=False, unique=True),
    Column("account_id", Text, nullable=False),
    Column("assignee", Text, nullable=False),
    Column("template", Text, nullable=False),
    Column("title", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("link", Text),
    Column("priority", Integer, nullable=False, server_default="0"),
    _now(),
    Column("done_at", DateTime(timezone=True)),
)

unsubscribes = Table(
    "unsubscribes",
    metadata,
    Column("email", Text, primary_key=True),
    Column("via", Text, nullable=False),
    Column("unsubscribed_at", DateTime(timezone=True), server_default=func.now(), nullable=False),
)
