"""Federation files with pull sites and a relay section: what is accepted and each error's wording."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from coordinator.errors import FederationError
from coordinator.federation import load_federation, parse_federation

PUSH = {"name": "site-1", "url": "http://127.0.0.1:8101", "token": "t1"}


def load(tmp_path: Path, doc: dict[str, Any]) -> Any:
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_federation(path)


def test_push_and_pull_sites_with_a_relay_section(tmp_path: Path) -> None:
    fed = load(
        tmp_path,
        {
            "agents": [PUSH, {"name": "site-3", "pull": True}],
            "outside": [{"name": "site-4", "pull": True}],
            "relay": {"listen": "0.0.0.0:8700", "dir": "relay-state", "lease_s": 60, "heartbeat_s": 20},
        },
    )
    assert fed.pull_names == ["site-3", "site-4"]
    assert fed.names == ["site-1", "site-3"]
    assert fed.relay is not None
    assert fed.relay.dir == (tmp_path / "relay-state").resolve()
    assert (fed.relay.lease_s, fed.relay.register_wait_s, fed.relay.chunk_bytes) == (60, 60, 4 * 1024 * 1024)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"name": "site-3", "pull": True, "url": "http://x:1"},
            r"agents\[1\]: a pull site \(site-3\).*remove 'url'",
        ),
        (
            {"name": "site-3", "pull": True, "token": "x"},
            r"agents\[1\]: .*remove 'token'.*relay add-site site-3",
        ),
        ({"name": "site-3", "token": "x"}, r"agents\[1\]: site-3 has no 'url'.*`pull: true`"),
    ],
)
def test_entry_errors_name_the_key(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(FederationError, match=message):
        parse_federation({"agents": [PUSH, entry], "relay": {}})


def test_a_pull_site_needs_a_relay_section() -> None:
    with pytest.raises(FederationError, match=r"pull site\(s\) site-3 need a 'relay:' section"):
        parse_federation({"agents": [PUSH, {"name": "site-3", "pull": True}]})


@pytest.mark.parametrize(
    ("relay", "message"),
    [
        ({"listen": "8700"}, r"relay.listen: .*HOST:PORT"),
        ({"listen": "host:99999"}, r"relay.listen: .*port 0-65535"),
        ({"lease_s": 30, "heartbeat_s": 30}, r"lease_s \(30\) must be longer than heartbeat_s \(30\)"),
        ({"chunk_bytes": 10}, r"relay.chunk_bytes"),
        ({"leases": 3}, r"relay.leases"),
    ],
)
def test_relay_section_errors(relay: dict[str, Any], message: str) -> None:
    with pytest.raises(FederationError, match=message):
        parse_federation({"agents": [PUSH], "relay": relay})


def test_relay_tls_files_must_exist(tmp_path: Path) -> None:
    with pytest.raises(FederationError, match=r"relay.tls.cert_file: file does not exist: .*relay.crt"):
        load(
            tmp_path,
            {"agents": [PUSH], "relay": {"tls": {"cert_file": "relay.crt", "key_file": "relay.key"}}},
        )
