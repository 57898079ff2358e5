"""Error messages that leave the site: no file paths, no subject folder names.

A job's error is shown to the coordinator (GET /v1/rounds/{id}) and written to the audit
log. Library exceptions readily quote the file they failed on, and a site's folders are
often named after patients, so every message passes through a `Redactor` first.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.errors import FedsiteError
from agent.validation import format_validation_error

MAX_ERROR_CHARS = 2000

# Two or more path components, POSIX or Windows: "/data/PAT-1/flair", "C:\\scans\\x".
PATH_RE = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][^\s'\"()<>\[\]{},:;|]+){2,}")


class Redactor:
    """Removes file paths and subject names from text that may be shown to the coordinator."""

    def __init__(self, words: Iterable[str] = ()) -> None:
        # Longest first, so that "PAT-0001-b" is not left as "<subject>-b".
        self.words = sorted({w for w in words if len(w) >= 3}, key=len, reverse=True)

    @classmethod
    def for_items(cls, items: Iterable[Any], roots: Iterable[Path]) -> Redactor:
        """A redactor for the folder names between each dataset root and the items' files."""
        roots = [Path(r) for r in roots]
        words: set[str] = set()
        for item in items:
            paths = [Path(p) for p in getattr(item, "images", {}).values()]
            if getattr(item, "label", None) is not None:
                paths.append(Path(item.label))
            for path in paths:
                for root in roots:
                    with contextlib.suppress(ValueError):
                        words.update(path.relative_to(root).parts[:-1])
        return cls(words)

    def __call__(self, text: str) -> str:
        out = PATH_RE.sub("<path>", text)
        for word in self.words:
            out = out.replace(word, "<subject>")
        if len(out) > MAX_ERROR_CHARS:
            out = out[: MAX_ERROR_CHARS - 3] + "..."
        return out


def one_line(text: str) -> str:
    """TEXT's non-blank lines, stripped and joined with "; ": an error is one line in a status
    answer, a table cell or a log line, whatever the library that wrote it."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def public_error(exc: BaseException, redact: Callable[[str], str]) -> str:
    """The exception as one line, redacted: what a job records as its error.

    Our own errors (`FedsiteError`) are written for the reader and are shown as they are; a
    pydantic validation error is shown as key paths and problems, without pydantic's
    Python-side wording and links; any other error is "Type: message", its lines joined.
    """
    if isinstance(exc, ValidationError):
        problems = one_line(format_validation_error(exc))
        return redact(f"invalid {exc.title}: {problems}")
    message = one_line(str(exc)) or "no message"
    return redact(message if isinstance(exc, FedsiteError) else f"{type(exc).__name__}: {message}")
