"""The federation file: which agents the coordinator drives and how it reaches them.

```yaml
agents:
  - name: site-1
    url: http://127.0.0.1:8101
    token: "..."              # or token_file: path (relative to this file)
    ca_file: null             # CA bundle that signed the agent's TLS certificate (https)
    client_cert: null         # optional client certificate + key for mutual TLS
    client_key: null
  - name: site-3
    pull: true                # outbound-only site: it connects to the relay, no url or token here
outside:                      # optional: sites that only evaluate (held-out test sites)
  - name: site-4
    url: http://127.0.0.1:8104
    token_file: site-4/coordinator.token
relay:                        # required when any entry is `pull: true` (see coordinator.relay)
  listen: 127.0.0.1:8700      # where `fedsite coordinate` serves it (--serve HOST:PORT overrides)
  dir: relay                  # relay.db + blobs/ + chunks/ + updates/, relative to this file
  database_url: null          # optional SQLAlchemy URL instead of dir/relay.db
  lease_s: 90
  heartbeat_s: 30
  chunk_bytes: 4194304
  max_wait_s: 25
  register_wait_s: 60         # preflight waits this long for pull sites that have not connected
  tls: null                   # {cert_file, key_file, client_ca_file?}: serve HTTPS
min_sites: 1
timeouts: {connect: 5, read: 30, round: 3600, evaluation: 1800}
retries: {attempts: 5, backoff: 0.5, max_backoff: 10}
poll_interval: 1.0             # the least time between two status requests to one site
status_wait: 5                 # each status request waits up to this long for the job to end
```

A push site (`url` and a token) is reached by the coordinator; a pull site (`pull: true`)
reaches the coordinator's relay with the token `fedsite relay add-site` issued to it, whose
hash the relay keeps in its own database.

Every error names the file and the key (``agents[1].token_file``) so that whoever runs the
federation can fix the file without reading code.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.config import check_name
from agent.validation import StrictModel, format_validation_error
from coordinator.errors import FederationError


class AgentEntry(StrictModel):
    name: str
    # A push site's address; a pull site has none (it connects to the relay).
    url: str | None = None
    pull: bool = False
    token: SecretStr | None = None
    token_file: Path | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    # The site's secure-aggregation public key (base64 of 32 bytes, `fedsite secagg public-key`):
    # the coordinator checks the keys each site advertises against it (strategy secure_fedavg).
    secagg_public_key: str | None = None

    @field_validator("name")
    @classmethod
    def _name_shape(cls, v: str) -> str:
        return check_name(v)

    @field_validator("secagg_public_key")
    @classmethod
    def _secagg_key(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:
            raw = base64.b64decode(v.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise ValueError("not base64 (expected the output of `fedsite secagg public-key`)") from None
        if len(raw) != 32:
            raise ValueError(f"{len(raw)} bytes, an Ed25519 public key is 32")
        return v

    @field_validator("url")
    @classmethod
    def _url_shape(cls, v: str | None) -> str | None:
        if v is None:
            return None
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                "must be an http:// or https:// URL with a host, e.g. https://site-1.example:8443"
            )
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _one_token_source(self) -> AgentEntry:
        if self.pull:
            given = [
                k
                for k in ("url", "token", "token_file", "ca_file", "client_cert", "client_key")
                if getattr(self, k) is not None
            ]
            if given:
                raise ValueError(
                    f"a pull site ({self.name}) connects to the relay, the coordinator never reaches it: "
                    f"remove {', '.join(repr(k) for k in given)} (its token is issued by "
                    f"`fedsite relay add-site {self.name}`)"
                )
            return self
        if self.url is None:
            raise ValueError(
                f"{self.name} has no 'url': give the agent's address, or `pull: true` for a site that "
                "connects to the relay"
            )
        if (self.token is None) == (self.token_file is None):
            raise ValueError("set exactly one of 'token' and 'token_file'")
        if self.token is not None and not self.token.get_secret_value().strip():
            raise ValueError("'token' is empty")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("'client_cert' and 'client_key' go together")
        return self

    def bearer_token(self) -> str:
        """The token sent as ``Authorization: Bearer``; read from ``token_file`` when given."""
        if self.token is not None:
            return self.token.get_secret_value().strip()
        assert self.token_file is not None
        return self.token_file.read_text().strip()


class Timeouts(StrictModel):
    connect: float = Field(default=5.0, gt=0)
    read: float = Field(default=30.0, gt=0)
    # Wall time one site may take for one round (or visit) before it is left out.
    round: float = Field(default=3600.0, gt=0)
    evaluation: float = Field(default=1800.0, gt=0)


class Retries(StrictModel):
    # Attempts per request (1: no retry) on connection errors and 5xx answers; never on 4xx.
    attempts: int = Field(default=5, ge=1, le=50)
    backoff: float = Field(default=0.5, ge=0)
    max_backoff: float = Field(default=10.0, ge=0)


class RelayTls(StrictModel):
    cert_file: Path
    key_file: Path
    # With it, a site must present a client certificate this CA signed (mutual TLS).
    client_ca_file: Path | None = None


def check_listen(v: str) -> str:
    """HOST:PORT where the relay listens (IPv6 in brackets: [::1]:8700); port 0 takes any free
    port, which only a test that asks the server for its port can use."""
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"must be HOST:PORT with a port 0-65535, got {v!r}")
    return v


def split_listen(v: str) -> tuple[str, int]:
    host, _, port = check_listen(v).rpartition(":")
    return host.strip("[]"), int(port)


class RelayLimits(StrictModel):
    """The relay protocol's timings and sizes: the register answer carries them to the agent,
    and a federation file's `relay:` section sets them (`RelaySettings`)."""

    heartbeat_s: float = Field(default=30.0, gt=0)
    lease_s: float = Field(default=90.0, gt=0)
    chunk_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    max_wait_s: float = Field(default=25.0, ge=0, le=300)
    max_requeues: int = Field(default=3, ge=0, le=100)
    # Files of an ended task (its update; weights no other task needs) are deleted after this.
    keep_files_s: float = Field(default=7 * 24 * 3600.0, gt=0)

    @model_validator(mode="after")
    def _lease_outlives_heartbeat(self) -> RelayLimits:
        if self.lease_s <= self.heartbeat_s:
            raise ValueError(
                f"lease_s ({self.lease_s:g}) must be longer than heartbeat_s ({self.heartbeat_s:g}), "
                "or every lease expires between two heartbeats"
            )
        return self


