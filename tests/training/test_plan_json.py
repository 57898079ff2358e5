"""Plan text that Python's JSON parser refuses with errors of its own (`RecursionError` past
its recursion limit, `ValueError` past the int-string limit) is a `PlanError` like any other
bad plan, and so is a parsed mapping nested deeper than a plan can need."""

from __future__ import annotations

import json

import pytest

from agent.errors import PlanError
from agent.training.plan import MAX_PLAN_DEPTH, json_depth, parse_plan
from tests.fixtures.training import tiny_plan_dict


def _refused(raw: object) -> str:
    with pytest.raises(PlanError) as info:
        parse_plan(raw)
    return str(info.value)


def _nested(levels: int) -> list[object]:
    """LEVELS lists inside each other, built without recursion."""
    outer: list[object] = []
    inner = outer
    for _ in range(levels - 1):
        child: list[object] = []
        inner.append(child)
        inner = child
    return outer


def test_text_past_the_parsers_recursion_limit_is_refused() -> None:
    deep = "[" * 3000 + "]" * 3000
    text = json.dumps(tiny_plan_dict()).replace('"name": "unet"', f'"name": "unet", "x": {deep}', 1)
    assert (
        _refused(text) == f"plan: JSON nested more than {MAX_PLAN_DEPTH} levels deep; a plan needs far fewer"
    )


def test_a_parsed_mapping_nested_too_deeply_is_refused() -> None:
    raw = tiny_plan_dict()
    raw["model"]["x"] = _nested(100)
    assert "nested more than" in _refused(raw)


def test_an_integer_past_the_int_string_limit_is_refused_as_json() -> None:
    msg = _refused('{"seed": ' + "7" * 5000 + "}")
    assert msg.startswith("plan: not valid JSON: a number has more than") and "digits" in msg


def test_depth_is_counted_without_recursion() -> None:
    assert json_depth(1) == 0
    assert json_depth({"a": [1, {"b": []}]}) == 4
    # Past the limit the count stops early: no walk over the rest of a huge document.
    assert json_depth(_nested(100_000)) == MAX_PLAN_DEPTH + 1
    assert json_depth(tiny_plan_dict()) <= 4
