"""(being written)"""

from agent.audit.db import Base  # noqa: F401
