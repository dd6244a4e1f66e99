"""Leases: one holder at a time of a named duty (the reaper's round) among several gateways."""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("name", sa.Text(), primary_key=True), sa.Column("holder", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False))


def downgrade() -> None:
    op.drop_table("leases")
