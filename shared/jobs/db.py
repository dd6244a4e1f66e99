"""The jobs database: which URLs name one, the engine (a connection pool per process) and the
schema migrations (alembic, under ``migrations/``), applied when a process opens the store.

Two backends behind one store: SQLite (a file on one host: ``make demo``, ``make serve``) and
PostgreSQL (the system of record when gateways and workers run on several hosts).
"""

from __future__ import annotations


from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url


_MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# pg_advisory_xact_lock key serializing the migrations of processes that start together
_MIGRATE_LOCK = 0x6A6F6273


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def make_engine(url: str, *, pool_size: int = 4) -> Engine:
    """A pooled engine: ``pool_size`` connections kept, as many again on demand.

    SQLite connections run in WAL mode with a 30 s busy timeout; a transaction opened with the
    connection option ``immediate=True`` takes the write lock at BEGIN (read-modify-write)."""
    parsed: URL = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, poolclass=sa.pool.QueuePool, pool_size=pool_size, max_overflow=pool_size,
                                  connect_args={"check_same_thread": False, "timeout": 30})
        sa.event.listen(engine, "connect", _sqlite_connect)
        sa.event.listen(engine, "begin", _sqlite_begin)
        return engine
    return sa.create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True,
                            pool_recycle=1800, connect_args={"connect_timeout": 10})


def _sqlite_connect(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # the driver's implicit BEGIN off: _sqlite_begin issues it
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000"):
        dbapi_conn.execute(f"PRAGMA {pragma}")


def _sqlite_begin(conn: sa.Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision; concurrent callers wait for each other."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    with engine.connect() as conn:
        conn.execution_options(immediate=True)
        with conn.begin():
            if is_postgres(engine):
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATE_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")


def current_revision(engine: Engine) -> str | None:
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
