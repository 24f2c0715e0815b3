"""ingest: which account each Segment user belongs to

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

A Segment call without ``context.groupId`` finds its account from the user's earlier
calls (a ``group`` call, or any call that named the account). Kept here so that a
restarted ingest worker, or another one, still knows it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from churnguard.common.db import migration_schema

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``user_accounts``."""
    op.create_table(
        "user_accounts",
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("account_id", sa.Text(), nullable=False),
        # when a worker learned it: of two workers' writes, the later learning wins
        sa.Column("learned_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name="pk_user_accounts"),
        schema=migration_schema(),
    )


def downgrade() -> None:
    """Drop ``user_accounts``."""
    op.drop_table("user_accounts", schema=migration_schema())
