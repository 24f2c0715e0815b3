"""ingest: sources and their write keys

Revision ID: 0001
Revises:
Create Date: 2026-11-23

A source is one sender of events (a website, a backend, a CRM export). It authenticates
with a write key; only a hash of the key is stored (a leaked table must not leak working
keys), plus its first 12 characters so the console can show which key is which.
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


def upgrade() -> None:
    """Create ``sources``."""
    op.create_table(
        "sources",
        sa.Column(
            "id",
            postgresql.UUID(as_uuid=True),
            # built in since PostgreSQL 13; the application may still pass its own ids
            server_default=sa.text("gen_random_uuid()"),
            nullable=False,
        ),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("write_key_hash", sa.Text(), nullable=False),
        sa.Column("write_key_prefix", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_sources"),
        sa.UniqueConstraint("name", name="uq_sources_name"),
        sa.UniqueConstraint("write_key_hash", name="uq_sources_write_key_hash"),
        schema=migration_schema(),
    )


def downgrade() -> None:
    """Drop ``sources``."""
    op.drop_table("sources", schema=migration_schema())
