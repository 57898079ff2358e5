"""Codec checks that a mutation run showed could be deleted with every other test still passing.

Each test here names the refusal it expects by its own message: without the check, the same
input is either accepted, refused by a later check with another message, or escapes as a bare
`ValueError`/`TypeError`/`IndexError`, so a loose pattern would let the check go unnoticed.
"""

from __future__ import annotations

import gzip
import json
import pickle
import struct
import sys
from typing import Any

import pytest
import torch
from safetensors.torch import save as st_save

from agent.errors import WeightError
from agent.exchange.codec import (
    MAX_HEADER_BYTES,
    check_names_and_shapes,
    decode_weights,
    encode_weights,
    parse_header,
)

LIMIT = 1 << 20
F32_ONE = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}


def _with_header(header: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"w": torch.randn(3, 2, generator=g), "b": torch.randn(3, generator=g)}


def test_a_well_formed_single_tensor_header_is_returned() -> None:
    header = parse_header(_with_header({"w": F32_ONE}, b"\0" * 4), max_bytes=LIMIT)
    assert header == {"w": F32_ONE}


@pytest.mark.parametrize(
    "offsets",
    [
        pytest.param("0,4", id="not-a-list"),
        pytest.param({"begin": 0, "end": 4}, id="an-object"),
        pytest.param(None, id="missing"),
        pytest.param([4], id="one-value"),
        pytest.param([0, 4, 8], id="three-values"),
        pytest.param([0, 4.0], id="a-float"),
        pytest.param(["0", 4], id="a-string"),
        pytest.param([-4, 0], id="negative"),
        pytest.param([4, 0], id="reversed"),
        pytest.param([False, 4], id="a-boolean"),
    ],
)
def test_malformed_data_offsets_are_named(offsets: Any) -> None:
    entry = {"dtype": "F32", "shape": [1], "data_offsets": offsets}
    with pytest.raises(WeightError, match=r"^tensor 'w': malformed data offsets"):
        parse_header(_with_header({"w": entry}, b"\0" * 4), max_bytes=LIMIT)


def test_a_boolean_dimension_is_a_malformed_shape() -> None:
    entry = {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}
    with pytest.raises(WeightError, match=r"^tensor 'w': malformed shape \[True\]"):
        parse_header(_with_header({"w": entry}, b"\0" * 4), max_bytes=LIMIT)


def test_reversed_offsets_of_an_empty_tensor_are_malformed_not_a_size_mismatch() -> None:
    entry = {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}
    with pytest.raises(WeightError, match=r"^tensor 'w': malformed data offsets \[4, 0\]"):
        parse_header(_with_header({"w": entry}, b"\0" * 4), max_bytes=LIMIT)


@pytest.mark.parametrize("entry", [[0, 4], "F32", 7, None], ids=["list", "string", "number", "null"])
def test_a_header_entry_that_is_not_an_object_is_named(entry: Any) -> None:
    with pytest.raises(WeightError, match=r"^tensor 'w': malformed header entry$"):
        parse_header(_with_header({"w": entry}, b"\0" * 4), max_bytes=LIMIT)


@pytest.mark.parametrize(
    "meta",
    [{"format": 1}, {"format": None}, {"a": "b", "c": ["d"]}, "pt", ["format", "pt"], 3],
    ids=["int-value", "null-value", "list-value", "string", "list", "number"],
)
def test_metadata_that_is_not_strings_to_strings_is_refused(meta: Any) -> None:
    with pytest.raises(WeightError, match=r"^safetensors __metadata__ must map strings to strings$"):
        parse_header(_with_header({"__metadata__": meta, "w": F32_ONE}, b"\0" * 4), max_bytes=LIMIT)


@pytest.mark.parametrize("meta", [None, {}, {"format": "pt", "note": "x"}], ids=["null", "empty", "strings"])
def test_metadata_of_strings_or_null_is_accepted_and_not_a_tensor(meta: Any) -> None:
    header = parse_header(_with_header({"__metadata__": meta, "w": F32_ONE}, b"\0" * 4), max_bytes=LIMIT)
    assert header == {"w": F32_ONE}


def test_a_header_without_metadata_is_accepted() -> None:
    data = st_save(_state())
    assert b"__metadata__" not in data
    assert set(decode_weights(data, expected=None, max_bytes=LIMIT)) == {"w", "b"}


