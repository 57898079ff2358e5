"""An in-process federation for the protocol tests: N sites with their own state directories,
a coordinator, and every message passed through its JSON form (as over HTTP).

`Round.run` drives the four steps; ``drop_before`` sites vanish after sharing (no masked input),
``drop_after`` after their masked input (no unmask answer).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.exchange.secagg import (
    AdvertiseBundle,
    CoordinatorSecAgg,
    MaskRequest,
    QuantParams,
    ShareRequest,
    ShareResponse,
    SiteSecAgg,
    UnmaskRequest,
    UnmaskResponse,
    generate_site_key,
    quantize,
)

RUN = "run-test"


def site_ids(n: int) -> list[str]:
    return [f"site-{i:02d}" for i in range(n)]


@dataclass
class Round:
    root: Path
    n: int
    threshold: int
    length: int = 64
    round_id: str = "round-1"
    clip: float = 0.5
    max_weight: int = 100
    keys: dict[str, Ed25519PrivateKey] = field(default_factory=dict)
    sites: dict[str, SiteSecAgg] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = site_ids(self.n)
        if not self.keys:
            self.keys = {s: generate_site_key() for s in ids}
        roster = {s: k.public_key() for s, k in self.keys.items()}
        self.sites = {s: self.site(s, roster) for s in ids}
        self.coordinator = CoordinatorSecAgg(
            run_id=RUN,
            round_id=self.round_id,
            threshold=self.threshold,
            pinned=roster,
            length=self.length + 1,
        )
        rng = np.random.default_rng(7)
        self.updates = {s: rng.normal(0.0, 0.2, self.length).astype(np.float32) for s in ids}
        self.weights = {s: int(rng.integers(1, self.max_weight + 1)) for s in ids}

    def site(self, s: str, roster: dict, **kwargs: int) -> SiteSecAgg:
        return SiteSecAgg(
            self.root / s,
            site_id=s,
            run_id=RUN,
            round_id=self.round_id,
            threshold=self.threshold,
            signing_key=self.keys[s],
            roster=roster,
            **kwargs,
        )

    @property
    def params(self) -> QuantParams:
        return QuantParams(n_sites=self.n, clip=self.clip, max_weight=self.max_weight)

    def advertise(self) -> ShareRequest:
        for s, site in self.sites.items():
            self.coordinator.add_advertisement(AdvertiseBundle.from_json(site.advertise().to_json()))
        return ShareRequest.from_json(self.coordinator.share_request().to_json())

    def share(self, request: ShareRequest, sites: Iterable[str]) -> dict[str, MaskRequest]:
        for s in sites:
            self.coordinator.add_shares(ShareResponse.from_json(self.sites[s].share(request).to_json()))
        return {s: MaskRequest.from_json(r.to_json()) for s, r in self.coordinator.mask_requests().items()}

    def mask(self, requests: dict[str, MaskRequest], sites: Iterable[str]) -> UnmaskRequest:
        for s in sites:
            q = quantize(self.updates[s], self.weights[s], self.params)
            self.coordinator.add_masked(s, self.sites[s].mask(requests[s], q.vector))
        return UnmaskRequest.from_json(self.coordinator.unmask_request().to_json())

    def unmask(self, request: UnmaskRequest, sites: Iterable[str]) -> np.ndarray:
        for s in sites:
            self.coordinator.add_unmask(UnmaskResponse.from_json(self.sites[s].unmask(request).to_json()))
        return self.coordinator.result()

    def run(self, drop_before: Iterable[str] = (), drop_after: Iterable[str] = ()) -> np.ndarray:
        before, after = set(drop_before), set(drop_after)
        ids = list(self.sites)
        masks = self.share(self.advertise(), ids)
        unmask = self.mask(masks, [s for s in ids if s not in before])
        return self.unmask(unmask, [s for s in unmask.survivors if s not in after])

    def expected_sum(self, contributors: Iterable[str]) -> np.ndarray:
        """The plain sum of the contributors' quantised vectors, modulo 2^32."""
        total = np.zeros(self.length + 1, dtype=np.uint32)
        for s in contributors:
            total += quantize(self.updates[s], self.weights[s], self.params).vector
        return total
