"""The coordinator aggregates sites that send their differences in different encodings.

A plan's compression is a request: one site sends int8, one int8 top-k, one (that forbids
compression) plain float32; every update decodes to the difference it stands for and the
sample-weighted mean of those is the next model. The agents are answered in this process
(`FakeAgent`), the decoding and aggregation are the coordinator's own.
"""

from __future__ import annotations

from pathlib import Path

import torch

from agent.exchange.compression import decode_update
from coordinator.options import RunOptions
from coordinator.runner import Coordinator
from tests.fixtures.coordinator import fake_federation, toy_weights

PLAN = {"dataset": "brain", "seed": 5, "local_epochs": 1, "send": "diff"}


def test_a_mix_of_encodings_aggregates_to_the_mean_of_what_each_site_sent(tmp_path: Path) -> None:
    fake = fake_federation({"site-1": 5, "site-2": 3, "site-3": 2})
    fake.agents["site-2"].compression = {"mode": "int8", "scale": "channel"}
    fake.agents["site-3"].compression = {"mode": "int8_topk", "topk_fraction": 0.5, "rounding": "stochastic"}
    fed = fake.federation()
    start = {k: v.to(torch.float32) for k, v in toy_weights().items()}
    opts = RunOptions(rounds=1, run_id="mix", evaluate=False, evaluate_final=False)
    result = Coordinator(fed, PLAN, tmp_path, opts, initial_weights=start, clients=fake.clients(fed)).run()

    shapes = {k: tuple(v.shape) for k, v in start.items()}
    total = 5 + 3 + 2
    expected = {k: v.double().clone() for k, v in start.items()}
    sizes = {}
    for name, agent in fake.agents.items():
        plan = {**PLAN, "round_id": f"mix-r001-{name}"}
        payload = agent.encode_update(plan, agent.train(plan, start))
        sizes[name] = len(payload)
        diff = decode_update(payload, expected=shapes, max_bytes=1 << 20)
        for k in expected:
            expected[k] += diff[k].double() * agent.num_samples / total
    for k, v in result.final_weights.items():
        torch.testing.assert_close(v.double(), expected[k], rtol=0, atol=1e-6)
    # The int8 and top-k sites really did send something else than float32.
    record = result.rounds[0]["training"]
    assert {s: record[s]["update_sha256"] for s in record}  # every site's update counted
    assert len({sizes["site-1"], sizes["site-2"], sizes["site-3"]}) == 3
    # And the compressed updates were lossy: their plain average would differ.
    plain = {k: v.double().clone() for k, v in start.items()}
    for agent in fake.agents.values():
        plan = {**PLAN, "round_id": f"mix-r001-{agent.name}"}
        for k, d in agent.train(plan, start).items():
            plain[k] += d.double() * agent.num_samples / total
    assert any(not torch.allclose(plain[k], expected[k], rtol=0, atol=1e-6) for k in plain)
