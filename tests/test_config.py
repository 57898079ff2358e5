"""The config loader: every error names the file and the key; paths resolve; env overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from agent.cli import app
from agent.config import load_config
from agent.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, doc: dict) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _base() -> dict:
    return {
        "site": {"id": "site-1"},
        "datasets": [{"name": "brain", "format": "nifti", "root": "data"}],
        "work_dir": "work",
    }


def test_valid_config_resolves_relative_paths(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, _base()), environ={})
    assert cfg.datasets[0].root == (tmp_path / "data").resolve()
    assert cfg.work_dir == (tmp_path / "work").resolve()
    assert cfg.db_url == f"sqlite:///{(tmp_path / 'work' / 'fedsite.db').resolve().as_posix()}"


def test_unknown_key_is_named(tmp_path: Path) -> None:
    doc = _base()
    doc["api"] = {"prot": 8000}
    path = _write(tmp_path, doc)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert f"{path}: api.prot: unknown key" in str(err.value)


def test_wrong_type_is_named(tmp_path: Path) -> None:
    doc = _base()
    doc["datasets"][0]["val_fraction"] = "lots"
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.val_fraction"):
        load_config(_write(tmp_path, doc), environ={})


def test_missing_dataset_root_is_named(tmp_path: Path) -> None:
    doc = _base()
    doc["datasets"][0]["root"] = "nowhere"
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.root: folder does not exist"):
        load_config(_write(tmp_path, doc), environ={})


def test_missing_tls_file_is_named(tmp_path: Path) -> None:
    doc = _base()
    doc["api"] = {"tls": {"cert_file": "server.crt", "key_file": "server.key"}}
    with pytest.raises(ConfigError, match=r"api\.tls\.cert_file: file does not exist"):
        load_config(_write(tmp_path, doc), environ={})


def test_missing_required_key(tmp_path: Path) -> None:
    doc = _base()
    del doc["site"]
    with pytest.raises(ConfigError, match=r"site: required key is missing"):
        load_config(_write(tmp_path, doc), environ={})


def test_duplicate_dataset_names(tmp_path: Path) -> None:
    doc = _base()
    doc["datasets"].append(dict(doc["datasets"][0]))
    with pytest.raises(ConfigError, match="appears twice"):
        load_config(_write(tmp_path, doc), environ={})


def test_pattern_must_name_subject(tmp_path: Path) -> None:
    doc = _base()
    doc["datasets"][0]["images"] = "{modality}.nii.gz"
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.images: .*\{subject\}"):
        load_config(_write(tmp_path, doc), environ={})


def test_environment_overrides(tmp_path: Path) -> None:
    env = {"FEDSITE_API__PORT": "9443", "FEDSITE_DEVICE": "cpu", "FEDSITE_EGRESS__CLIP_NORM": "2.5"}
    cfg = load_config(_write(tmp_path, _base()), environ=env)
    assert cfg.api.port == 9443
    assert cfg.device == "cpu"
    assert cfg.egress.clip_norm == 2.5


def test_bad_environment_override_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"api\.port"):
        load_config(_write(tmp_path, _base()), environ={"FEDSITE_API__PORT": "not-a-port"})


def test_loader_threads_default_to_auto_and_take_a_number(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, _base()), environ={}).loader_threads == "auto"
    assert load_config(_write(tmp_path, {**_base(), "loader_threads": 6}), environ={}).loader_threads == 6
    env = {"FEDSITE_LOADER_THREADS": "2"}
    assert load_config(_write(tmp_path, _base()), environ=env).loader_threads == 2


@pytest.mark.parametrize("value", [-1, 65, "many", True, 2.5, "4"])
def test_loader_threads_out_of_range_or_not_a_number_is_named(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError, match=r"loader_threads.*auto or a whole number from 0 to 64") as err:
        load_config(_write(tmp_path, {**_base(), "loader_threads": value}), environ={})
    # One reason, not one per member of the union.
    assert str(err.value).count("loader_threads:") == 1


def test_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("site: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, environ={})


def test_site_secret_is_created_once(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, _base()), environ={})
    first = cfg.site_secret()
    assert first == cfg.site_secret()
    assert (cfg.work_dir / "site.secret").stat().st_mode & 0o777 == 0o600


def test_example_config_is_valid() -> None:
    raw = yaml.safe_load((REPO / "config.example.yaml").read_text())
    from agent.config import parse_config

    cfg = parse_config(raw, environ={}, check_paths=False)
    assert cfg.site.id == "site-1"


def test_config_check_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["config", "check", str(_write(tmp_path, _base()))])
    assert ok.exit_code == 0, ok.output
    assert "OK" in ok.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("site: {id: 'x'}\nbogus: 1\n")
    res = runner.invoke(app, ["config", "check", str(bad)])
    assert res.exit_code == 2
    assert "bogus: unknown key" in res.output


# ---- connect (outbound-only mode) ------------------------------------------------------------


def _outbound(tmp_path: Path, **connect: object) -> dict:
    doc = _base()
    doc["connect"] = {"mode": "outbound", "coordinator_url": "https://coord.example:8700", **connect}
    return doc


def test_connect_defaults_to_listen_without_a_coordinator(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, _base()), environ={})
    assert cfg.connect.mode == "listen" and not cfg.connect.enabled and cfg.connect.serves_control_api


def test_outbound_resolves_its_files_next_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "relay.token").write_text("s3cret\n")
    (tmp_path / "ca.pem").write_text("x")
    doc = _outbound(tmp_path, token_file="relay.token", ca_file="ca.pem")
    cfg = load_config(_write(tmp_path, doc), environ={})
    assert cfg.connect.token_file == (tmp_path / "relay.token").resolve()
    assert cfg.connect.ca_file == (tmp_path / "ca.pem").resolve()
    assert cfg.connect.coordinator_url == "https://coord.example:8700"
    assert cfg.connect.enabled and not cfg.connect.serves_control_api


def test_outbound_needs_a_coordinator_url_and_a_token_file(tmp_path: Path) -> None:
    doc = _base()
    doc["connect"] = {"mode": "both"}
    path = _write(tmp_path, doc)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert f"{path}: connect.coordinator_url: required when connect.mode is 'both'" in str(err.value)
    assert f"{path}: connect.token_file: required when connect.mode is 'both'" in str(err.value)


def test_outbound_token_file_must_exist_and_hold_a_token(tmp_path: Path) -> None:
    path = _write(tmp_path, _outbound(tmp_path, token_file="relay.token"))
    with pytest.raises(ConfigError, match=r"connect\.token_file: file does not exist: .*relay\.token"):
        load_config(path, environ={})
    (tmp_path / "relay.token").write_text("\n")
    with pytest.raises(ConfigError, match=r"connect\.token_file: the file is empty"):
        load_config(path, environ={})


def test_client_certificate_and_key_come_together(tmp_path: Path) -> None:
    (tmp_path / "relay.token").write_text("s3cret\n")
    (tmp_path / "client.pem").write_text("x")
    path = _write(tmp_path, _outbound(tmp_path, token_file="relay.token", client_cert="client.pem"))
    with pytest.raises(ConfigError, match=r"connect\.client_key: required with connect\.client_cert"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("coord.example:8700", "must be an http:// or https:// URL with a host"),
        ("ftp://coord.example", "must be an http:// or https:// URL with a host"),
        ("https://user:pw@coord.example", "must be a base URL without credentials, query or fragment"),
    ],
)
def test_coordinator_url_shape_is_checked(tmp_path: Path, url: str, why: str) -> None:
    (tmp_path / "relay.token").write_text("s3cret\n")
    path = _write(tmp_path, _outbound(tmp_path, token_file="relay.token", coordinator_url=url))
    with pytest.raises(ConfigError, match=rf"connect\.coordinator_url: {why}"):
        load_config(path, environ={})


def test_tls_files_with_a_plain_http_coordinator_are_refused(tmp_path: Path) -> None:
    (tmp_path / "relay.token").write_text("s3cret\n")
    (tmp_path / "ca.pem").write_text("x")
    doc = _outbound(tmp_path, token_file="relay.token", ca_file="ca.pem", coordinator_url="http://c:1")
    with pytest.raises(ConfigError, match=r"connect\.ca_file: only used with an https:// coordinator_url"):
        load_config(_write(tmp_path, doc), environ={})


def test_connect_mode_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "relay.token").write_text("s3cret\n")
    doc = _base()
    doc["connect"] = {"coordinator_url": "http://127.0.0.1:8700", "token_file": "relay.token"}
    cfg = load_config(_write(tmp_path, doc), environ={"FEDSITE_CONNECT__MODE": "outbound"})
    assert cfg.connect.mode == "outbound"
    with pytest.raises(ConfigError, match=r"connect\.mode: Input should be 'listen', 'outbound' or 'both'"):
        load_config(_write(tmp_path, doc), environ={"FEDSITE_CONNECT__MODE": "pull"})
