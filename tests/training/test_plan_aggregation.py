"""The plan's `aggregation` section: validated, and absent from the hash while it is not set."""

from __future__ import annotations

import pytest

from agent.errors import PlanError
from agent.training.plan import canonical_json, parse_plan, plan_hash
from tests.fixtures.agents import tiny_plan

# tiny_plan()'s hash as computed before plans had an `aggregation` key: sites approve plans
# by this hash, so adding optional keys must not change it.
TINY_PLAN_HASH = "1b2db999d07ae6d161f44c40ccad922c8aa5d4feddd6bad75886b2e0808c6633"

SECURE = {"mode": "secure", "threshold": 2, "clip": 0.5, "max_weight": 100}


def test_existing_plan_hash_unchanged() -> None:
    plan = parse_plan(tiny_plan())
    assert plan.aggregation is None
    assert "aggregation" not in canonical_json(plan)
    assert plan_hash(plan) == TINY_PLAN_HASH


def test_secure_plan_is_parsed_and_hashed_with_its_parameters() -> None:
    plan = parse_plan(tiny_plan(send="diff", aggregation=SECURE))
    assert plan.aggregation is not None and plan.aggregation.threshold == 2
    weaker = parse_plan(tiny_plan(send="diff", aggregation={**SECURE, "threshold": 3}))
    assert plan_hash(plan) != plan_hash(weaker) != TINY_PLAN_HASH


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"aggregation": SECURE}, "needs send 'diff'"),
        ({"send": "diff", "aggregation": {**SECURE, "threshold": 1}}, "aggregation.threshold"),
        ({"send": "diff", "aggregation": {**SECURE, "clip": 0}}, "aggregation.clip"),
        ({"send": "diff", "aggregation": {**SECURE, "mode": "plain"}}, "aggregation.mode"),
        ({"send": "diff", "aggregation": {**SECURE, "extra": 1}}, "aggregation.extra"),
    ],
)
def test_bad_aggregation_names_its_key(overrides: dict[str, object], needle: str) -> None:
    with pytest.raises(PlanError, match=needle.replace("(", r"\(")):
        parse_plan(tiny_plan(**overrides))
