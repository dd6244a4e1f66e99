"""Which URLs name a jobs database, read where the settings are (torch-free, no connection made).

SQLite is a file path or ``sqlite:///PATH``; PostgreSQL is ``postgresql://USER:PASSWORD@HOST:PORT/DB``
(through psycopg). Anything else is refused, naming the setting.
"""

from __future__ import annotations

import re
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url

SETTING = "LLAMA_SVC_JOBS_DB"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_PG_SCHEMES = ("postgresql", "postgresql+psycopg")


def database_url(value: str | Path, default: Path | None = None) -> str:
    """The SQLAlchemy URL for a ``LLAMA_SVC_JOBS_DB`` value: a file path or ``sqlite:///PATH``
    (SQLite), ``postgresql://...`` (PostgreSQL, through psycopg); empty means ``default``.

    Anything else raises ValueError naming the setting: a URL that is not honoured is never
    taken for a file name."""
    text = str(value).strip()
    if not text:
        if default is None:
            raise ValueError(f"{SETTING} is empty and there is no default jobs database")
        return _sqlite_url(Path(default))
    if not _SCHEME.match(text) or isinstance(value, Path):
        return _sqlite_url(Path(text))
    if text.startswith("sqlite:///"):
        return _sqlite_url(Path(text[len("sqlite:///"):]))
    scheme = text.split(":", 1)[0]
    if scheme in _PG_SCHEMES and text.startswith(scheme + "://"):
        try:
            url = make_url(text)
        except sa.exc.ArgumentError as e:
            raise ValueError(f"{SETTING} is not a valid PostgreSQL URL: {e}") from None
        if not url.database:
            raise ValueError(f"{SETTING} names no database: postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
        return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    raise ValueError(f"{SETTING}={redact(text)!r} is not supported: use a file path, sqlite:///PATH or "
                     "postgresql://USER:PASSWORD@HOST:PORT/DATABASE")


def _sqlite_url(path: Path) -> str:
    return f"sqlite:///{path.expanduser().resolve()}"


def redact(url: str) -> str:
    """The URL without its password, for logs and messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)
