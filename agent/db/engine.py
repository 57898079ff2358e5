"""The agent's database: engine, sessions and schema set-up.

SQLite in WAL mode is the embedded default (one file in the work directory); any
SQLAlchemy PostgreSQL URL works the same. All tables share one declarative `Base`
(`agent.db.base`); each table lives next to the code that owns it (`agent.tables` lists
them). The schema is owned by the Alembic migrations in `agent/db/migrations`, which
`open_database` applies on start; `create_all` is never used, so a database always carries
a known revision. Nothing here imports the rest of the project: migrations are explicit
revisions and need no model classes.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, select
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from agent.errors import DatabaseOpenError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

log = logging.getLogger("fedsite.db")


def safe_url(url: str) -> str:
    """The URL as it may be shown to a person: any password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_path(url: str) -> Path | None:
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL; None for other databases and in-memory SQLite."""
    return _sqlite_path(url) if url.startswith("sqlite") else None


# SQLite's companion files: the write-ahead log and the shared-memory index (WAL mode).
SQLITE_COMPANIONS = ("-wal", "-shm")


def _private_sqlite_file(path: Path) -> None:
    """Create the database file owner-only (0600) before SQLite would create it 0644.

    The file holds the audit log, the token hashes and the job records, and the key files next
    to it are already 0600. SQLite gives its ``-wal`` and ``-shm`` files the database file's
    permissions, so creating the database file private makes all three private. A file left
    world-readable by an earlier version (or a careless copy) loses its world bits here, its
    companions too; its group bits are kept, as a site may share the file with a group on
    purpose.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for candidate in (path, *(path.with_name(path.name + s) for s in SQLITE_COMPANIONS)):
            _drop_world_access(candidate)
        return
    os.close(fd)


