"""The agent's database: engine, sessions and schema set-up.

SQLite in WAL mode is the embedded default (one file in the work directory); any
SQLAlchemy PostgreSQL URL works the same. All tables share one declarative `Base`; the
models live in `agent.audit.models` (audit chain, tokens, plan approvals),
`agent.audit.catalog_models` (dataset catalog) and `agent.audit.job_models` (rounds and
evaluations).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker


class Base(DeclarativeBase):
    pass


def load_all_models() -> None:
    """Import every model module so that `Base.metadata` knows all tables."""
    import agent.audit.catalog_models
    import agent.audit.job_models
    import agent.audit.models  # noqa: F401


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


class Database:
    """One engine and its session factory; cheap to pass around, safe to share in a process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        s = self._sessions()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def dispose(self) -> None:
        self.engine.dispose()


def open_database(url: str) -> Database:
    """Open the database at URL and bring its schema up to date."""
    load_all_models()
    db = Database(url)
    Base.metadata.create_all(db.engine)
    return db
