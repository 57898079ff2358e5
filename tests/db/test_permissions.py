"""The SQLite database holds the audit log, token hashes and job records: it and its WAL and
shared-memory files are readable by the agent's user only, like the key files next to them."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.audit.chain import AuditLog
from agent.db.engine import open_database

COMPANIONS = ("", "-wal", "-shm")


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The umask most systems give a service (0022), under which SQLite itself creates 0644."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def modes(db_file: Path) -> dict[str, str]:
    return {
        suffix or "db": oct(stat.S_IMODE(Path(f"{db_file}{suffix}").stat().st_mode)) for suffix in COMPANIONS
    }


def written(db_file: Path) -> dict[str, str]:
    """The modes of the database and its companions while it is open and has been written."""
    db = open_database(f"sqlite:///{db_file}")
    try:
        AuditLog(db).append("site.started", actor="test", details={})
        return modes(db_file)
    finally:
        db.dispose()


def test_a_fresh_database_and_its_wal_files_are_owner_only(tmp_path: Path) -> None:
    db_file = tmp_path / "work" / "fedsite.db"
    assert written(db_file) == {"db": "0o600", "-wal": "0o600", "-shm": "0o600"}


def test_an_existing_world_readable_database_loses_its_world_bits(tmp_path: Path) -> None:
    db_file = tmp_path / "fedsite.db"
    written(db_file)
    db_file.chmod(0o644)
    # Group bits are the site's choice (a shared group); only access by any user is removed.
    assert written(db_file) == {"db": "0o640", "-wal": "0o640", "-shm": "0o640"}
