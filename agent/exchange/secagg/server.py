"""The coordinator's side of one secure-aggregation round: pure logic, no transport.

The caller (a strategy) moves messages between the sites and this object; it collects the
sites' bundles, routes the sealed shares, sums the masked inputs as they arrive and finally
reconstructs what the dropouts and survivors left in the sum. It holds the running sum only,
never one site's masked input on its own, and never anything unmasked but the total.

Sets, each frozen when the next step starts: U1 (advertised; frozen by `share_request`), U2
(shared; frozen by `mask_requests`), U3 (masked inputs received; frozen by `unmask_request`).
It verifies each bundle against the federation's pinned keys as the sites do (a site whose
bundle does not verify is left out, with the reason), so a relaying fault is caught here
first; the sites' own checks are what protects them. One survivor's wrong share (a bug, or a
site trying to spoil the round) is outvoted when there are spare answers (`bad_shares`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.errors import SecAggError
from agent.exchange.secagg import primitives as P
from agent.exchange.secagg.client import mask_seed_context
from agent.exchange.secagg.messages import (
    AdvertiseBundle,
    MaskRequest,
    ShareRequest,
    ShareResponse,
    UnmaskRequest,
    UnmaskResponse,
    check_run_id,
    check_site_id,
)
from agent.exchange.secagg.shamir import Share, combine


@dataclass
class RoundReport:
    """Who took part in which step, for the coordinator's results (ids only, no secrets)."""

    advertised: list[str] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)
    masked: list[str] = field(default_factory=list)
    unmasked: list[str] = field(default_factory=list)
    dropped_before_mask: list[str] = field(default_factory=list)
    dropped_after_mask: list[str] = field(default_factory=list)
    bad_shares: list[str] = field(default_factory=list)


