"""Every exception fedsite raises, under one root: `FedsiteError`.

Why one module: a caller catches by area (``except DatasetError``) or everything of ours
(``except FedsiteError``) without knowing which module raised it, and the whole hierarchy is
read in one place. Each class keeps the builtin base it has always had (``ValueError`` for
input that cannot be used, ``RuntimeError`` for an operation that failed, ``PermissionError``)
as a second base, so that code catching the builtin keeps working. No class shares its name
with another of ours or with one of a dependency (SQLAlchemy's ``DatabaseError`` and
``DataError``, say), so that a name in an ``except`` clause says whose error it is.

The hierarchy (builtin second bases in brackets). The coordinator's branch is defined in
`coordinator.errors`, which imports this module; this module imports nothing of the project,
so that every layer, `agent.db` included, may raise from it::

    FedsiteError
    ├── ConfigError [ValueError]
    ├── DatabaseOpenError [RuntimeError]
    ├── TlsError [ValueError]
    ├── DatasetError
    │   ├── VolumeError [ValueError]
    │   ├── DicomError [ValueError]
    │   ├── CatalogError [ValueError]
    │   │   └── UnknownDataset
    │   ├── DataLoadError [RuntimeError]
    │   └── SyntheticDataError [ValueError]
    ├── TrainingError
    │   ├── PlanError [ValueError]
    │   ├── ModelError [ValueError]
    │   ├── EngineError [RuntimeError]
    │   │   └── CheckpointError
    │   └── TrainingCancelled
    ├── ExchangeError
    │   ├── WeightError [ValueError]
    │   ├── EgressError [RuntimeError]
    │   └── SecAggError [ValueError]
    │       └── SecAggRefused
    ├── AuditError [ValueError]
    ├── AccessError
    │   ├── TokenError [ValueError]
    │   ├── TokenExpired [PermissionError]
    │   ├── ApprovalError [ValueError]
    │   ├── PlanNotApproved [PermissionError]
    │   └── AdminUserError [ValueError]
    ├── ConsoleError
    │   ├── LoginRequired [PermissionError]
    │   ├── CsrfRefused [PermissionError]
    │   └── PreviewError [ValueError]
    ├── JobError
    │   └── JobInputError
    ├── ServiceError
    │   ├── InvalidRequest
    │   ├── TooLarge
    │   │   └── BodyTooLarge
    │   ├── PlanRefused
    │   ├── NotFound
    │   ├── Conflict
    │   └── JobQueueFull
    └── CoordinatorError
        ├── FederationError [ValueError]
        ├── RunError [RuntimeError]
        ├── RoundFailed [RuntimeError]
        ├── AggregationError [ValueError]
        ├── AgentError [RuntimeError]
        │   ├── AgentAuthError
        │   ├── AgentPlanRefused
        │   ├── AgentTlsError
        │   ├── AgentUnreachable
        │   ├── UpdateIntegrityError
        │   ├── JobFailed
        │   └── JobTimeout
        ├── LocalAgentError [RuntimeError]
        └── DemoError [RuntimeError]

The API answers a `ServiceError` with the HTTP status that `agent.api.app.SERVICE_ERROR_CODES`
maps its class to. Three private control-flow exceptions derive from `FedsiteError` directly
and never leave their module: `agent.data.dicom._Skip` and `_Fallback`, and
`agent.data.catalog._SubjectSkipped`. `tests/test_errors.py` checks this tree against the
classes themselves, so it cannot go stale.
"""

from __future__ import annotations

import re
from datetime import datetime


class FedsiteError(Exception):
    """The root of every exception fedsite raises; the message says what went wrong."""


# --------------------------------------------------------------------------- foundations


class ConfigError(FedsiteError, ValueError):
    """A configuration that cannot be used; the message names the file and the key."""


class DatabaseOpenError(FedsiteError, RuntimeError):
    """The database cannot be opened or migrated; the message names it (password hidden)."""


class TlsError(FedsiteError, ValueError):
    """TLS material that cannot be used; the message names the file or the config key."""


# --------------------------------------------------------------------------- data


class DatasetError(FedsiteError):
    """Local data that cannot be read, scanned, loaded or generated (`agent.data`)."""


class VolumeError(DatasetError, ValueError):
    """A file cannot be read as a 3D volume; the message names the file and the problem."""


class DicomError(DatasetError, ValueError):
    """A folder does not hold what the caller asked for; the message names the folder or file."""


class CatalogError(DatasetError, ValueError):
    """The catalog cannot do what was asked; the message names the dataset or pattern."""


class UnknownDataset(CatalogError):
    """The dataset is not in the catalog (not configured, or never scanned)."""


class DataLoadError(DatasetError, RuntimeError):
    """An item cannot be loaded; the message names the subject key and what failed."""


class SyntheticDataError(DatasetError, ValueError):
    """Arguments that cannot produce a data set; the message names the argument."""


# --------------------------------------------------------------------------- training


class TrainingError(FedsiteError):
    """A plan, a model or a local run that cannot go ahead as asked (`agent.training`)."""


class PlanError(TrainingError, ValueError):
    """A plan that cannot run; one line per problem, each naming the key."""


class ModelError(TrainingError, ValueError):
    """A model name or model arguments that the registry refuses; the message names them."""


class EngineError(TrainingError, RuntimeError):
    """A round or evaluation that cannot run as asked; the message says why."""


class CheckpointError(EngineError):
    """A round's checkpoint that cannot be resumed from: cut short, unreadable, not ours."""


