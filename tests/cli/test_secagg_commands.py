"""`fedsite secagg keygen|public-key` and the config's `secure_aggregation` section."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from agent.cli import app
from agent.config import parse_config
from agent.errors import ConfigError
from agent.exchange.secagg import load_site_key, public_key_b64

runner = CliRunner()


def test_keygen_writes_a_private_key_and_prints_its_public_key(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "secagg.key"
    result = runner.invoke(app, ["secagg", "keygen", str(key)])
    assert result.exit_code == 0, result.output
    printed = result.output.strip().splitlines()[-1]
    assert printed == public_key_b64(load_site_key(key))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    again = runner.invoke(app, ["secagg", "keygen", str(key)])
    assert again.exit_code == 1 and "refusing to overwrite" in again.output
    assert runner.invoke(app, ["secagg", "public-key", "--key", str(key)]).output.strip() == printed
    config = tmp_path / "config.yaml"
    peers = {"site-1": printed, "site-2": "B" * 43 + "="}
    config.write_text(
        yaml.safe_dump(
            {"site": {"id": "site-1"}, "secure_aggregation": {"site_key_file": str(key), "peers": peers}}
        )
    )
    assert runner.invoke(app, ["secagg", "public-key", "--config", str(config)]).output.strip() == printed


def _config(section: dict[str, Any], tmp_path: Path) -> Any:
    return parse_config({"site": {"id": "site-1"}, "secure_aggregation": section}, source=tmp_path / "c.yaml")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"peers": {"site-1": "not base64!"}}, "secure_aggregation.peers"),
        ({"peers": {"site-1": "AAAA"}}, "3 bytes, an Ed25519 public key is 32"),
        (
            {"peers": {"site-2": "A" * 43 + "=", "site-3": "B" * 43 + "="}, "site_key_file": "k"},
            "does not list this site",
        ),
        ({"peers": {"site-1": "A" * 43 + "="}, "site_key_file": "k"}, "secure_aggregation.min_sites: 2 but"),
        ({"site_key_file": "k"}, "secure_aggregation.peers: required with secure_aggregation.site_key_file"),
        ({"min_threshold": 1}, "secure_aggregation.min_threshold"),
        (
            {"peers": {"site-1": "A" * 43 + "=", "site-2": "B" * 43 + "="}, "site_key_file": "nope.key"},
            "secure_aggregation.site_key_file: file does not exist",
        ),
    ],
)
def test_config_errors_name_the_key(section: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        _config(section, tmp_path)


def test_a_complete_section_is_configured(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("x")
    cfg = _config(
        {"peers": {"site-1": "A" * 43 + "=", "site-2": "B" * 43 + "="}, "site_key_file": "k"}, tmp_path
    )
    assert cfg.secure_aggregation.configured and cfg.secure_aggregation.site_key_file == tmp_path / "k"
    assert not parse_config({"site": {"id": "site-1"}}).secure_aggregation.configured
