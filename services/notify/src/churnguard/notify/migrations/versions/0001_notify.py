"""notify: deliveries, attempts, outbox, inbox, CSM tasks, unsubscribes

Revision ID: 0001
Revises:
Create Date: 2026-12-01

``deliveries.command_id`` is UNIQUE: inserting a command claims it, and a redelivered
command finds it taken (``ON CONFLICT DO NOTHING RETURNING`` returns nothing). The
partial index on open deliveries keeps the scheduler's "what is due" probe small however
many finished deliveries accumulate.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from churnguard.common.db import migration_schema

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, *, default_now: bool = False, nullable: bool = True) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(
        name,
        sa.DateTime(timezone=True),
        server_default=sa.text("now()") if default_now else None,
        nullable=nullable,
    )


def upgrade() -> None:
    """Create notify's tables."""
    schema = migration_schema()
    op.create_table(
        "deliveries",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("command_id", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("account_id", sa.Text(), nullable=False),
        sa.Column("template", sa.Text(), nullable=True),
        sa.Column("recipient", sa.Text(), nullable=True),
        sa.Column("priority", sa.Integer(), server_default="0", nullable=False),
        sa.Column("command", postgresql.JSONB(), nullable=False),
        _ts("command_time", nullable=False),
        sa.Column("source_topic", sa.Text(), nullable=True),
        sa.Column("source_partition", sa.Integer(), nullable=True),
        sa.Column("source_offset", sa.BigInteger(), nullable=True),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("in_doubt", sa.Boolean(), server_default=sa.false(), nullable=False),
        _ts("due_at", nullable=False),
        sa.Column("locked_by", sa.Integer(), nullable=True),
        _ts("locked_until"),
        _ts("received_at", default_now=True, nullable=False),
        _ts("finished_at"),
        sa.CheckConstraint("state IN ('queued', 'sending', 'done')", name="state"),
        sa.PrimaryKeyConstraint("id", name="pk_deliveries"),
        sa.UniqueConstraint("command_id", name="uq_deliveries_command_id"),
        schema=schema,
    )
    op.create_index(
        "ix_deliveries_open_due",
        "deliveries",
        ["due_at", "priority"],
        schema=schema,
        postgresql_where=sa.text("state <> 'done'"),
    )
    op.create_index("ix_deliveries_account_id", "deliveries", ["account_id"], schema=schema)
    op.create_table(
        "delivery_attempts",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("delivery_id", sa.BigInteger(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("instance", sa.Integer(), nullable=False),
        _ts("started_at", default_now=True, nullable=False),
        _ts("finished_at"),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("provider_response", sa.Text(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            [f"{schema}.deliveries.id"],
            name="fk_delivery_attempts_delivery_id_deliveries",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_delivery_attempts"),
        sa.UniqueConstraint(
            "delivery_id", "attempt", name="uq_delivery_attempts_delivery_id_attempt"
        ),
        schema=schema,
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("dedupe_key", sa.Text(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("dead_letter", sa.Integer(), server_default="0", nullable=False),
        sa.Column("key", sa.LargeBinary(), nullable=True),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.Column("headers", postgresql.JSONB(), server_default="[]", nullable=False),
        _ts("created_at", default_now=True, nullable=False),
        _ts("published_at"),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.UniqueConstraint("dedupe_key", name="uq_outbox_dedupe_key"),
        schema=schema,
    )
    op.create_index(
        "ix_outbox_unpublished",
        "outbox",
        ["id"],
        schema=schema,
        postgresql_where=sa.text("published_at IS NULL"),
    )
    for table, person in (("inbox_messages", "user_id"), ("csm_tasks", "assignee")):
        extra = (
            [sa.Column("read_at", sa.DateTime(timezone=True)), _ts("dismissed_at")]
            if table == "inbox_messages"
            else [sa.Column("priority", sa.Integer(), server_default="0"), _ts("done_at")]
        )
        op.create_table(
            table,
            sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
            sa.Column("command_id", sa.Text(), nullable=False),
            sa.Column("account_id", sa.Text(), nullable=False),
            sa.Column(person, sa.Text(), nullable=False),
            sa.Column("template", sa.Text(), nullable=False),
            sa.Column("title", sa.Text(), nullable=False),
            sa.Column("body", sa.Text(), nullable=False),
            sa.Column("link", sa.Text(), nullable=True),
            _ts("created_at", default_now=True, nullable=False),
            *extra,
            sa.PrimaryKeyConstraint("id", name=f"pk_{table}"),
            sa.UniqueConstraint("command_id", name=f"uq_{table}_command_id"),
            schema=schema,
        )
        op.create_index(f"ix_{table}_{person}_id", table, [person, "id"], schema=schema)
        op.create_index(f"ix_{table}_account_id_id", table, ["account_id", "id"], schema=schema)
    op.create_table(
        "unsubscribes",
        sa.Column("email", sa.Text(), nullable=False),
        sa.Column("via", sa.Text(), nullable=False),
        _ts("unsubscribed_at", default_now=True, nullable=False),
        sa.PrimaryKeyConstraint("email", name="pk_unsubscribes"),
        schema=schema,
    )


def downgrade() -> None:
    """Drop notify's tables."""
    schema = migration_schema()
    for table in (
        "unsubscribes",
        "csm_tasks",
        "inbox_messages",
        "outbox",
        "delivery_attempts",
        "deliveries",
    ):
        op.drop_table(table, schema=schema)
