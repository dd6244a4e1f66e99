"""Alembic migrations of the jobs database (applied by ``shared.jobs.db.migrate``)."""
