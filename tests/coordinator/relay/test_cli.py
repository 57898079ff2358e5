"""`fedsite relay add-site | sites | serve` and `fedsite coordinate --serve` with a pull site."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import yaml
from typer.testing import CliRunner

from agent.cli import app
from coordinator.relay.models import RelaySite
from coordinator.relay.store import RelayStore, token_sha256
from tests.fixtures.coordinator import FakeAgent
from tests.fixtures.relay import PullSiteThread, RelayProcess, free_port, relay_env

runner = CliRunner()


def federation(tmp_path: Path) -> Path:
    path = tmp_path / "federation.yaml"
    doc = {"agents": [{"name": "site-3", "pull": True}], "relay": {"dir": "relay"}}
    path.write_text(yaml.safe_dump(doc))
    return path


def stored_hash(root: Path, site: str) -> str | None:
    store = RelayStore(root)
    try:
        with store._tx() as s:
            row = s.get(RelaySite, site)
            return row.token_sha256 if row is not None else None
    finally:
        store.close()


def test_add_site_writes_a_private_token_file_and_stores_its_hash(tmp_path: Path) -> None:
    fed = federation(tmp_path)
    token_file = tmp_path / "site-3.token"
    res = runner.invoke(
        app, ["relay", "add-site", "site-3", "--federation", str(fed), "--token-file", str(token_file)]
    )
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 40 and token not in res.output
    assert stored_hash(tmp_path / "relay", "site-3") == token_sha256(token)
    # A second token for the same site needs --replace, and the file is not overwritten.
    again = runner.invoke(
        app, ["relay", "add-site", "site-3", "--federation", str(fed), "--token-file", str(token_file)]
    )
    assert again.exit_code == 1 and "--replace" in again.output
    assert token_file.read_text().strip() == token
    printed = runner.invoke(app, ["relay", "add-site", "site-3", "--federation", str(fed), "--replace"])
    assert printed.exit_code == 0
    new_token = printed.output.strip().splitlines()[-1]
    assert stored_hash(tmp_path / "relay", "site-3") == token_sha256(new_token)


def test_add_site_warns_for_a_name_not_in_the_file_and_sites_lists_them(tmp_path: Path) -> None:
    fed = federation(tmp_path)
    res = runner.invoke(app, ["relay", "add-site", "site-9", "--federation", str(fed)])
    assert res.exit_code == 0 and "site-9 is not a pull entry" in res.output
    bad = runner.invoke(app, ["relay", "add-site", "bad name", "--federation", str(fed)])
    assert bad.exit_code == 1 and "site name 'bad name'" in bad.output
    listing = runner.invoke(app, ["relay", "sites", "--federation", str(fed)])
    assert listing.exit_code == 0
    assert "site-9" in listing.output and "never" in listing.output


def test_relay_commands_need_a_relay_section(tmp_path: Path) -> None:
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump({"agents": [{"name": "s", "url": "http://127.0.0.1:1", "token": "t"}]}))
    res = runner.invoke(app, ["relay", "sites", "--federation", str(path)])
    assert res.exit_code == 2 and "no 'relay:' section" in res.output


def test_coordinate_serves_the_relay_for_a_pull_site(tmp_path: Path) -> None:
    from tests.fixtures.agents import tiny_plan

    port = free_port()
    env = relay_env(tmp_path, ["site-3"], listen=f"127.0.0.1:{port}")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(tiny_plan()))
    fake = FakeAgent("site-3", 8, dataset=tiny_plan()["dataset"])
    with PullSiteThread(f"http://127.0.0.1:{port}", env.tokens["site-3"], fake) as site:
        res = runner.invoke(
            app,
            [
                "coordinate",
                "--federation",
                str(env.federation_path),
                "--plan",
                str(plan),
                "--out",
                str(tmp_path / "out"),
                "--rounds",
                "1",
                "--quiet",
                "--serve",
                f"127.0.0.1:{port}",
            ],
        )
    assert res.exit_code == 0, res.output
    assert site.errors == []
    assert f"relay: serving http://127.0.0.1:{port}" in res.output
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["rounds"][0]["participants"] == ["site-3"]
    assert [t["kind"] for t in site.tasks] == ["train", "evaluate"]


def test_relay_serve_refuses_a_bad_listen_address(tmp_path: Path) -> None:
    fed = federation(tmp_path)
    res = runner.invoke(app, ["relay", "serve", "--federation", str(fed), "--listen", "nowhere"])
    assert res.exit_code == 2 and "--listen" in res.output and "HOST:PORT" in res.output


def test_coordinate_serve_needs_a_relay_section(tmp_path: Path) -> None:
    from tests.fixtures.agents import tiny_plan

    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump({"agents": [{"name": "s", "url": "http://127.0.0.1:1", "token": "t"}]}))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(tiny_plan()))
    args = ["coordinate", "--federation", str(path), "--plan", str(plan), "--out", str(tmp_path / "out")]
    res = runner.invoke(app, [*args, "--serve", "127.0.0.1:0"])
    # On one line whatever the path's length: a path cut by a line break cannot be pasted.
    assert res.exit_code == 2 and f"{path} has no 'relay:' section" in res.output


def test_coordinate_with_a_standalone_relay(tmp_path: Path) -> None:
    from tests.fixtures.agents import tiny_plan

    env = relay_env(tmp_path, ["site-3"])
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(tiny_plan()))
    fake = FakeAgent("site-3", 8, dataset=tiny_plan()["dataset"])
    args = ["coordinate", "--federation", str(env.federation_path), "--plan", str(plan), "--quiet"]
    with RelayProcess(env) as relay, PullSiteThread(relay.url, env.tokens["site-3"], fake) as site:
        res = runner.invoke(app, [*args, "--out", str(tmp_path / "out"), "--rounds", "1", "--no-serve"])
    assert res.exit_code == 0, res.output
    assert "relay: serving" not in res.output
    assert site.errors == [] and [t["kind"] for t in site.tasks] == ["train", "evaluate"]
    both = runner.invoke(app, [*args, "--out", str(tmp_path / "x"), "--no-serve", "--serve", "127.0.0.1:0"])
    assert both.exit_code == 2 and "exclude each other" in both.output
