"""Playbooks' tables (schema ``playbooks``; unqualified, placed by the engine's search_path).

Every effect is recorded in the table that owns it under a unique key, which is what
makes redelivery harmless: a decision per (signal, playbook), a touch per action, a
command per id, a timer per dedupe key, a dunning case per invoice, an attempt per
(case, number), an outcome per id. Migration 0001 creates the same tables.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    Identity,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from churnguard.common.db import metadata_for

metadata = metadata_for()


def _ts(name: str, nullable: bool = True) -> Column[object]:
    return Column(name, DateTime(timezone=True), nullable=nullable)


def _created() -> Column[object]:
    return Column(
        "created_at", DateTime(timezone=True), server_default=text("now()"), nullable=False
    )


accounts = Table(
    "accounts",
    metadata,
    Column("account_id", Text, primary_key=True),
    Column("name", Text),
    Column("plan", Text),
    Column("segment", Text),
    Column("owner", Text),
    Column("csm", Text),
    Column("timezone", Text),
    _ts("traits_at"),
    Column("mrr", BigInteger, comment="minor units"),
    Column("currency", Text),
    _ts("mrr_at"),
    Column("subscription_status", Text),
    _ts("subscription_started_at"),
    _ts("subscription_at"),
    Column("churn_probability", Float),
    Column("health", Integer),
    Column("tier", Text),
    Column("reasons", JSONB),
    Column("features", JSONB),
    Column("unadopted_sticky", JSONB),
    _ts("scored_at"),
    Column("renewal_date", Date),
    _created(),
)

contacts = Table(
    "contacts",
    metadata,
    Column("account_id", Text, nullable=False),
    Column("user_id", Text, nullable=False),
    Column("email", Text),
    Column("role", Text),
    Column("timezone", Text),
    _ts("seen_at", nullable=False),
    PrimaryKeyConstraint("account_id", "user_id"),
)

decisions = Table(
    "decisions",
    metadata,
    Column("decision_id", Text, primary_key=True),
    Column("signal_id", Text, nullable=False),
    Column("signal_type", Text, nullable=False),
    Column("playbook", Text, nullable=False),
    Column("playbook_version", Text, nullable=False),
    Column("account_id", Text, nullable=False),
    _ts("decided_at", nullable=False),
    Column("outcome", Text, nullable=False),
    Column("reason", Text),
    Column("holdout", Boolean, nullable=False, server_default=text("false")),
    Column("detail", JSONB),
    _created(),
    UniqueConstraint("signal_id", "playbook"),
    Index("ix_decisions_account_id_decided_at", "account_id", "decided_at"),
)

decision_actions = Table(
    "decision_actions",
    metadata,
    Column("decision_id", Text, nullable=False),
    Column("action_index", Integer, nullable=False),
    Column("channel", Text, nullable=False),
    Column("audience", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("reason", Text),
    Column("command_ids", JSONB),
    _ts("due_at"),
    Column("delivery", Text, comment="the latest outcome notify reported"),
    _ts("updated_at", nullable=False),
    PrimaryKeyConstraint("decision_id", "action_index"),
)

cooldowns = Table(
    "cooldowns",
    metadata,
    Column("account_id", Text, nullable=False),
    Column("playbook", Text, nullable=False),
    _ts("last_fired_at", nullable=False),
    PrimaryKeyConstraint("account_id", "playbook"),
)

dedupe_keys = Table(
    "dedupe_keys",
    metadata,
    Column("playbook", Text, nullable=False),
    Column("account_id", Text, nullable=False),
    Column("key", Text, nullable=False),
    Column("decision_id", Text, nullable=False),
    _created(),
    PrimaryKeyConstraint("playbook", "account_id", "key"),
)

contact_ledger = Table(
    "contact_ledger",
    metadata,
    Column("touch_id", Text, primary_key=True),
    Column("account_id", Text, nullable=False),
    Column("audience", Text, nullable=False),
    Column("channel", Text, nullable=False),
    Column("playbook", Text, nullable=False),
    _ts("at", nullable=False),
    Column("transactional", Boolean, nullable=False, server_default=text("false")),
    Column("voided", Boolean, nullable=False, server_default=text("false")),
    Index("ix_contact_ledger_account_id_audience_at", "account_id", "audience", "at"),
)

timers = Table(
    "timers",
    metadata,
    Column("timer_id", BigInteger, Identity(), primary_key=True),
    Column("dedupe_key", Text, nullable=False, unique=True),
    Column("kind", Text, nullable=False),
    Column("account_id", Text, nullable=False),
    _ts("due_at", nullable=False),
    Column("payload", JSONB, nullable=False),
    _created(),
    _ts("fired_at"),
    _ts("cancelled_at"),
    Column("cancel_reason", Text),
    Index(
        "ix_timers_due_at_pending",
        "due_at",
        postgresql_where=text("fired_at IS NULL AND cancelled_at IS NULL"),
    ),
    Index(
        "ix_timers_account_id_pending",
        "account_id",
        postgresql_where=text("fired_at IS NULL AND cancelled_at IS NULL"),
    ),
)

outbox = Table(
    "outbox",
    metadata,
    Column("command_id", Text, primary_key=True),
    Column("topic", Text, nullable=False, comment="the Topic enum member, e.g. NOTIFICATIONS"),
    Column("account_id", Text, nullable=False),
    Column("value", LargeBinary, nullable=False),
    Column("decision_id", Text, nullable=False),
    _ts("received_at"),
    _created(),
    _ts("sent_at"),
    Index("ix_outbox_created_at_unsent", "created_at", postgresql_where=text("sent_at IS NULL")),
)

dunning_cases = Table(
    "dunning_cases",
    metadata,
    Column("case_id", Text, primary_key=True),
    Column("account_id", Text, nullable=False),
    Column("invoice_id", Text, nullable=False),
    Column("playbook", Text, nullable=False),
    Column("policy", JSONB, nullable=False, comment="the dunning action as it was when opened"),
    Column("status", Text, nullable=False),
    Column("decline_code", Text),
    Column("decline_kind", Text, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("currency", Text, nullable=False),
    _ts("failed_at", nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    _ts("last_attempt_at"),
    _ts("next_attempt_at"),
    Column("final_state", Text),
    _ts("concluded_at"),
    _ts("updated_at", nullable=False),
    UniqueConstraint("account_id", "invoice_id"),
    Index(
        "ix_dunning_cases_account_id_open",
        "account_id",
        postgresql_where=text("status IN ('retrying', 'awaiting_card_update')"),
    ),
)

dunning_attempts = Table(
    "dunning_attempts",
    metadata,
    Column("command_id", Text, primary_key=True),
    Column("case_id", Text, nullable=False),
    Column("attempt", Integer, nullable=False),
    _ts("scheduled_for", nullable=False),
    Column("outcome", Text),
    Column("decline_code", Text),
    _ts("outcome_at"),
    UniqueConstraint("case_id", "attempt"),
)

paid_invoices = Table(
    "paid_invoices",
    metadata,
    Column("account_id", Text, nullable=False),
    Column("invoice_id", Text, nullable=False),
    _ts("paid_at", nullable=False),
    PrimaryKeyConstraint("account_id", "invoice_id"),
)

outcomes = Table(
    "outcomes",
    metadata,
    Column("outcome_id", Text, primary_key=True),
    Column("action_id", Text, nullable=False),
    Column("status", Text, nullable=False),
    _ts("at", nullable=False),
)

OPEN_DUNNING = ("retrying", "awaiting_card_update")
