"""What the rest of the agent needs of the audit log, as a protocol.

The TLS gate, the egress gate, the catalog scan and the jobs record events through this one
interface; `agent.audit.chain.AuditLog` satisfies it, and tests pass a list-backed stand-in.
Depending on the protocol rather than on `AuditLog` keeps those modules free of the database.
"""

from __future__ import annotations

from typing import Any, Protocol


class AuditSink(Protocol):
    """Appends events to the audit log and finds earlier ones."""

    def append(self, action: str, *, actor: str, details: dict[str, Any]) -> Any:
        """Record ACTION by ACTOR with DETAILS (JSON-safe, no secrets)."""
        ...

    def find(self, action: str, **match: Any) -> list[dict[str, Any]]:
        """Earlier events of ACTION whose details contain every MATCH item, oldest first."""
        ...
