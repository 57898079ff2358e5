"""A safetensors header that Python's JSON parser refuses with errors of its own
(`RecursionError` past its recursion limit, `ValueError` past the int-string limit) is a
`WeightError` like any other malformed header, not an error the API answers with 500."""

from __future__ import annotations

import pytest

from agent.errors import WeightError
from agent.exchange.codec import decode_weights, parse_header


def _framed(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "the header's JSON is nested too deeply"),
        (b'{"w": {"dtype": "F32", "shape": [' + b"1" * 5000 + b'], "data_offsets": [0, 4]}}', "digits"),
        (b'{"__metadata__": {"n": ' + b"2" * 5000 + b"}}", "digits"),
    ],
    ids=["deep", "long-int-shape", "long-int-metadata"],
)
def test_hostile_header_json_is_a_weight_error(header: bytes, message: str) -> None:
    data = _framed(header)
    for decode in (
        lambda: parse_header(data, max_bytes=1 << 21),
        lambda: decode_weights(data, expected=None, max_bytes=1 << 21),
    ):
        with pytest.raises(WeightError, match=r"^not a safetensors file") as info:
            decode()
        assert message in str(info.value)