def test_an_error_of_the_safetensors_library_becomes_a_weight_error() -> None:
    # A dimension of 2**70 next to a zero one needs no bytes, so our header check passes it;
    # safetensors (dimensions are usize) refuses it. The caller must still see a WeightError.
    entry = {"dtype": "F32", "shape": [1, 2**70, 0], "data_offsets": [0, 0]}
    data = _with_header({"w": entry}, b"")
    assert parse_header(data, max_bytes=LIMIT) == {"w": entry}
    with pytest.raises(WeightError, match=r"^safetensors payload could not be decoded: "):
        decode_weights(data, expected=None, max_bytes=LIMIT)


def test_gzip_compressed_safetensors_are_named() -> None:
    data = gzip.compress(encode_weights(_state()))
    with pytest.raises(WeightError, match=r"^payload is gzip-compressed, not safetensors; refused$"):
        decode_weights(data, expected=None, max_bytes=LIMIT)


def test_a_payload_exactly_at_the_size_limit_is_accepted_one_byte_more_is_not() -> None:
    data = encode_weights(_state())
    assert set(decode_weights(data, expected=None, max_bytes=len(data))) == {"w", "b"}
    with pytest.raises(
        WeightError, match=rf"^payload is {len(data)} bytes, over the limit of {len(data) - 1} "
    ):
        decode_weights(data, expected=None, max_bytes=len(data) - 1)


def test_a_header_length_exactly_at_the_limit_is_plausible_one_more_is_not() -> None:
    # The claim alone decides: at the limit the payload is merely truncated, past it implausible.
    at_limit = struct.pack("<Q", MAX_HEADER_BYTES) + b"{}"
    with pytest.raises(WeightError, match=rf"^payload is truncated: header claims {MAX_HEADER_BYTES} bytes"):
        parse_header(at_limit, max_bytes=LIMIT)
    over = struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}"
    with pytest.raises(WeightError, match=rf"header length {MAX_HEADER_BYTES + 1} is implausible$"):
        parse_header(over, max_bytes=LIMIT)