class CoordinatorSecAgg:
    """One round at the coordinator. ``pinned`` maps each site to its Ed25519 public key (the
    federation file's ``secagg_public_key``); ``length`` is the quantised vector's length (the
    model's values plus the weight element)."""

    def __init__(
        self,
        *,
        run_id: str,
        round_id: str,
        threshold: int,
        pinned: Mapping[str, Ed25519PublicKey],
        length: int,
    ) -> None:
        self.run_id = check_run_id(run_id, "run_id")
        self.round_id = check_run_id(round_id, "round_id")
        if not isinstance(threshold, int) or threshold < 1:
            raise SecAggError(f"threshold must be a positive integer, got {threshold!r}")
        if not isinstance(length, int) or length < 1:
            raise SecAggError(f"vector length must be a positive integer, got {length!r}")
        self.threshold = threshold
        self.length = length
        self.pinned = {check_site_id(k, "pinned site"): v for k, v in pinned.items()}
        self._bundles: dict[str, AdvertiseBundle] = {}
        self._u1: tuple[str, ...] | None = None
        self._ciphertexts: dict[str, dict[str, bytes]] = {}  # sender -> recipient -> ciphertext
        self._u2: tuple[str, ...] | None = None
        self._sum: np.ndarray | None = None
        self._masked: set[str] = set()
        self._u3: tuple[str, ...] | None = None
        self._dropped: tuple[str, ...] = ()
        self._responses: dict[str, UnmaskResponse] = {}
        self._done = False
        # Sites whose unmask answer held a share that disagreed with all the others (left out).
        self.bad_shares: set[str] = set()

    # ------------------------------------------------------------------ sets

    @property
    def advertised(self) -> tuple[str, ...]:
        return self._u1 if self._u1 is not None else tuple(sorted(self._bundles))

    @property
    def shared(self) -> tuple[str, ...]:
        return self._u2 if self._u2 is not None else tuple(sorted(self._ciphertexts))

    @property
    def masked(self) -> tuple[str, ...]:
        return self._u3 if self._u3 is not None else tuple(sorted(self._masked))

    def report(self) -> RoundReport:
        u2 = list(self.shared)
        u3 = list(self.masked)
        return RoundReport(
            advertised=list(self.advertised),
            shared=u2,
            masked=u3,
            unmasked=sorted(self._responses),
            dropped_before_mask=sorted(set(self.advertised) - set(u3)),
            dropped_after_mask=sorted(set(u2) - set(u3)) if self._u3 is not None else [],
            bad_shares=sorted(self.bad_shares),
        )

    def _check_context(self, what: str, run_id: str, round_id: str) -> None:
        if (run_id, round_id) != (self.run_id, self.round_id):
            raise SecAggError(
                f"{what} is for run {run_id!r} round {round_id!r}, not {self.run_id!r} {self.round_id!r}"
            )

    # ------------------------------------------------------------------ step 0

    def add_advertisement(self, bundle: AdvertiseBundle) -> None:
        """Accept a site's bundle if its signature verifies under the pinned key; SecAggError otherwise."""
        if self._u1 is not None:
            raise SecAggError(f"bundle from {bundle.site_id} after the advertised set was closed")
        self._check_context(f"the bundle of {bundle.site_id}", bundle.run_id, bundle.round_id)
        pinned = self.pinned.get(bundle.site_id)
        if pinned is None:
            raise SecAggError(f"site {bundle.site_id} has no pinned secure-aggregation key in the federation")
        if not P.verify(pinned, bundle.signature, bundle.signed_bytes()):
            raise SecAggError(f"the bundle of {bundle.site_id} is not signed by its pinned key")
        if bundle.site_id in self._bundles and self._bundles[bundle.site_id] != bundle:
            raise SecAggError(f"site {bundle.site_id} advertised two different bundles")
        self._bundles[bundle.site_id] = bundle

    def share_request(self) -> ShareRequest:
        """Close U1 and return what every site of U1 is sent; SecAggError below the threshold."""
        if self._u1 is None:
            if len(self._bundles) < self.threshold:
                raise SecAggError(
                    f"{len(self._bundles)} sites advertised keys, below the threshold {self.threshold}"
                )
            self._u1 = tuple(sorted(self._bundles))
        return ShareRequest(self.run_id, self.round_id, tuple(self._bundles[s] for s in self._u1))

    # ------------------------------------------------------------------ step 1

    def add_shares(self, response: ShareResponse) -> None:
        """Keep a site's sealed shares for routing: one for every other site of U1."""
        if self._u1 is None or self._u2 is not None:
            raise SecAggError(f"shares from {response.site_id} outside the share step")
        self._check_context(f"the shares of {response.site_id}", response.run_id, response.round_id)
        if response.site_id not in self._u1:
            raise SecAggError(f"shares from {response.site_id}, which is not among the advertised sites")
        expected = set(self._u1) - {response.site_id}
        if set(response.ciphertexts) != expected:
            raise SecAggError(
                f"the shares of {response.site_id} are not addressed to exactly the other advertised sites"
            )
        self._ciphertexts[response.site_id] = dict(response.ciphertexts)

    def mask_requests(self) -> dict[str, MaskRequest]:
        """Close U2 and return {site: request} for each site of U2; SecAggError below the threshold."""
        if self._u1 is None:
            raise SecAggError("mask requests before the share step")
        if self._u2 is None:
            if len(self._ciphertexts) < self.threshold:
                raise SecAggError(
                    f"{len(self._ciphertexts)} sites shared keys, below the threshold {self.threshold}"
                )
            self._u2 = tuple(sorted(self._ciphertexts))
        return {
            u: MaskRequest(
                self.run_id,
                self.round_id,
                self._u2,
                {v: self._ciphertexts[v][u] for v in self._u2 if v != u},
            )
            for u in self._u2
        }

    # ------------------------------------------------------------------ step 2

    def add_masked(self, site_id: str, vector: np.ndarray) -> None:
        """Add a site's masked input to the running sum (each site of U2 once)."""
        if self._u2 is None or self._u3 is not None:
            raise SecAggError(f"masked input from {site_id} outside the masking step")
        if site_id not in self._u2:
            raise SecAggError(f"masked input from {site_id}, which is not among the sites that shared keys")
        if site_id in self._masked:
            raise SecAggError(f"a second masked input from {site_id}")
        arr = np.asarray(vector)
        if arr.dtype != np.uint32 or arr.shape != (self.length,):
            raise SecAggError(
                f"the masked input of {site_id} is {arr.dtype} {arr.shape}, expected uint32 ({self.length},)"
            )
        if self._sum is None:
            self._sum = arr.astype(np.uint32, copy=True)
        else:
            np.add(self._sum, arr, out=self._sum)
        self._masked.add(site_id)

    def unmask_request(self) -> UnmaskRequest:
        """Close U3 and return what every site of U3 is asked; SecAggError below the threshold."""
        if self._u2 is None:
            raise SecAggError("unmask request before the masking step")
        if self._u3 is None:
            if len(self._masked) < self.threshold:
                raise SecAggError(
                    f"{len(self._masked)} masked inputs arrived, below the threshold {self.threshold}"
                )
            self._u3 = tuple(sorted(self._masked))
            self._dropped = tuple(sorted(set(self._u2) - self._masked))
        return UnmaskRequest(self.run_id, self.round_id, self._u3, self._dropped)

    # ------------------------------------------------------------------ step 3

    def add_unmask(self, response: UnmaskResponse) -> None:
        """Keep a survivor's shares; each share's x must be the responder's own."""
        if self._u3 is None or self._done:
            raise SecAggError(f"unmask answer from {response.site_id} outside the unmasking step")
        self._check_context(f"the unmask answer of {response.site_id}", response.run_id, response.round_id)
        if response.site_id not in self._u3:
            raise SecAggError(f"unmask answer from {response.site_id}, which is not a survivor")
        if response.site_id in self._responses:
            raise SecAggError(f"a second unmask answer from {response.site_id}")
        if set(response.b_shares) != set(self._u3) or set(response.s_shares) != set(self._dropped):
            raise SecAggError(
                f"the unmask answer of {response.site_id} does not hold exactly the asked shares"
            )
        assert self._u1 is not None
        x = self._u1.index(response.site_id) + 1
        for blob in [*response.b_shares.values(), *response.s_shares.values()]:
            if Share.from_bytes(blob).x != x:
                raise SecAggError(
                    f"the unmask answer of {response.site_id} holds shares that are not its own"
                )
        self._responses[response.site_id] = response

    def _reconstruct(
        self,
        v: str,
        what: str,
        blobs: list[tuple[str, bytes]],
        public: bytes | None = None,
    ) -> bytes:
        """V's secret from the survivors' shares, surviving one wrong share when there are spares.

        With every share consistent this is `combine`. Otherwise, if leaving out exactly one
        answer makes the rest agree (verified: at least t + 1 shares remain, or t when the rebuilt
        key must match its advertised PUBLIC key), that answer is dropped and its site recorded in
        ``bad_shares``; anything else is an error naming V.
        """
        t = self.threshold

        def check(secret: bytes) -> bool:
            return public is None or P.x25519_public(secret) == public

        shares = [(site, Share.from_bytes(blob)) for site, blob in blobs]
        try:
            secret = combine([sh for _, sh in shares], t)
            if check(secret):
                return secret
        except SecAggError:
            pass
        needed = t + 1 if public is not None else t + 2
        found: list[tuple[str, bytes]] = []
        if len(shares) >= needed:
            for i, (site, _) in enumerate(shares):
                rest = [sh for j, (_, sh) in enumerate(shares) if j != i]
                try:
                    candidate = combine(rest, t)
                except SecAggError:
                    continue
                if check(candidate):
                    found.append((site, candidate))
        if len(found) == 1:
            self.bad_shares.add(found[0][0])
            return found[0][1]
        raise SecAggError(
            f"the shares of the {what} of {v} do not agree and no single answer explains it: "
            "the sum stays masked"
        )

    def result(self) -> np.ndarray:
        """The unmasked sum of U3's quantised vectors (uint32); SecAggError when it cannot be had."""
        if self._u3 is None or self._sum is None:
            raise SecAggError("no unmasking step yet")
        if len(self._responses) < self.threshold:
            raise SecAggError(
                f"{len(self._responses)} unmask answers, below the threshold {self.threshold}: "
                "the sum stays masked"
            )
        total = self._sum.copy()
        answers = [self._responses[s] for s in sorted(self._responses)]
        for v in self._u3:
            seed = self._reconstruct(v, "self-mask seed", [(a.site_id, a.b_shares[v]) for a in answers])
            P.add_prg(total, seed, -1)
        s_pks = {s: b.s_pk for s, b in self._bundles.items()}
        for v in self._dropped:
            s_sk = self._reconstruct(
                v,
                "mask key",
                [(a.site_id, a.s_shares[v]) for a in answers],
                public=s_pks[v],
            )
            for u in self._u3:
                seed = P.agree(s_sk, s_pks[u], mask_seed_context(self.run_id, self.round_id, u, v))
                # y_u carries sign(u, v) * PRG(s_uv): take it out.
                P.add_prg(total, seed, -1 if u < v else 1)
        self._done = True
        return total