class TrainingCancelled(TrainingError):
    """Raised between steps when ``ctx.should_stop()`` turns true."""


# --------------------------------------------------------------------------- exchange


class ExchangeError(FedsiteError):
    """Weights that cannot cross the site's boundary, in either direction (`agent.exchange`)."""


class WeightError(ExchangeError, ValueError):
    """Weights that cannot be used; the message names the tensor or the problem."""


class EgressError(ExchangeError, RuntimeError):
    """An update that must not leave, or a released file that no longer matches its record."""


class SecAggError(ExchangeError, ValueError):
    """A secure-aggregation message or step that cannot be used (malformed field, bad key,
    shares that do not reconstruct); the message names the field or the step."""


class SecAggRefused(SecAggError):
    """The site refuses a secure-aggregation step, on purpose, to protect its update.

    ``reason`` is a short stable code (``bad_signature``, ``below_threshold``,
    ``second_unmask``, ...) that the audit log and the coordinator's report carry; the text says
    what was wrong in words. The protocol's codes and their meanings are
    `agent.exchange.secagg.client.REASONS`; the agent's checks around it (`agent.jobs.secure_round`:
    ``not_configured``, ``weight_above_maximum``, ``other_session``, ``no_update``) add their own.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"secure aggregation refused ({reason}): {message}")
        self.reason = reason
        self.detail = message


# --------------------------------------------------------------------------- audit and access


class AuditError(FedsiteError, ValueError):
    """An event that cannot be recorded (bad action, actor or details); the message names it."""


class AccessError(FedsiteError):
    """Who may do what: API tokens and plan approvals (`agent.access`)."""


class TokenError(AccessError, ValueError):
    """A token operation that cannot be done (bad name or role, duplicate, unknown); names it."""


class TokenExpired(AccessError, PermissionError):
    """A presented token is valid but past its expiry: refused like an unknown one, but said so.

    Raised by authentication instead of answering "no such token", so that the refusal can
    name the token in the audit log and tell its holder to ask for a new one, and so that a
    caller that forgets the case refuses the request rather than admitting it.
    """

    def __init__(self, name: str, expires_at: datetime) -> None:
        self.name = name
        self.expires_at = expires_at
        super().__init__(f"token {name!r} expired at {expires_at.isoformat()}")


class ApprovalError(AccessError, ValueError):
    """An approval operation that cannot be done; the message names the plan hash or value."""


class PlanNotApproved(AccessError, PermissionError):
    """The site's policy is `manual` and this plan hash has no valid approval.

    Its text is the API's 403 answer; the coordinator reads the hash back from it with
    `hash_in`, so the wording and its reader stay together here."""

    _HASH_IN_TEXT = re.compile(r"\bplan ([0-9a-f]{64}) is not approved\b")

    def __init__(self, plan_hash: str) -> None:
        self.plan_hash = plan_hash
        super().__init__(
            f"plan {plan_hash} is not approved at this site (approval policy: manual); "
            f"a site admin can approve it with `fedsite plans approve {plan_hash} --by NAME`"
        )

    @classmethod
    def hash_in(cls, text: str) -> str | None:
        """The plan hash in an answer written from this exception, or None for any other text."""
        found = cls._HASH_IN_TEXT.search(text)
        return found.group(1) if found else None


class AdminUserError(AccessError, ValueError):
    """An admin-console account that cannot be made or used: a bad name or password, an unknown user."""


# --------------------------------------------------------------------------- console


class ConsoleError(FedsiteError):
    """The site admin's web console (`agent.console`): its sessions, forms and previews."""


class LoginRequired(ConsoleError, PermissionError):
    """No valid session: the console answers with a redirect to its login page."""


class CsrfRefused(ConsoleError, PermissionError):
    """A form without its CSRF token (or with another one): 403, and nothing changed."""


class PreviewError(ConsoleError, ValueError):
    """A preview that cannot be rendered; the message names no path."""


# --------------------------------------------------------------------------- jobs


class JobError(FedsiteError):
    """A round or evaluation job that cannot run (`agent.jobs`)."""


class JobInputError(JobError):
    """The job cannot run as asked (no subjects, weights no longer valid, ...)."""


# --------------------------------------------------------------------------- service and API


class ServiceError(FedsiteError):
    """A request the site refuses; `str(exc)` says why and names the input."""


class InvalidRequest(ServiceError):
    """The plan or the weights are malformed or do not fit the site (HTTP 422)."""


class TooLarge(ServiceError):
    """An input exceeds a configured size limit (HTTP 413)."""


class BodyTooLarge(TooLarge):
    """A request body over ``api.max_body_bytes``, counted by the API's body limit as it
    streams in (a chunked upload, or a Content-Length that lies) (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds api.max_body_bytes ({limit} bytes)")
        self.limit = limit


class PlanRefused(ServiceError):
    """Manual approval policy and this plan hash is not approved (HTTP 403).

    The service's answer to `PlanNotApproved`, which the approval check raises."""

    def __init__(self, plan_hash: str, message: str) -> None:
        super().__init__(message)
        self.plan_hash = plan_hash


class NotFound(ServiceError):
    """No round or evaluation with that id (HTTP 404)."""


class Conflict(ServiceError):
    """The request clashes with the job's state or an existing id (HTTP 409)."""


class JobQueueFull(ServiceError):
    """The job queue is at api.queue_size (HTTP 429)."""