def test_a_header_that_fills_the_payload_exactly_is_not_truncated() -> None:
    raw = json.dumps({"w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}).encode()
    exact = struct.pack("<Q", len(raw)) + raw
    assert parse_header(exact, max_bytes=LIMIT)["w"]["shape"] == [0]
    with pytest.raises(WeightError, match=rf"^payload is truncated: header claims {len(raw) + 1} bytes"):
        parse_header(struct.pack("<Q", len(raw) + 1) + raw, max_bytes=LIMIT)


def test_an_eight_byte_payload_is_a_header_length_without_a_header_not_truncated() -> None:
    with pytest.raises(WeightError, match=r"^not a safetensors file: the header is not a JSON object$"):
        parse_header(b"\0" * 8, max_bytes=LIMIT)
    with pytest.raises(WeightError, match=r"^payload is truncated: 7 bytes"):
        parse_header(b"\0" * 7, max_bytes=LIMIT)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_encode_names_non_finite_values_not_an_overflow(bad: float) -> None:
    # Without the check on the input, the same tensor is refused after conversion as an
    # "overflow of the transfer dtype", which misleads; the message must say what it is.
    state = _state()
    state["w"][1, 1] = bad
    for dtype in ("float32", "float16"):
        with pytest.raises(WeightError, match=r"^tensor 'w': contains NaN or Inf values$"):
            encode_weights(state, dtype)


def test_encode_refuses_what_is_not_a_float_tensor() -> None:
    with pytest.raises(WeightError, match=r"^tensor 'w': not a tensor but list$"):
        encode_weights({"w": [1.0, 2.0]})  # type: ignore[dict-item]
    with pytest.raises(WeightError, match=r"^tensor 'w': dtype torch.int64 is not a floating-point type$"):
        encode_weights({"w": torch.arange(3)})
    with pytest.raises(
        WeightError, match=r"^transfer dtype 'bfloat16' is not one of \['float16', 'float32'\]$"
    ):
        encode_weights(_state(), "bfloat16")
    with pytest.raises(WeightError, match=r"^no tensors to encode$"):
        encode_weights({})


@pytest.mark.parametrize(
    ("count", "listed"),
    [
        (1, "'t0'"),
        (2, "'t0', 't1'"),
        (5, "'t0', 't1', 't2', 't3', 't4'"),
        (6, "'t0', 't1', 't2', 't3', 't4' and 1 more"),
        (8, "'t0', 't1', 't2', 't3', 't4' and 3 more"),
    ],
)
def test_missing_and_unknown_names_are_listed_five_at_most(count: int, listed: str) -> None:
    names = {f"t{i}": (1,) for i in range(count)}
    with pytest.raises(WeightError) as err:
        check_names_and_shapes({}, names)
    assert str(err.value) == f"missing tensors: {listed}"
    with pytest.raises(WeightError) as err:
        check_names_and_shapes(names, {})
    assert str(err.value) == f"unknown tensors not in the plan's model: {listed}"


def test_encoded_files_say_they_hold_torch_tensors() -> None:
    # {"format": "pt"} is what safetensors' own torch writer records; other tools read it.
    header = json.loads(encode_weights(_state())[8:].split(b"}}", 1)[0] + b"}}")
    assert header["__metadata__"] == {"format": "pt"}


@pytest.mark.parametrize(
    "data",
    [
        pickle.dumps({"w": 1.0}, protocol=0),  # (dp0
        pickle.dumps({"w": 1.0}, protocol=1),  # }q
        pickle.dumps([1.0], protocol=0),  # (lp0
        pickle.dumps({"w": 1.0}, protocol=2),  # \x80
    ],
    ids=["dict-protocol-0", "dict-protocol-1", "list-protocol-0", "protocol-2"],
)
def test_each_pickle_signature_is_named(data: bytes) -> None:
    with pytest.raises(WeightError) as err:
        parse_header(data, max_bytes=LIMIT)
    assert str(err.value) == "payload is a Python pickle (torch.save / pickle), not safetensors; refused"


def test_a_zip_archive_is_named() -> None:
    with pytest.raises(WeightError) as err:
        parse_header(b"PK\x03\x04" + b"\0" * 40, max_bytes=LIMIT)
    assert str(err.value) == "payload is a zip archive (torch.save format), not safetensors; refused"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "payload is empty"),
        (b"\x01", "payload is truncated: 1 bytes, shorter than the 8-byte safetensors header"),
        (struct.pack("<Q", 30) + b"{}", "payload is truncated: header claims 30 bytes but only 2 follow"),
        (struct.pack("<Q", 2) + b"[]", "not a safetensors file: the header is not a JSON object"),
        (struct.pack("<Q", 4) + b' "{"', "not a safetensors file: the header is not a JSON object"),
        (
            struct.pack("<Q", 14) + b'{"__metadata__":{}}'[:14],
            "not a safetensors file: header is not valid JSON",
        ),
        (struct.pack("<Q", 2) + b"{}", "payload holds no tensors"),
    ],
    ids=["empty", "one-byte", "short-header", "array", "string", "cut-json", "no-tensors"],
)
def test_framing_refusals_say_exactly_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(WeightError) as err:
        parse_header(data, max_bytes=LIMIT)
    assert str(err.value).startswith(message)


def test_a_payload_that_is_not_bytes_is_named() -> None:
    with pytest.raises(WeightError) as err:
        parse_header("not bytes", max_bytes=LIMIT)  # type: ignore[arg-type]
    assert str(err.value) == "payload must be bytes, got str"


def test_a_header_with_leading_whitespace_is_accepted() -> None:
    raw = b"  " + json.dumps({"w": F32_ONE}).encode()
    assert parse_header(struct.pack("<Q", len(raw)) + raw + b"\0" * 4, max_bytes=LIMIT) == {"w": F32_ONE}


def test_size_refusals_count_the_bytes() -> None:
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [4, 20]}
    with pytest.raises(WeightError) as err:
        parse_header(_with_header({"w": entry}, b"\0" * 20), max_bytes=LIMIT)
    assert str(err.value) == "tensor 'w': 16 data bytes for shape [1] F32 (needs 4)"
    with pytest.raises(WeightError) as err:
        parse_header(_with_header({"w": F32_ONE}, b"\0" * 10), max_bytes=LIMIT)
    assert str(err.value) == "payload has 6 unexpected trailing bytes after the tensors"


def test_an_integer_past_the_int_string_limit_is_named_by_the_limit() -> None:
    raw = b'{"w": {"dtype": "F32", "shape": [' + b"1" * (sys.get_int_max_str_digits() + 1) + b"]}}"
    with pytest.raises(WeightError) as err:
        parse_header(struct.pack("<Q", len(raw)) + raw, max_bytes=LIMIT)
    assert str(err.value) == (
        "not a safetensors file: header is not valid JSON "
        f"(a number has more than {sys.get_int_max_str_digits()} digits)"
    )