def _drop_world_access(path: Path) -> None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o007:
            path.chmod(mode & ~0o007)
            log.warning("%s was readable by any user; now %s", path, oct(mode & ~0o007))
    except FileNotFoundError:
        pass
    except PermissionError as exc:  # not ours to change; say so rather than fail the start
        log.warning("%s is readable by any user and cannot be changed: %s", path, exc)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = _sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            _private_sqlite_file(path)
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        else:
            # An in-memory database exists per connection: keep exactly one.
            engine = create_engine(url, connect_args={"check_same_thread": False}, poolclass=StaticPool)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for `pg_advisory_xact_lock`, derived from a lock name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class Database:
    """One engine and its session factory; cheap to pass around, safe to share in a process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Database({safe_url(self.url)!r})"

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

    @contextmanager
    def locked_connection(self, lock_name: str) -> Iterator[Connection]:
        """A connection in a write transaction that no other process holds under the same name.

        SQLite has one writer at a time, so the lock is the database's own write lock taken
        up front (`BEGIN IMMEDIATE`; waits up to the busy timeout). The driver's default
        would only take it at the first INSERT, after our reads, and two writers could then
        both read the same chain head. PostgreSQL gets a transaction-scoped advisory lock
        keyed by `lock_name`, released by the commit or rollback.

        Do not call this while the same thread holds an open SQLite write transaction on
        another connection: it would wait for itself until the busy timeout.
        """
        if self.is_sqlite:
            with self.engine.connect() as raw:
                conn = raw.execution_options(isolation_level="AUTOCOMMIT")
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    # SQLite itself ends the transaction on some errors (disk full, I/O).
                    if conn.connection.driver_connection.in_transaction:  # type: ignore[union-attr]
                        conn.exec_driver_sql("ROLLBACK")
                    raise
                conn.exec_driver_sql("COMMIT")
        else:
            with self.engine.connect() as conn, conn.begin():
                conn.execute(select(func.pg_advisory_xact_lock(advisory_key(lock_name))))
                yield conn

    @contextmanager
    def read_snapshot(self) -> Iterator[Connection]:
        """A read-only connection that sees one consistent state of the database throughout.

        Several queries through it agree with each other even while other processes commit
        (SQLite: one deferred read transaction in WAL mode; PostgreSQL: REPEATABLE READ).
        The driver's default on SQLite runs each SELECT on its own, newest state.
        """
        if self.is_sqlite:
            with self.engine.connect() as raw:
                conn = raw.execution_options(isolation_level="AUTOCOMMIT")
                conn.exec_driver_sql("BEGIN")
                try:
                    yield conn
                finally:
                    if conn.connection.driver_connection.in_transaction:  # type: ignore[union-attr]
                        conn.exec_driver_sql("ROLLBACK")
        else:
            with self.engine.connect() as raw:
                conn = raw.execution_options(isolation_level="REPEATABLE READ")
                with conn.begin() as tx:
                    yield conn
                    tx.rollback()

    @contextmanager
    def locked_session(self, lock_name: str) -> Iterator[Session]:
        """Like `locked_connection`, as an ORM session; commits on success, rolls back on error."""
        with self.locked_connection(lock_name) as conn:
            s = Session(bind=conn, expire_on_commit=False, join_transaction_mode="rollback_only")
            try:
                yield s
                s.flush()
            finally:
                s.close()

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(url: str | None = None) -> Any:
    """An Alembic `Config` built in code, pointing at the migrations shipped in this package."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolation would choke on a '%' in a password.
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@functools.cache
def _revisions() -> tuple[frozenset[str], frozenset[str]]:
    """(head revisions, all known revisions) of the migrations shipped with this version."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    return frozenset(script.get_heads()), frozenset(r.revision for r in script.walk_revisions())


def _upgrade(conn: Connection) -> None:
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    current = set(MigrationContext.configure(conn).get_current_heads())
    heads, known = _revisions()
    if current == heads:
        return
    unknown = sorted(current - known)
    if unknown:
        raise DatabaseOpenError(
            f"the database's schema revision {', '.join(unknown)} is unknown to this fedsite version "
            "(written by a newer version?); upgrade fedsite instead of opening it with this one"
        )
    cfg = alembic_config()
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, "head")


@contextmanager
def _sqlite_migration_lock(path: Path) -> Iterator[None]:
    # Two agents (or the agent and a CLI command) starting at once on a fresh file would
    # both see an empty schema and both try to create it; the second would fail.
    lock = path.with_name(path.name + ".migrate-lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def migrate(db: Database) -> None:
    """Bring the schema of `db` to the newest revision; safe when several processes start at once."""
    if db.is_sqlite:
        path = _sqlite_path(db.url)
        if path is None:
            with db.engine.begin() as conn:
                _upgrade(conn)
            return
        with _sqlite_migration_lock(path), db.engine.begin() as conn:
            _upgrade(conn)
        return
    with db.engine.connect() as conn:
        # A session-level lock spans Alembic's own transactions on this connection.
        key = advisory_key("fedsite.migrate")
        conn.execute(select(func.pg_advisory_lock(key)))
        conn.commit()
        try:
            with conn.begin():
                _upgrade(conn)
        finally:
            conn.execute(select(func.pg_advisory_unlock(key)))
            conn.commit()


def schema_revisions(db: Database) -> tuple[frozenset[str], frozenset[str]]:
    """(the database's current revisions, this version's head revisions), without migrating: equal
    when the schema is up to date; `fedsite doctor` reports the difference instead of applying it."""
    from alembic.runtime.migration import MigrationContext

    with db.engine.connect() as conn:
        current = frozenset(MigrationContext.configure(conn).get_current_heads())
    return current, _revisions()[0]


def open_database(url: str) -> Database:
    """Open the database at URL and bring its schema up to date (Alembic `upgrade head`)."""
    db = Database(url)
    try:
        migrate(db)
    except Exception as exc:
        db.dispose()
        why = str(exc) if isinstance(exc, DatabaseOpenError) else f"{type(exc).__name__}: {exc}"
        raise DatabaseOpenError(f"cannot open database {safe_url(url)}: {why}") from exc
    return db
