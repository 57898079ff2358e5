"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Used wherever a file is read by another process or after a crash: released updates,
checkpoints, the preprocessed-data cache, audit exports, coordinator results.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Literal, overload


@overload
@contextmanager
def atomic_file(path: Path, mode: Literal["wb"] = "wb") -> Iterator[IO[bytes]]: ...
@overload
@contextmanager
def atomic_file(path: Path, mode: Literal["w"]) -> Iterator[IO[str]]: ...
@contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside PATH; on success fsync it and rename it over PATH."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as fh:
        fh.write(data)
