"""Wire messages: hostile or broken input gets a clear error naming the field, before use."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from agent.errors import SecAggError
from agent.exchange.secagg.messages import (
    CIPHERTEXT_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_SITES,
    AdvertiseBundle,
    MaskRequest,
    ShareRequest,
    ShareResponse,
    UnmaskRequest,
    UnmaskResponse,
    vector_from_bytes,
    vector_to_bytes,
)
from agent.exchange.secagg.primitives import b64e
from agent.exchange.secagg.shamir import SHARE_BYTES


def _bundle(**changes: Any) -> dict[str, Any]:
    data = {
        "site_id": "site-1",
        "run_id": "run-1",
        "round_id": "r1",
        "c_pk": b64e(bytes(32)),
        "s_pk": b64e(b"\x01" * 32),
        "signature": b64e(b"\x02" * 64),
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def test_every_message_round_trips_through_json() -> None:
    bundle = AdvertiseBundle.from_dict(_bundle())
    ct = b"\x03" * CIPHERTEXT_BYTES
    share = b"\x00\x01" + b"\x04" * (SHARE_BYTES - 2)
    messages = [
        bundle,
        ShareRequest("run-1", "r1", (bundle,)),
        ShareResponse("site-1", "run-1", "r1", {"site-2": ct}),
        MaskRequest("run-1", "r1", ("site-1", "site-2"), {"site-2": ct}),
        UnmaskRequest("run-1", "r1", ("site-1",), ("site-2",)),
        UnmaskResponse("site-1", "run-1", "r1", {"site-1": share}, {"site-2": share}),
    ]
    for message in messages:
        assert type(message).from_json(message.to_json()) == message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "expected a JSON object, got list"),
        (_bundle(extra="x"), "unknown field"),
        (_bundle(signature=None), "missing field(s) 'signature'"),
        (_bundle(site_id="../etc"), "site_id: '../etc' is not a site id"),
        (_bundle(site_id="a|b"), "is not a site id"),
        (_bundle(site_id=7), "site_id: 7 is not a site id"),
        (_bundle(run_id=""), "run_id: '' is not an id"),
        (_bundle(round_id="x" * 129), "round_id"),
        (_bundle(c_pk="not base64!"), "c_pk: not valid base64"),
        (_bundle(c_pk=b64e(bytes(31))), "c_pk: 31 bytes, expected 32"),
        (_bundle(s_pk=b64e(bytes(33))), "s_pk: 33 bytes, expected 32"),
        (_bundle(s_pk=123), "s_pk: expected a base64 string, got int"),
        (_bundle(signature=b64e(bytes(10**6))), "signature: 1333336 characters of base64"),
    ],
)
def test_a_malformed_bundle_is_refused_naming_the_field(data: object, message: str) -> None:
    with pytest.raises(SecAggError) as info:
        AdvertiseBundle.from_dict(data)
    assert message in str(info.value)


def test_malformed_requests_and_answers_are_refused() -> None:
    with pytest.raises(SecAggError, match="bundles\\[1\\]: c_pk"):
        ShareRequest.from_dict(
            {"run_id": "run-1", "round_id": "r1", "bundles": [_bundle(), _bundle(c_pk="")]}
        )
    with pytest.raises(SecAggError, match=f"more than {MAX_SITES}"):
        ShareRequest.from_dict({"run_id": "run-1", "round_id": "r1", "bundles": [{}] * (MAX_SITES + 1)})
    with pytest.raises(SecAggError, match="survivors: site\\(s\\) listed twice: a"):
        UnmaskRequest.from_dict({"run_id": "run-1", "round_id": "r1", "survivors": ["a", "a"], "dropped": []})
    with pytest.raises(SecAggError, match="dropped: expected a list"):
        UnmaskRequest.from_dict({"run_id": "run-1", "round_id": "r1", "survivors": [], "dropped": "a"})
    with pytest.raises(SecAggError, match=f"ciphertexts\\[b\\]: 5 bytes, expected {CIPHERTEXT_BYTES}"):
        MaskRequest.from_dict(
            {
                "run_id": "run-1",
                "round_id": "r1",
                "survivors": ["a", "b"],
                "ciphertexts": {"b": b64e(b"12345")},
            }
        )
    with pytest.raises(SecAggError, match="ciphertexts key: '' is not a site id"):
        ShareResponse.from_dict(
            {"site_id": "a", "run_id": "run-1", "round_id": "r1", "ciphertexts": {"": ""}}
        )
    share = b64e(b"\x00\x01" + bytes(SHARE_BYTES - 2))
    with pytest.raises(SecAggError, match="both shares for b"):
        UnmaskResponse.from_dict(
            {
                "site_id": "a",
                "run_id": "run-1",
                "round_id": "r1",
                "b_shares": {"b": share},
                "s_shares": {"b": share},
            }
        )


def test_json_text_that_is_not_a_message_is_refused() -> None:
    with pytest.raises(SecAggError, match="not valid JSON"):
        UnmaskRequest.from_json("{")
    with pytest.raises(SecAggError, match="over the limit"):
        ShareRequest.from_json(" " * (MAX_MESSAGE_BYTES + 1))
    with pytest.raises(SecAggError, match="expected a JSON object, got str"):
        MaskRequest.from_json(json.dumps("text"))


def test_masked_vectors_travel_as_uint32_little_endian() -> None:
    vector = np.array([0, 1, 0xFFFFFFFF], dtype=np.uint32)
    data = vector_to_bytes(vector)
    assert data == b"\x00\x00\x00\x00\x01\x00\x00\x00\xff\xff\xff\xff"
    assert np.array_equal(vector_from_bytes(data, 3), vector)
    with pytest.raises(SecAggError, match="expected 16"):
        vector_from_bytes(data, 4)
    with pytest.raises(SecAggError, match="1-D uint32"):
        vector_to_bytes(vector.astype(np.int64))
