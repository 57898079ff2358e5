"""Every table module of the agent, imported in one place.

Each table lives next to the code that owns it (the audit chain in `agent.audit`, tokens and
approvals in `agent.access`, the catalog in `agent.data`, rounds in `agent.jobs`, the
connector's tasks in `agent.connect`). Alembic's environment and the schema tests need all of
them on one `Base.metadata` at once; this is the one function that gathers them, so that
`agent.db` itself imports nothing of the project.
"""

from __future__ import annotations

import importlib

from sqlalchemy import MetaData

TABLE_MODULES = (
    "agent.audit.models",
    "agent.access.models",
    "agent.data.models",
    "agent.jobs.models",
    "agent.connect.models",
    "agent.console.models",
    "agent.privacy.models",
)


def load_all_models() -> MetaData:
    """Import every table module; returns the metadata that now knows every table."""
    for name in TABLE_MODULES:
        importlib.import_module(name)
    from agent.db.base import Base

    return Base.metadata
