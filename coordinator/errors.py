"""The coordinator's exceptions: the `CoordinatorError` branch under the project's root.

The whole tree, the agent's branches and this one, is written out in `agent.errors`. Each class
keeps its builtin second base (``ValueError``, ``RuntimeError``), so that code catching the
builtin keeps working.
"""

from __future__ import annotations

from agent.errors import FedsiteError


class CoordinatorError(FedsiteError):
    """Anything the reference coordinator refuses or fails at; the message says what and where."""


class FederationError(CoordinatorError, ValueError):
    """A federation file that cannot be used; the message names the file and the key."""


class RunError(CoordinatorError, RuntimeError):
    """The run cannot start or go on (bad plan, unusable federation); the message says why."""


class RoundFailed(CoordinatorError, RuntimeError):
    """Too few sites delivered an update for a round to count."""


class AggregationError(CoordinatorError, ValueError):
    """Updates that cannot be combined; the message names the site and tensor."""


class AgentError(CoordinatorError, RuntimeError):
    """A request to one agent failed; the message names the site."""

    def __init__(self, site: str, message: str, *, status_code: int | None = None) -> None:
        super().__init__(f"{site}: {message}")
        self.site = site
        self.status_code = status_code


class AgentAuthError(AgentError):
    """The agent refused the coordinator's credentials: its token (401), or its token's role or
    client certificate (403)."""


class AgentPlanRefused(AgentError):
    """The site's approval policy is manual and it has not approved the plan (403 naming the
    plan's hash); only the site's admin can change that, so it is never retried."""

    def __init__(self, site: str, message: str, *, plan_hash: str, status_code: int | None = 403) -> None:
        super().__init__(site, message, status_code=status_code)
        self.plan_hash = plan_hash


class AgentTlsError(AgentError):
    """The agent's certificate cannot be trusted for its URL (a name it does not carry, another
    CA, expired); a configuration problem on one side, so it is never retried."""


class AgentUnreachable(AgentError):
    """No answer after all retries (connection refused, timeouts, a connection closed before
    an answer, or 5xx)."""


class UpdateIntegrityError(AgentError):
    """A downloaded update whose hash does not match what the agent declared."""


class JobFailed(AgentError):
    """A round or evaluation ended in a state other than completed."""


class JobTimeout(AgentError):
    """A round or evaluation did not finish within its time budget."""


class LocalAgentError(CoordinatorError, RuntimeError):
    """A local agent did not start (or a command against its config failed); names the site."""


class DemoError(CoordinatorError, RuntimeError):
    """The demo could not run to the end; the message says which step and which site."""
