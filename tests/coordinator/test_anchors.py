"""The coordinator keeps each site's signed audit anchors in results.json (coordinator.client,
coordinator.runner, coordinator.report): a site's privacy officer checks the site's log
against them later with `fedsite audit verify --anchors results.json`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.audit.anchors import load_anchors, public_key_text, sign_anchor, signature_problem
from coordinator.options import RunOptions
from coordinator.runner import Coordinator
from tests.fixtures.coordinator import FakeAgent, FakeFederation, results, toy_weights


@dataclass
class AnchoringAgent(FakeAgent):
    """A fake agent whose completed rounds carry a signed audit anchor, as the real one's do."""

    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    head: int = 0

    def handle(self, request: httpx.Request) -> httpx.Response:
        answer = super().handle(request)
        path = request.url.path
        if path == "/v1/info":
            body = {**answer.json(), "audit_public_key": public_key_text(self.key.public_key())}
            return httpx.Response(200, json=body)
        if request.method == "GET" and path.startswith("/v1/rounds/") and not path.endswith("/update"):
            body = answer.json()
            if body.get("status") == "completed":
                self.head += 3
                digest = hashlib.sha256(f"{self.name}:{self.head}".encode()).hexdigest()
                body["audit_anchor"] = sign_anchor(
                    self.key,
                    site_id=f"id-{self.name}",
                    round_id=body["round_id"],
                    event_id=self.head,
                    event_hash=digest,
                )
                return httpx.Response(200, json=body)
        return answer


def test_each_sites_anchors_are_kept_per_site_in_results(tmp_path: Path) -> None:
    agents = {name: AnchoringAgent(name, n) for name, n in {"site-1": 5, "site-2": 3}.items()}
    fake = FakeFederation(dict(agents))
    fed = fake.federation()
    options = RunOptions(run_id="run", rounds=2, evaluate=False, evaluate_final=False)
    Coordinator(
        fed,
        {"dataset": "brain", "seed": 7},
        tmp_path,
        options,
        initial_weights=toy_weights(),
        clients=fake.clients(fed),
    ).run()

    doc = results(tmp_path)
    for name, agent in agents.items():
        kept = doc["audit_anchors"][name]
        assert [a["event_id"] for a in kept] == [3, 6]
        assert [a["round_id"] for a in kept] == [r["training"][name]["round_id"] for r in doc["rounds"]]
        public = agent.key.public_key()
        assert doc["site_info"][name]["audit_public_key"] == public_key_text(public)
        # What `fedsite audit verify --anchors results.json` reads at that site.
        loaded = load_anchors(tmp_path / "results.json", f"id-{name}")
        assert loaded == kept
        assert all(signature_problem(public, a) == "" for a in loaded)
