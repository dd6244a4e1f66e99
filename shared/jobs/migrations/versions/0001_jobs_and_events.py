"""Jobs and their events (the schema before migrations were versioned).

A SQLite file created by that earlier code already holds these tables: they are kept as they are.
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_TS = sa.Double()
_BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # an SQLite rowid must be INTEGER
_NOT_NULL_KEY = "idempotency_key IS NOT NULL"


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE SEQUENCE IF NOT EXISTS jobs_seq")  # jobs.seq: the order of submission
    if not inspector.has_table("jobs"):
        _create_jobs()
    if not inspector.has_table("events"):
        op.create_table(
            "events",
            sa.Column("seq", _BIGINT, primary_key=True, autoincrement=True),
            sa.Column("job_id", sa.Text(), nullable=False), sa.Column("ts", _TS, nullable=False),
            sa.Column("type", sa.Text(), nullable=False), sa.Column("data", sa.Text(), nullable=False),
            sqlite_autoincrement=True)
        op.create_index("events_job", "events", ["job_id", "seq"])


def _create_jobs() -> None:
    zero = sa.text("0")
    op.create_table(
        "jobs",
        sa.Column("id", sa.Text(), primary_key=True), sa.Column("team", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False), sa.Column("state", sa.Text(), nullable=False),
        sa.Column("params", sa.Text(), nullable=False), sa.Column("created_at", _TS, nullable=False),
        sa.Column("dispatched_at", _TS), sa.Column("started_at", _TS), sa.Column("finished_at", _TS),
        sa.Column("heartbeat_at", _TS),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=zero),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("dispatch", sa.Integer(), nullable=False, server_default=zero),
        sa.Column("cancel_requested", sa.Integer(), nullable=False, server_default=zero),
        sa.Column("error", sa.Text()), sa.Column("result", sa.Text()), sa.Column("progress", sa.Text()),
        sa.Column("worker", sa.Text()), sa.Column("pid", sa.Integer()),
        sa.Column("idempotency_key", sa.Text()), sa.Column("request_hash", sa.Text()),
        sa.Column("seq", sa.BigInteger(), nullable=False))
    op.create_index("jobs_idem", "jobs", ["team", "idempotency_key"], unique=True,
                    sqlite_where=sa.text(_NOT_NULL_KEY), postgresql_where=sa.text(_NOT_NULL_KEY))
    op.create_index("jobs_team", "jobs", ["team", "seq"])
    op.create_index("jobs_state", "jobs", ["state"])


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("jobs")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP SEQUENCE IF EXISTS jobs_seq")
