"""Database fixtures shared by every area's tests: the same test runs on SQLite and PostgreSQL.

Use in a test module with
`from db_fixtures import fixture_audit_log, fixture_db, fixture_db_url  # noqa: F401`: the
fixtures are called `db_url`, `db` (the opened `Database`), `audit_log` and `blank_db_url`.

`db_url` is parametrized: `sqlite` (a file in the test's tmp folder) and `postgresql` (from
FEDSITE_TEST_POSTGRES_URL, in a schema of this test run). Either way the test starts with
the newest schema and no rows: the SQLite file is a copy of one migrated once per run, and
the PostgreSQL tables are truncated before each test (a fresh schema is made if that cannot
be done). `blank_db_url` gives a database without any table, for tests of the migrations.

Without FEDSITE_TEST_POSTGRES_URL the PostgreSQL case is skipped on a developer's machine
and FAILS under CI=true: CI must never silently lose the PostgreSQL coverage.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from agent.audit.chain import AuditLog
from agent.db.engine import Database, open_database
from agent.jobs.states import JobKind
from agent.jobs.store import JobStore

POSTGRES_ENV = "FEDSITE_TEST_POSTGRES_URL"
DB_KINDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def postgres_base_url() -> str:
    """The test server's URL; skips (or fails under CI) when it is not configured."""
    url = os.environ.get(POSTGRES_ENV, "")
    if url:
        return url
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{POSTGRES_ENV} is not set, but CI must run the PostgreSQL tests (see .ci/postgres-up)")
    pytest.skip(f"{POSTGRES_ENV} not set: no PostgreSQL server for this test")


class PostgresSchemas:
    """Schemas of one test run on the test server; each URL puts its schema first on the search path."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.admin: Engine = create_engine(base_url, isolation_level="AUTOCOMMIT")
        self.created: list[str] = []
        self.migrated: str | None = None

    def url_for(self, schema: str) -> str:
        url = make_url(self.base_url).update_query_dict({"options": f"-csearch_path={schema}"})
        return url.render_as_string(hide_password=False)

    def new_schema(self) -> str:
        schema = f"t_{uuid.uuid4().hex[:16]}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        self.created.append(schema)
        return schema

    def drop(self, schema: str) -> None:
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        if schema in self.created:
            self.created.remove(schema)

    def clean_migrated_url(self) -> str:
        """A migrated schema with every table emptied and its sequences restarted."""
        if self.migrated is not None:
            try:
                self._truncate(self.migrated)
                return self.url_for(self.migrated)
            except DBAPIError:
                # A test left a connection holding locks; give the next test a schema of its own.
                self.migrated = None
        schema = self.new_schema()
        open_database(self.url_for(schema)).dispose()
        self.migrated = schema
        return self.url_for(schema)

    def _truncate(self, schema: str) -> None:
        # DELETE, not TRUNCATE: on a handful of rows it avoids TRUNCATE's file rewrites.
        with self.admin.connect() as conn, conn.begin():
            conn.execute(text("SET LOCAL lock_timeout = '5s'"))
            conn.execute(text("SET LOCAL session_replication_role = replica"))  # no FK order needed
            tables = conn.execute(
                text(
                    "SELECT tablename FROM pg_tables WHERE schemaname = :s AND tablename <> 'alembic_version'"
                ),
                {"s": schema},
            ).scalars()
            for table in list(tables):
                conn.execute(text(f'DELETE FROM "{schema}"."{table}"'))
            sequences = conn.execute(
                text("SELECT sequencename FROM pg_sequences WHERE schemaname = :s"), {"s": schema}
            ).scalars()
            for seq in list(sequences):
                conn.execute(text(f'ALTER SEQUENCE "{schema}"."{seq}" RESTART'))

    def close(self) -> None:
        for schema in list(self.created):
            self.drop(schema)
        self.admin.dispose()


# Shared by every test of one run, made on first use: plain objects rather than session
# fixtures, so that a test module needs to import only the fixtures it names.
_shared: dict[str, object] = {}


def _postgres_schemas(request: pytest.FixtureRequest) -> PostgresSchemas:
    schemas = _shared.get("postgres")
    if not isinstance(schemas, PostgresSchemas):
        schemas = PostgresSchemas(postgres_base_url())
        _shared["postgres"] = schemas
        request.config.add_cleanup(schemas.close)
    return schemas


def _sqlite_template(request: pytest.FixtureRequest) -> Path:
    path = _shared.get("sqlite_template")
    if not isinstance(path, Path):
        factory: pytest.TempPathFactory = request.getfixturevalue("tmp_path_factory")
        folder = factory.mktemp("db-template")
        path = folder / "fedsite.db"
        open_database(f"sqlite:///{path.as_posix()}").dispose()
        _shared["sqlite_template"] = path
    return path


@pytest.fixture(name="db_url", params=DB_KINDS)
def fixture_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty database at the newest schema, once for SQLite and once for PostgreSQL."""
    if request.param == "sqlite":
        path = tmp_path / "fedsite.db"
        shutil.copyfile(_sqlite_template(request), path)
        return f"sqlite:///{path.as_posix()}"
    return _postgres_schemas(request).clean_migrated_url()


@pytest.fixture(name="blank_db_url", params=DB_KINDS)
def fixture_blank_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a database without any table (not migrated), SQLite and PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{(tmp_path / 'blank.db').as_posix()}"
        return
    schemas = _postgres_schemas(request)
    schema = schemas.new_schema()
    try:
        yield schemas.url_for(schema)
    finally:
        schemas.drop(schema)


@pytest.fixture(name="db")
def fixture_db(db_url: str) -> Iterator[Database]:
    """The database at `db_url`, opened as the agent opens it."""
    database = open_database(db_url)
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture(name="audit_log")
def fixture_audit_log(db: Database) -> AuditLog:
    return AuditLog(db)


def queue_job(store: JobStore, round_id: str, kind: JobKind = JobKind.TRAIN) -> int:
    """A queued job row with placeholder plan and paths, as the coordinator's token would create it."""
    return store.create(
        round_id=round_id,
        kind=kind,
        actor="token:coord",
        dataset="brain",
        plan_json="{}",
        plan_hash="a" * 64,
        weights_sha256=None,
        weights_path=None,
        job_dir="/nowhere",
    ).id
