"""Alembic environment for the agent's database.

At run time `agent.db.engine.open_database` hands Alembic an open connection (no alembic.ini
is needed). To write a new revision after changing a model, bring a scratch SQLite database
to head and let Alembic compare it with the models:

    alembic -c agent/db/alembic.ini upgrade head
    alembic -c agent/db/alembic.ini revision --autogenerate -m "what changed"

`tests/db/test_migrations.py` fails until the revisions match the models.
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.types import TypeDecorator

from agent.tables import load_all_models

target_metadata = load_all_models()


def _render_item(type_: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    # Revisions must not import application types: a later rename would break old revisions.
    if type_ == "type" and isinstance(obj, TypeDecorator):
        return f"sa.{obj.impl_instance!r}"  # the revision template imports sqlalchemy as sa
    return False


def _configure(connection: Any) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite alters tables by copying them
        compare_type=True,
        render_item=_render_item,
    )


def run_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no database: set sqlalchemy.url in the Alembic config")
    engine = create_engine(url)
    with engine.connect() as conn:
        _configure(conn)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_online()
