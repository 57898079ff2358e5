"""Where a round keeps its checkpoint, and a check of one that needs neither torch nor numpy.

The engine (`agent.training.engine`) writes ``<job dir>/checkpoint.safetensors`` after
every epoch: model, optimizer state, the epoch and the round's bookkeeping. The API process
decides at start whether an interrupted round can resume from it (`agent.jobs.recovery`)
and must stay light, so the check here reads the safetensors layout with the standard
library: an 8-byte little-endian header length, a JSON header whose entries give each
tensor's byte range, then the tensor bytes. A file cut short by a crash mid-write (the
engine writes atomically, but a disk can still fail) is caught by comparing the file's
size with the end of the last range.
"""

from __future__ import annotations

import json
from pathlib import Path

from agent.errors import CheckpointError

CHECKPOINT_NAME = "checkpoint.safetensors"
# A checkpoint's header is a few hundred bytes per tensor; past this it is not ours.
_MAX_HEADER_BYTES = 64 * 1024 * 1024


def checkpoint_path(job_dir: Path | str) -> Path:
    return Path(job_dir) / CHECKPOINT_NAME


def read_checkpoint_metadata(path: Path) -> dict[str, str]:
    """The metadata of the epoch checkpoint at PATH once its layout is whole and it records its
    epoch; CheckpointError if not."""
    meta = read_state_metadata(path)
    if not str(meta.get("epoch", "")).isdigit():
        raise CheckpointError("the checkpoint does not record its epoch")
    return meta


def read_state_metadata(path: Path) -> dict[str, str]:
    """The metadata of a state file the engine wrote (a checkpoint, kept optimizer state) once
    its layout is whole; CheckpointError if not."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise CheckpointError("the checkpoint is shorter than its header")
            length = int.from_bytes(head, "little")
            if length > _MAX_HEADER_BYTES or 8 + length > size:
                raise CheckpointError("the checkpoint's header length does not fit the file")
            header = json.loads(fh.read(length))
    except OSError as exc:
        raise CheckpointError(f"the checkpoint cannot be read ({exc.strerror or exc})") from None
    except (ValueError, RecursionError):
        raise CheckpointError("the checkpoint's header is not JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError("the checkpoint's header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise CheckpointError(f"the checkpoint's entry {name!r} has no valid byte range")
        end = max(end, offsets[1])
    if 8 + length + end != size:
        raise CheckpointError(
            f"the checkpoint holds {size} bytes where its header describes {8 + length + end}"
        )
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError("the checkpoint's metadata is not a map of strings")
    return {str(k): v for k, v in meta.items()}
