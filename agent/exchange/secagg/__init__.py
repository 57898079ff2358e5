"""Secure aggregation (pairwise masking with dropout recovery, Bonawitz et al. 2017): the
protocol core, shared by the agent and the coordinator like the codec (wire contract).

* `primitives`: Ed25519 site keys, X25519, HKDF-SHA256, AES-GCM, the ChaCha20 mask generator;
* `shamir`: t-of-n sharing of 32-byte secrets over GF(2^521 - 1);
* `quantize`: clip, weight, scale, modulo 2^32 and back, `error_bound`;
* `messages`: the validated wire messages;
* `client.SiteSecAgg`: the site's per-round state machine (refuses misuse, `SecAggRefused`);
* `server.CoordinatorSecAgg`: the coordinator's per-round logic (route, sum, unmask).
"""

from agent.errors import SecAggError, SecAggRefused
from agent.exchange.secagg.client import REASONS, SiteSecAgg
from agent.exchange.secagg.messages import (
    AdvertiseBundle,
    MaskRequest,
    ShareRequest,
    ShareResponse,
    UnmaskRequest,
    UnmaskResponse,
    vector_from_bytes,
    vector_to_bytes,
)
from agent.exchange.secagg.primitives import (
    generate_site_key,
    load_site_key,
    parse_public_key,
    public_key_b64,
    write_site_key,
)
from agent.exchange.secagg.quantize import (
    Decoded,
    Quantised,
    QuantParams,
    dequantize_sum,
    error_bound,
    flatten,
    quantize,
    unflatten,
)
from agent.exchange.secagg.server import CoordinatorSecAgg, RoundReport

__all__ = [
    "REASONS",
    "AdvertiseBundle",
    "CoordinatorSecAgg",
    "Decoded",
    "MaskRequest",
    "QuantParams",
    "Quantised",
    "RoundReport",
    "SecAggError",
    "SecAggRefused",
    "ShareRequest",
    "ShareResponse",
    "SiteSecAgg",
    "UnmaskRequest",
    "UnmaskResponse",
    "dequantize_sum",
    "error_bound",
    "flatten",
    "generate_site_key",
    "load_site_key",
    "parse_public_key",
    "public_key_b64",
    "quantize",
    "unflatten",
    "vector_from_bytes",
    "vector_to_bytes",
    "write_site_key",
]
