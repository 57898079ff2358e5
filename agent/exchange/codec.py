"""Model weights on the wire: safetensors only, checked before a single tensor is allocated.

Received bytes come from outside the site, so nothing here ever unpickles or calls
``torch.load``. The safetensors header (8-byte little-endian length, then JSON) is parsed
by hand first: payload size, file type, dtypes, names, shapes and byte ranges are all
checked against what the plan's model expects before ``safetensors`` decodes the data.
Only float32, float16 and bfloat16 travel; everything decodes to float32.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save as st_save_numpy
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from agent.errors import WeightError

# safetensors' own cap on the JSON header; a larger claim is a corrupt or hostile file.
MAX_HEADER_BYTES = 100 * 1024 * 1024
_WIRE_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}
_TRANSFER_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_LIST_LIMIT = 5


def _names(names: list[str] | set[str]) -> str:
    ordered = sorted(names)
    shown = ", ".join(repr(n) for n in ordered[:_LIST_LIMIT])
    more = len(ordered) - _LIST_LIMIT
    return shown + (f" and {more} more" if more > 0 else "")


def encode_weights(state: Mapping[str, torch.Tensor], dtype: str = "float32") -> bytes:
    """Serialise a state dict to safetensors bytes in the transfer dtype (float32 or float16)."""
    if dtype not in _TRANSFER_DTYPES:
        raise WeightError(f"transfer dtype {dtype!r} is not one of {sorted(_TRANSFER_DTYPES)}")
    if not state:
        raise WeightError("no tensors to encode")
    target = _TRANSFER_DTYPES[dtype]
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise WeightError(f"tensor {name!r}: not a tensor but {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise WeightError(f"tensor {name!r}: dtype {tensor.dtype} is not a floating-point type")
        if not bool(torch.isfinite(tensor).all()):
            raise WeightError(f"tensor {name!r}: contains NaN or Inf values")
        converted = tensor.detach().to(device="cpu", dtype=target).contiguous()
        if not bool(torch.isfinite(converted).all()):
            raise WeightError(f"tensor {name!r}: values overflow the transfer dtype {dtype}")
        out[name] = converted
    return st_save(out, metadata={"format": "pt"})


def _sniff(data: bytes) -> None:
    """Name the file types that people (or attackers) most often send instead of safetensors."""
    if data[:4] == b"PK\x03\x04":
        raise WeightError("payload is a zip archive (torch.save format), not safetensors; refused")
    if data[:1] == b"\x80" or data[:2] in (b"(d", b"}q", b"(l"):
        raise WeightError("payload is a Python pickle (torch.save / pickle), not safetensors; refused")
    if data[:2] == b"\x1f\x8b":
        raise WeightError("payload is gzip-compressed, not safetensors; refused")


def parse_header(
    data: bytes, *, max_bytes: int, dtypes: Mapping[str, int] = _WIRE_DTYPES
) -> dict[str, dict[str, Any]]:
    """Validate the safetensors framing and return {name: {"dtype", "shape", "data_offsets"}}.

    DTYPES maps the allowed safetensors dtypes to their sizes: model weights by default, the
    one unsigned integer type of a masked update for `decode_masked`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WeightError(f"payload must be bytes, got {type(data).__name__}")
    size = len(data)
    if size > max_bytes:
        raise WeightError(f"payload is {size} bytes, over the limit of {max_bytes} bytes")
    if size == 0:
        raise WeightError("payload is empty")
    _sniff(bytes(data[:4]))
    if size < 8:
        raise WeightError(f"payload is truncated: {size} bytes, shorter than the 8-byte safetensors header")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > MAX_HEADER_BYTES:
        raise WeightError(f"not a safetensors file: header length {header_len} is implausible")
    if 8 + header_len > size:
        raise WeightError(
            f"payload is truncated: header claims {header_len} bytes but only {size - 8} follow"
        )
    raw = bytes(data[8 : 8 + header_len])
    if not raw.lstrip().startswith(b"{"):
        raise WeightError("not a safetensors file: the header is not a JSON object")
    header = _load_header_json(raw)
    if not isinstance(header, dict):
        raise WeightError("not a safetensors file: the header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise WeightError("safetensors __metadata__ must map strings to strings")
    if not header:
        raise WeightError("payload holds no tensors")
    body = size - 8 - header_len
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        _check_entry(name, info, dtypes)
        begin, end = info["data_offsets"]
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise WeightError(f"tensor {name!r}: data offsets overlap or leave a gap (corrupt file)")
        position = end
    if position > body:
        raise WeightError(f"payload is truncated: tensors need {position} data bytes, only {body} present")
    if position < body:
        raise WeightError(f"payload has {body - position} unexpected trailing bytes after the tensors")
    return header


def _load_header_json(raw: bytes) -> Any:
    """The header's JSON; each way it can be unusable becomes a WeightError that says which.

    Besides malformed text, Python's parser raises two errors of its own on hostile input: a
    `RecursionError` for deep nesting and a `ValueError` for an integer longer than the
    interpreter's int-string limit. Uncaught, either was a 500 with a traceback hundreds of
    lines long; both are the sender's mistake. (A valid header nests three levels deep.)
    """
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightError(f"not a safetensors file: header is not valid JSON ({exc})") from None
    except RecursionError:
        raise WeightError("not a safetensors file: the header's JSON is nested too deeply") from None
    except ValueError as exc:  # the int-string limit; no other ValueError is known to arise
        why = f"a number has more than {sys.get_int_max_str_digits()} digits" if "digits" in str(exc) else exc
        raise WeightError(f"not a safetensors file: header is not valid JSON ({why})") from None


def _count(value: Any) -> bool:
    """A JSON whole number >= 0; `true`/`false` are not, though Python counts bool as int."""
    return type(value) is int and value >= 0


def _check_entry(name: str, info: Any, dtypes: Mapping[str, int] = _WIRE_DTYPES) -> None:
    if not isinstance(info, dict):
        raise WeightError(f"tensor {name!r}: malformed header entry")
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if dtype not in dtypes:
        raise WeightError(
            f"tensor {name!r}: dtype {dtype!r} is not allowed on the wire (only {', '.join(dtypes)})"
        )
    if not (isinstance(shape, list) and all(_count(d) for d in shape)):
        raise WeightError(f"tensor {name!r}: malformed shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_count(o) for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise WeightError(f"tensor {name!r}: malformed data offsets {offsets!r}")
    need = math.prod(shape) * dtypes[str(dtype)]
    if offsets[1] - offsets[0] != need:
        raise WeightError(
            f"tensor {name!r}: {offsets[1] - offsets[0]} data bytes for shape {shape} {dtype} (needs {need})"
        )


def check_names_and_shapes(
    found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
) -> None:
    """Exactly the expected names, each with the expected shape; otherwise say which differ."""
    missing = set(expected) - set(found)
    if missing:
        raise WeightError(f"missing tensors: {_names(missing)}")
    unknown = set(found) - set(expected)
    if unknown:
        raise WeightError(f"unknown tensors not in the plan's model: {_names(unknown)}")
    for name in sorted(expected):
        if tuple(found[name]) != tuple(expected[name]):
            raise WeightError(
                f"tensor {name!r}: shape {list(found[name])} does not match "
                f"the model's {list(expected[name])}"
            )


def check_finite(state: Mapping[str, torch.Tensor]) -> None:
    for name, tensor in state.items():
        if not bool(torch.isfinite(tensor).all()):
            raise WeightError(f"tensor {name!r}: contains NaN or Inf values")


def decode_weights(
    data: bytes, *, expected: Mapping[str, tuple[int, ...]] | None, max_bytes: int
) -> dict[str, torch.Tensor]:
    """Decode received safetensors bytes to float32 tensors, refusing anything unexpected.

    ``expected`` maps the plan's model tensor names to shapes; None skips the name and shape
    check (for callers that check later, such as a tool that only inspects a file).
    """
    header = parse_header(data, max_bytes=max_bytes)
    if expected is not None:
        check_names_and_shapes({n: tuple(i["shape"]) for n, i in header.items()}, expected)
    try:
        tensors = st_load(bytes(data))
    except Exception as exc:  # the header passed, so this is corruption inside the library's checks
        raise WeightError(f"safetensors payload could not be decoded: {exc}") from None
    out = {name: t.to(torch.float32) for name, t in tensors.items()}
    check_finite(out)
    return out


# A masked update (secure aggregation): one little-endian uint32 vector, the site's quantised
# and masked update, meaningless on its own; only the sum over the sites can be unmasked.
MASKED_TENSOR = "masked"
_MASKED_DTYPES = {"U32": 4}


def encode_masked(values: np.ndarray) -> bytes:
    """A masked update as safetensors bytes: the one uint32 tensor `masked`, 1-D."""
    if values.dtype != np.uint32 or values.ndim != 1 or values.size == 0:
        raise WeightError(
            f"a masked update is a non-empty 1-D uint32 vector, got {values.dtype} {values.shape}"
        )
    return st_save_numpy(
        {MASKED_TENSOR: np.ascontiguousarray(values, dtype="<u4")}, metadata={"format": "np"}
    )


def decode_masked(data: bytes, *, length: int, max_bytes: int) -> np.ndarray:
    """A received masked update: exactly one uint32 tensor `masked` of LENGTH elements."""
    header = parse_header(data, max_bytes=max_bytes, dtypes=_MASKED_DTYPES)
    if set(header) != {MASKED_TENSOR}:
        raise WeightError(
            f"a masked update holds exactly the tensor {MASKED_TENSOR!r}, got {_names(set(header))}"
        )
    shape = header[MASKED_TENSOR]["shape"]
    if shape != [length]:
        raise WeightError(f"masked update has shape {shape}, expected [{length}] (the plan's model size)")
    begin = 8 + int.from_bytes(data[:8], "little")
    return np.frombuffer(bytes(data[begin:]), dtype="<u4").astype(np.uint32)
