"""playbooks: accounts, decisions, guard rails, timers, outbox, dunning

Revision ID: 0001
Revises:
Create Date: 2026-12-02

The decision log (decisions, decision_actions) with one row per (signal, playbook); the
guard rails' state (cooldowns, dedupe_keys, contact_ledger); timers that survive
restarts; the outbox of commands not yet acknowledged by Kafka; dunning cases and their
attempts; what playbooks know of each account (accounts, contacts, paid_invoices) and
the outcomes already applied.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from churnguard.common.db import migration_schema

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = (
    "accounts",
    "contact_ledger",
    "contacts",
    "cooldowns",
    "decision_actions",
    "decisions",
    "dedupe_keys",
    "dunning_attempts",
    "dunning_cases",
    "outbox",
    "outcomes",
    "paid_invoices",
    "timers",
)


def upgrade() -> None:
    """Create every table of the playbooks schema."""
    schema = migration_schema()
    op.create_table(
        "accounts",
        sa.Column("account_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("plan", sa.Text(), nullable=True),
        sa.Column("segment", sa.Text(), nullable=True),
        sa.Column("owner", sa.Text(), nullable=True),
        sa.Column("csm", sa.Text(), nullable=True),
        sa.Column("timezone", sa.Text(), nullable=True),
        sa.Column("traits_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("mrr", sa.BigInteger(), nullable=True, comment="minor units"),
        sa.Column("currency", sa.Text(), nullable=True),
        sa.Column("mrr_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("subscription_status", sa.Text(), nullable=True),
        sa.Column("subscription_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("subscription_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("churn_probability", sa.Float(), nullable=True),
        sa.Column("health", sa.Integer(), nullable=True),
        sa.Column("tier", sa.Text(), nullable=True),
        sa.Column("reasons", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("features", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("unadopted_sticky", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("scored_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("renewal_date", sa.Date(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("account_id", name="pk_accounts"),
        schema=schema,
    )
    op.create_table(
        "contact_ledger",
        sa.Column("touch_id", sa.Text(), nullable=False),
        sa.Column("account_id", sa.Text(), nullable=False),
        sa.Column("audience", sa.Text(), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("playbook", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("transactional", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("voided", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.PrimaryKeyConstraint("touch_id", name="pk_contact_ledger"),
        schema=schema,
    )
    op.create_index(
        "ix_contact_ledger_account_id_audience_at",
        "contact_ledger",
        ["account_id", "audience", "at"],
        unique=False,
        schema=schema,
    )
    op.create_table(
        "contacts",
        sa.Column("account_id", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("email", sa.Text(), nullable=True),
        sa.Column("role", sa.Text(), nullable=True),
        sa.Column("timezone", sa.Text(), nullable=True),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "user_id", name="pk_contacts"),
        schema=schema,
    )
    op.create_table(
        "cooldowns",
        sa.Column("account_id", sa.Text(), nullable=False),
        sa.Column("playbook", sa.Text(), nullable=False),
        sa.Column("last_fired_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "playbook", name="pk_cooldowns"),
        schema=schema,
    )
    op.create_table(
        "decision_actions",
        sa.Column("decision_id", sa.Text(), nullable=False),
        sa.Column("action_index", sa.Integer(), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("audience", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("command_ids", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "delivery", sa.Text(), nullable=True, comment="the latest outcome notify reported"
        ),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("decision_id", "action_index", name="pk_decision_actions"),
        schema=schema,
    )
    op.create_table(
        "decisions",
        sa.Column("decision_id", sa.Text(), nullable=False),
        sa.Column("signal_id", sa.Text(), nullable=False),
        sa.Column("signal_type", sa.Text(), nullable=False),
        sa.Column("playbook", sa.Text(), nullable=False),
        sa.Column("playbook_version", sa.Text(), nullable=False),
        sa.Column("account_id", sa.Text(), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("holdout", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("detail", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("decision_id", name="pk_decisions"),
        sa.UniqueConstraint("signal_id", "playbook", name="uq_decisions_signal_id_playbook"),
        schema=schema,
    )
    op.create_index(
        "ix_decisions_account_id_decided_at",
        "decisions",
        ["account_id", "decided_at"],
        unique=False,
        schema=schema,
    )
    op.create_table(
        "dedupe_keys",
        sa.Column("playbook", sa.Text(), nullable=False),
        sa.Column("account_id", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("decision_id", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("playbook", "account_id", "key", name="pk_dedupe_keys"),
        schema=schema,
    )
    op.create_table(
        "dunning_attempts",
        sa.Column("command_id", sa.Text(), nullable=False),
        sa.Column("case_id", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("scheduled_for", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=True),
        sa.Column("decline_code", sa.Text(), nullable=True),
        sa.Column("outcome_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("command_id", name="pk_dunning_attempts"),
        sa.UniqueConstraint("case_id", "attempt", name="uq_dunning_attempts_case_id_attempt"),
        schema=schema,
    )
    op.create_table(
        "dunning_cases",
        sa.Column("case_id", sa.Text(), nullable=False),
        sa.Column("account_id", sa.Text(), nullable=False),
        sa.Column("invoice_id", sa.Text(), nullable=False),
        sa.Column("playbook", sa.Text(), nullable=False),
        sa.Column(
            "policy",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
            comment="the dunning action as it was when opened",
        ),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("decline_code", sa.Text(), nullable=True),
        sa.Column("decline_kind", sa.Text(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.Text(), nullable=False),
        sa.Column("failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("final_state", sa.Text(), nullable=True),
        sa.Column("concluded_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("case_id", name="pk_dunning_cases"),
        sa.UniqueConstraint(
            "account_id", "invoice_id", name="uq_dunning_cases_account_id_invoice_id"
        ),
        schema=schema,
    )
    op.create_index(
        "ix_dunning_cases_account_id_open",
        "dunning_cases",
        ["account_id"],
        unique=False,
        postgresql_where=sa.text("status IN ('retrying', 'awaiting_card_update')"),
        schema=schema,
    )
    op.create_table(
        "outbox",
        sa.Column("command_id", sa.Text(), nullable=False),
        sa.Column(
            "topic", sa.Text(), nullable=False, comment="the Topic enum member, e.g. NOTIFICATIONS"
        ),
        sa.Column("account_id", sa.Text(), nullable=False),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.Column("decision_id", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("command_id", name="pk_outbox"),
        schema=schema,
    )
    op.create_index(
        "ix_outbox_created_at_unsent",
        "outbox",
        ["created_at"],
        unique=False,
        postgresql_where=sa.text("sent_at IS NULL"),
        schema=schema,
    )
    op.create_table(
        "outcomes",
        sa.Column("outcome_id", sa.Text(), nullable=False),
        sa.Column("action_id", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("outcome_id", name="pk_outcomes"),
        schema=schema,
    )
    op.create_table(
        "paid_invoices",
        sa.Column("account_id", sa.Text(), nullable=False),
        sa.Column("invoice_id", sa.Text(), nullable=False),
        sa.Column("paid_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "invoice_id", name="pk_paid_invoices"),
        schema=schema,
    )
    op.create_table(
        "timers",
        sa.Column("timer_id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("dedupe_key", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("account_id", sa.Text(), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("fired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancel_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("timer_id", name="pk_timers"),
        sa.UniqueConstraint("dedupe_key", name="uq_timers_dedupe_key"),
        schema=schema,
    )
    op.create_index(
        "ix_timers_account_id_pending",
        "timers",
        ["account_id"],
        unique=False,
        postgresql_where=sa.text("fired_at IS NULL AND cancelled_at IS NULL"),
        schema=schema,
    )
    op.create_index(
        "ix_timers_due_at_pending",
        "timers",
        ["due_at"],
        unique=False,
        postgresql_where=sa.text("fired_at IS NULL AND cancelled_at IS NULL"),
        schema=schema,
    )


def downgrade() -> None:
    """Drop every table of the playbooks schema."""
    for table in TABLES:
        op.drop_table(table, schema=migration_schema())