class RelaySettings(RelayLimits):
    """Where and how the coordinator serves the relay that pull sites connect to, and the
    protocol's limits it serves it with."""

    listen: str = "127.0.0.1:8700"
    dir: Path = Path("relay")
    database_url: str | None = None
    register_wait_s: float = Field(default=60.0, ge=0)
    tls: RelayTls | None = None

    @field_validator("listen")
    @classmethod
    def _listen_shape(cls, v: str) -> str:
        return check_listen(v)


class Federation(StrictModel):
    agents: list[AgentEntry] = Field(min_length=1)
    # Sites that never train: they only evaluate models (data the federation never saw).
    outside: list[AgentEntry] = Field(default_factory=list)
    min_sites: int = Field(default=1, ge=1)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    retries: Retries = Field(default_factory=Retries)
    poll_interval: float = Field(default=1.0, gt=0, le=60)
    # A status request waits at the agent up to this long for the job to stop (a long poll,
    # agent.jobs.ends): the coordinator learns of the end at once and sends one request per
    # wait instead of one per poll_interval. 0 polls plainly. It also bounds how late a
    # stopping coordinator notices that it should cancel its sites' jobs.
    status_wait: float = Field(default=5.0, ge=0, le=30)
    relay: RelaySettings | None = None

    # Set by load_federation: the file this came from (not a YAML key).
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _consistent(self) -> Federation:
        seen: set[str] = set()
        for agent in [*self.agents, *self.outside]:
            if agent.name in seen:
                raise ValueError(f"agent name {agent.name!r} appears twice")
            seen.add(agent.name)
        if self.status_wait and self.status_wait >= self.timeouts.read:
            raise ValueError(
                f"status_wait ({self.status_wait:g} s) must be shorter than timeouts.read "
                f"({self.timeouts.read:g} s): a status request waits that long for its answer"
            )
        if self.min_sites > len(self.agents):
            raise ValueError(f"min_sites is {self.min_sites} but only {len(self.agents)} agent(s) are listed")
        pull = self.pull_names
        if pull and self.relay is None:
            raise ValueError(
                f"pull site(s) {', '.join(pull)} need a 'relay:' section (where the coordinator serves "
                "the relay they connect to), e.g. relay: {listen: 0.0.0.0:8700, dir: relay}"
            )
        return self

    def agent(self, name: str) -> AgentEntry:
        for entry in [*self.agents, *self.outside]:
            if entry.name == name:
                return entry
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.agents]

    @property
    def outside_names(self) -> list[str]:
        return [a.name for a in self.outside]

    @property
    def pull_names(self) -> list[str]:
        """The sites that connect to the relay (training and outside sites alike)."""
        return [a.name for a in [*self.agents, *self.outside] if a.pull]


