"""Alembic environment: runs on the connection ``shared.jobs.db.migrate`` passes in.

New revision (from the repository root):
    python -c "from alembic.config import Config; from alembic import command; c = Config();
    c.set_main_option('script_location', 'shared/jobs/migrations'); command.revision(c, 'what')"
then rename the file to the next ``NNNN_what.py`` and set its ``revision`` to ``NNNN``.
"""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
