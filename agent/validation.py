"""The strict base model and the one validation-error formatter.

The agent's config, a coordinator's plan and the coordinator's federation file are all
pydantic models that refuse unknown keys: a misspelt key must fail loudly rather than be
ignored and fall back to a default. Their errors are shown to people (a site admin editing
YAML, a coordinator reading a 422), so every message names the key path in the document's
own terms (`datasets[0].root: unknown key`) in one wording, whichever document it came from.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError


class StrictModel(BaseModel):
    """A model that refuses keys it does not declare."""

    model_config = ConfigDict(extra="forbid")


def key_path(loc: tuple[int | str, ...], *, top: str = "(top level)") -> str:
    """A pydantic location as a key path: `agents[0].url`; TOP for the document itself."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or top


def format_validation_error(
    exc: ValidationError, where: str | None = None, *, top: str = "(top level)"
) -> str:
    """One line per problem, `WHERE: key.path: what is wrong` (without `WHERE: ` when None).

    Pydantic's wording is kept except where it speaks of Python rather than of the document:
    a forbidden extra key is an "unknown key", a missing field a "required key is missing",
    and the "Value error, " prefix of a validator's message is dropped.
    """
    lines = []
    for err in exc.errors():
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        path = key_path(tuple(err["loc"]), top=top)
        lines.append(f"{where}: {path}: {msg}" if where else f"{path}: {msg}")
    return "\n".join(lines)