def _resolve_and_check(fed: Federation, base: Path, where: str) -> None:
    problems: list[str] = []

    def fix(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    entries = [("agents", i, a) for i, a in enumerate(fed.agents)]
    entries += [("outside", i, a) for i, a in enumerate(fed.outside)]
    for group, i, agent in entries:
        for key in ("token_file", "ca_file", "client_cert", "client_key"):
            value = getattr(agent, key)
            if value is None:
                continue
            path = fix(value)
            setattr(agent, key, path)
            if not path.is_file():
                problems.append(f"{group}[{i}].{key}: file does not exist: {path}")
            elif key == "token_file" and not path.read_text().strip():
                problems.append(f"{group}[{i}].token_file: file is empty: {path}")
    relay = fed.relay
    if relay is not None:
        relay.dir = fix(relay.dir)
        if relay.tls is not None:
            for key in ("cert_file", "key_file", "client_ca_file"):
                value = getattr(relay.tls, key)
                if value is None:
                    continue
                path = fix(value)
                setattr(relay.tls, key, path)
                if not path.is_file():
                    problems.append(f"relay.tls.{key}: file does not exist: {path}")
    if problems:
        raise FederationError(f"{where}: " + f"\n{where}: ".join(problems))


def parse_federation(raw: Any, *, source: Path | None = None) -> Federation:
    """Validate an already-parsed federation document; relative paths are resolved against SOURCE."""
    where = str(source) if source else "federation"
    if not isinstance(raw, dict):
        got = "nothing" if raw is None else type(raw).__name__
        raise FederationError(f"{where}: the top level must be a mapping with an 'agents' list, got {got}")
    try:
        fed = Federation.model_validate(raw)
    except ValidationError as exc:
        raise FederationError(format_validation_error(exc, where)) from None
    fed.source = source
    _resolve_and_check(fed, source.parent.resolve() if source else Path.cwd(), where)
    return fed


def load_federation(path: str | Path) -> Federation:
    """Read and validate a federation file."""
    path = Path(path)
    if not path.is_file():
        raise FederationError(f"{path}: federation file does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise FederationError(f"{path}: not valid YAML: {exc}") from None
    return parse_federation(raw, source=path)


def write_federation(path: Path, agents: list[dict[str, Any]], *, min_sites: int = 1, **extra: Any) -> Path:
    """Write a federation file (used by `fedsite demo` and the benchmarks); validated on the way."""
    doc: dict[str, Any] = {"agents": agents, "min_sites": min_sites, **extra}
    parse_federation(yaml.safe_load(yaml.safe_dump(doc)), source=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
