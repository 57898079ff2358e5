"""What a site refuses when a secure-aggregation round is submitted (`SecureRounds.check_plan`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.config import parse_config
from agent.errors import ConfigError, InvalidRequest
from agent.exchange.secagg import generate_site_key, public_key_b64, write_site_key
from agent.jobs.secure_round import SecureRounds, check_setup
from tests.exchange.test_egress import MemorySink
from tests.fixtures.training import tiny_plan

SECURE = {"mode": "secure", "threshold": 2, "clip": 0.5, "max_weight": 100}
PEERS = {"site-1": "A" * 43 + "=", "site-2": "B" * 43 + "="}


def _rounds(tmp_path: Path, section: dict[str, Any] | None) -> tuple[SecureRounds, MemorySink]:
    (tmp_path / "k").write_text("x")
    raw: dict[str, Any] = {"site": {"id": "site-1"}, "work_dir": str(tmp_path / "work")}
    if section is not None:
        raw["secure_aggregation"] = section
    cfg = parse_config(raw, source=tmp_path / "config.yaml")
    sink = MemorySink()
    return SecureRounds(cfg, store=None, audit=sink, gate=None), sink  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("section", "plan", "reason", "words"),
    [
        (None, {"send": "diff", "aggregation": SECURE}, "not_configured", "secure_aggregation.site_key_file"),
        (
            {"site_key_file": "k", "peers": PEERS, "min_threshold": 3},
            {"send": "diff", "aggregation": SECURE},
            "threshold_below_minimum",
            "plan.aggregation.threshold: 2 is below this site's minimum 3",
        ),
        (
            {"site_key_file": "k", "peers": PEERS, "require": True},
            {},
            "secure_aggregation_required",
            "trains only in secure-aggregation rounds",
        ),
    ],
)
def test_a_round_weaker_than_the_site_accepts_is_refused_and_audited(
    tmp_path: Path, section: dict[str, Any] | None, plan: dict[str, Any], reason: str, words: str
) -> None:
    rounds, sink = _rounds(tmp_path, section)
    with pytest.raises(InvalidRequest, match=words.replace(".", r"\.")):
        rounds.check_plan(tiny_plan(round_id="r1", **plan), "token:coord")
    [event] = sink.find("secagg.refused")
    assert event["details"]["reason"] == reason and event["details"]["step"] == "start_round"
    assert event["details"]["round_id"] == "r1" and event["actor"] == "token:coord"


def test_a_round_the_site_accepts_passes_without_a_record(tmp_path: Path) -> None:
    rounds, sink = _rounds(tmp_path, {"site_key_file": "k", "peers": PEERS, "min_threshold": 2})
    rounds.check_plan(tiny_plan(round_id="r1", send="diff", aggregation=SECURE), "token:coord")
    rounds.check_plan(tiny_plan(round_id="r2"), "token:coord")
    assert sink.events == []


def test_a_roster_that_does_not_pin_this_sites_key_stops_the_agent(tmp_path: Path) -> None:
    key = generate_site_key()
    write_site_key(tmp_path / "site.key", key)
    ok = {"site_key_file": "site.key", "peers": {**PEERS, "site-1": public_key_b64(key)}}
    assert check_setup(_rounds(tmp_path, ok)[0].cfg) == public_key_b64(key)
    with pytest.raises(ConfigError, match=r"secure_aggregation\.peers\.site-1: is not the public key"):
        check_setup(_rounds(tmp_path, {"site_key_file": "site.key", "peers": PEERS})[0].cfg)
    with pytest.raises(ConfigError, match=r"secure_aggregation\.site_key_file: .*not an unencrypted PEM"):
        check_setup(_rounds(tmp_path, {"site_key_file": "k", "peers": PEERS})[0].cfg)
