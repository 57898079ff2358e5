"""The outbound-mode examples an admin copies: config.example.yaml's commented `connect:` keys,
the admin guide's `connect:` section and its federation file with a `relay:` section are files
the agent and the coordinator accept, with the values they really use, so that a copied example
never fails on a key the code does not know."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from agent.config import ConnectConfig, parse_config
from coordinator.federation import RelaySettings, load_federation

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.yaml"
GUIDE = ROOT / "deploy" / "README.md"
SITE_EXAMPLE = ROOT / "deploy" / "config" / "site.yaml.example"


def _connect_block_uncommented(text: str) -> str:
    """config.example.yaml's `connect:` section with its commented `key: value` lines made
    active (explanations, which are not `key: value` lines, stay comments)."""
    lines = text.splitlines()
    start = lines.index("connect:")
    out = [lines[start]]
    for line in lines[start + 1 :]:
        if line and not line.startswith((" ", "#")):
            break
        match = re.fullmatch(r"  # ([a-z_]+): (\S+)", line)
        out.append(f"  {match.group(1)}: {match.group(2)}" if match else line)
    return "\n".join(out) + "\n"


def _base_config() -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return raw


def test_the_example_config_listens_by_default() -> None:
    cfg = parse_config(_base_config(), environ={}, check_paths=False)
    assert cfg.connect.mode == "listen"
    assert not cfg.connect.enabled


def test_the_example_connect_keys_uncommented_make_a_valid_outbound_config_with_the_defaults() -> None:
    block = yaml.safe_load(_connect_block_uncommented(EXAMPLE.read_text()))["connect"]
    # Every key of the section is in the example, commented or not.
    assert set(block) == set(ConnectConfig.model_fields)
    raw = {**_base_config(), "connect": {**block, "mode": "outbound"}}
    cfg = parse_config(raw, environ={}, check_paths=False)
    assert cfg.connect.mode == "outbound"
    assert cfg.connect.coordinator_url == "https://relay.consortium.example:8700"
    assert cfg.connect.token_file == Path("/etc/fedsite/tls/relay.token")
    # The numbers shown are the defaults, so that the comments say what an unset key means.
    defaults = ConnectConfig()
    for key in ("poll_wait_s", "heartbeat_s", "chunk_bytes", "max_backoff_s", "upload_attempts"):
        assert getattr(cfg.connect, key) == getattr(defaults, key), key


def test_the_guides_connect_section_is_a_valid_outbound_config_for_the_container() -> None:
    guide = GUIDE.read_text()
    match = re.search(r"cat >> config/site.yaml <<'EOF'\n(connect:\n.*?)\nEOF\n", guide, flags=re.S)
    assert match is not None, "the guide's outbound set-up appends a connect: section"
    section = yaml.safe_load(match.group(1))
    raw: dict[str, Any] = yaml.safe_load(SITE_EXAMPLE.read_text())
    # The guide says to delete the api.tls block: an outbound site serves no API.
    raw["api"].pop("tls")
    raw.update(section)
    cfg = parse_config(raw, environ={}, check_paths=False)
    assert cfg.connect.mode == "outbound"
    assert cfg.connect.coordinator_url is not None and cfg.connect.coordinator_url.startswith("https://")
    # The files live in the folder docker-compose.outbound.yml mounts at /etc/fedsite/tls.
    for key in ("token_file", "ca_file"):
        value = getattr(cfg.connect, key)
        assert value is not None and value.parent == Path("/etc/fedsite/tls"), key


def test_the_guides_federation_file_with_a_relay_mixes_push_and_pull_sites(tmp_path: Path) -> None:
    guide = GUIDE.read_text()
    blocks = re.findall(r"^```yaml\n(.*?)^```$", guide, flags=re.M | re.S)
    relay_blocks = [b for b in blocks if b.startswith("relay:")]
    assert len(relay_blocks) == 1, "the guide shows one federation file with a relay: section"
    raw = yaml.safe_load(relay_blocks[0])
    # The files it names, relative to the federation file, as the operator would have them.
    for rel in (
        raw["agents"][0]["token_file"],
        raw["agents"][0]["ca_file"],
        *raw["relay"]["tls"].values(),
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x\n")
    path = tmp_path / "federation.yaml"
    path.write_text(relay_blocks[0])
    fed = load_federation(path)
    assert fed.pull_names == ["hospital-b"]
    assert [a.name for a in fed.agents if not a.pull] == ["hospital-a"]
    relay = fed.relay
    assert relay is not None and relay.tls is not None
    assert relay.listen == "0.0.0.0:8700"
    assert relay.dir == tmp_path / "relay"
    assert relay.tls.client_ca_file == tmp_path / "relay-pki" / "agent" / "ca.crt"
    # The numbers the guide shows are the relay's defaults, so that the comments say what an
    # unset key means.
    defaults = RelaySettings()
    for key in ("lease_s", "heartbeat_s", "chunk_bytes", "register_wait_s"):
        assert getattr(relay, key) == getattr(defaults, key), key
