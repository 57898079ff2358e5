"""TLS for the agent: certificates for small deployments, the server's TLS settings, and the
mutual-TLS gate that checks a client certificate's subject against the config's allow-list.

Why the subject check lives in the application and not in the TLS handshake: a refused
client must leave a trace in the audit log, and a handshake failure never reaches the
application. So with ``api.tls.client_ca_file`` set, the TLS layer *asks* for a client
certificate (``CERT_OPTIONAL``) and rejects any certificate not signed by that CA during the
handshake; the gate below then refuses, with 403 and an ``api.refused`` audit event, every
request that came without a certificate or with a subject outside
``api.tls.allowed_client_subjects``. ``/v1/health`` stays open (it says only "ok"), so that
container health probes need no key material. A certificate from a foreign CA fails the
handshake itself and is only visible in the server log.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import os
import re
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, Protocol

import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.config import ConfigError, TlsConfig, load_config

log = logging.getLogger("fedsite.tls")

DEFAULT_CONFIG = Path("/etc/fedsite/config.yaml")
# Paths reachable without a client certificate (and without a token): liveness only.
UNGATED_PATHS = frozenset({"/v1/health"})
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DNS_RE = re.compile(
    r"(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*"
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class TlsError(ValueError):
    """TLS material that cannot be used; the message names the file or the config key."""


class AuditSink(Protocol):
    def append(self, action: str, *, actor: str, details: dict[str, Any]) -> Any: ...


# --------------------------------------------------------------------------- loading


def load_certificate(path: Path) -> x509.Certificate:
    """The first PEM certificate in PATH."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"{path}: cannot read certificate: {exc.strerror or exc}") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise TlsError(f"{path}: not a PEM certificate: {exc}") from None


def load_certificates(path: Path) -> list[x509.Certificate]:
    """Every PEM certificate in PATH (a CA bundle); at least one."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"{path}: cannot read certificate: {exc.strerror or exc}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TlsError(f"{path}: not a PEM certificate bundle: {exc}") from None
    return certs


def load_private_key(path: Path) -> Any:
    """An unencrypted PEM private key (the agent starts unattended, so no passphrase)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"{path}: cannot read private key: {exc.strerror or exc}") from None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TlsError(f"{path}: the private key is encrypted; the agent needs an unencrypted key") from None
    except ValueError as exc:
        raise TlsError(f"{path}: not a PEM private key: {exc}") from None


def _public_bytes(key_or_cert: Any) -> bytes:
    """The DER public key of a private key or of a certificate (to check that they pair)."""
    return bytes(
        key_or_cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _check_validity(cert: x509.Certificate, path: Path, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise TlsError(f"{path}: certificate is not valid before {cert.not_valid_before_utc.isoformat()}")
    if now > cert.not_valid_after_utc:
        raise TlsError(f"{path}: certificate expired on {cert.not_valid_after_utc.isoformat()}")


def check_tls_files(tls: TlsConfig, *, now: dt.datetime | None = None) -> x509.Certificate:
    """Check the configured TLS material before the server starts: readable, the key matches
    the certificate, the certificate is within its validity, the client CA loads and every
    allowed subject parses. Returns the server certificate."""
    now = now or dt.datetime.now(dt.UTC)
    cert = load_certificate(tls.cert_file)
    key = load_private_key(tls.key_file)
    if _public_bytes(key) != _public_bytes(cert):
        raise TlsError(
            f"api.tls.key_file: {tls.key_file} is not the key of api.tls.cert_file {tls.cert_file}"
        )
    _check_validity(cert, tls.cert_file, now)
    if tls.client_ca_file is not None:
        for ca in load_certificates(tls.client_ca_file):
            _check_validity(ca, tls.client_ca_file, now)
    for i, subject in enumerate(tls.allowed_client_subjects):
        try:
            parse_subject(subject)
        except ValueError as exc:
            raise TlsError(f"api.tls.allowed_client_subjects[{i}]: {exc}") from None
    if tls.allowed_client_subjects and tls.client_ca_file is None:
        raise TlsError("api.tls.allowed_client_subjects is set but api.tls.client_ca_file is not: set both")
    return cert


# --------------------------------------------------------------------------- contexts


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """The agent's server context: TLS 1.2 or later; with a client CA, clients are asked for a
    certificate that must chain to it (absence is handled by the application gate)."""
    check_tls_files(tls)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except ssl.SSLError as exc:
        raise TlsError(f"api.tls: cannot use {tls.cert_file} with {tls.key_file}: {exc}") from None
    if tls.client_ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(tls.client_ca_file))
        except ssl.SSLError as exc:
            raise TlsError(f"api.tls.client_ca_file: {tls.client_ca_file}: {exc}") from None
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_ssl_context(
    ca_file: Path | None, client_cert: Path | None = None, client_key: Path | None = None
) -> ssl.SSLContext:
    """A client context that trusts CA_FILE (the system store when None) and presents
    CLIENT_CERT/CLIENT_KEY for mutual TLS when given."""
    if (client_cert is None) != (client_key is None):
        raise TlsError("client_cert and client_key must be given together")
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert is not None and client_key is not None:
        load_private_key(client_key)
        try:
            ctx.load_cert_chain(str(client_cert), str(client_key))
        except ssl.SSLError as exc:
            raise TlsError(f"{client_cert}: cannot use with {client_key}: {exc}") from None
    return ctx


# --------------------------------------------------------------------------- subjects


def parse_subject(text: str) -> frozenset[tuple[str, str]]:
    """An RFC 4514 subject ("CN=coordinator,O=Consortium") as a set of (OID, value) pairs, so
    that attribute order and letter case of attribute names do not matter."""
    if not text.strip():
        raise ValueError("empty subject")
    try:
        name = x509.Name.from_rfc4514_string(_upper_attribute_types(text.strip()))
    except ValueError as exc:
        raise ValueError(f"not an RFC 4514 subject {text!r}: {exc}") from None
    return _name_pairs(name)


def _upper_attribute_types(text: str) -> str:
    """RFC 4514 attribute types are case-insensitive ("cn=x" is "CN=x"); the parser is not."""
    out: list[str] = []
    in_type, escaped = True, False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_type and ch == "=":
            in_type = False
        elif not in_type and ch in ",+":
            in_type = True
        out.append(ch.upper() if in_type else ch)
    return "".join(out)


def _name_pairs(name: x509.Name) -> frozenset[tuple[str, str]]:
    return frozenset((attr.oid.dotted_string, str(attr.value)) for attr in name)


def subject_allowed(subject: x509.Name, allowed: list[str]) -> bool:
    """True when SUBJECT equals one of ALLOWED (an empty list allows any subject)."""
    if not allowed:
        return True
    pairs = _name_pairs(subject)
    return any(pairs == parse_subject(entry) for entry in allowed)


class ClientCertGate:
    """ASGI wrapper for one TLS connection: exposes the peer certificate in the scope's
    ``tls`` extension and, when mutual TLS is on, refuses requests without an allowed one."""

    def __init__(
        self,
        app: ASGIApp,
        peer_der: bytes | None,
        *,
        enforce: bool,
        allowed: list[str],
        audit: AuditSink | None,
    ) -> None:
        self.app = app
        self.enforce = enforce
        self.allowed = allowed
        self.audit = audit
        self.peer_der = peer_der
        self.subject: x509.Name | None = None
        self.subject_text: str | None = None
        if peer_der is not None:
            self.subject = x509.load_der_x509_certificate(peer_der).subject
            self.subject_text = self.subject.rfc4514_string()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        extensions = scope.setdefault("extensions", {})
        extensions["tls"] = {
            "client_cert_name": self.subject_text,
            "client_cert_der": self.peer_der,
            "client_cert_error": None,
        }
        if not self.enforce or scope.get("path") in UNGATED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.subject is None:
            await self._refuse(scope, send, "no client certificate", "client certificate required")
            return
        if not subject_allowed(self.subject, self.allowed):
            await self._refuse(
                scope,
                send,
                "client certificate subject not allowed",
                f"client certificate subject not allowed: {self.subject_text}",
            )
            return
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, send: Send, reason: str, detail: str) -> None:
        client = scope.get("client")
        details = {
            "reason": reason,
            "subject": self.subject_text,
            "method": scope.get("method"),
            "path": scope.get("path"),
            "client": client[0] if client else None,
        }
        log.warning(
            "refused %s %s from %s: %s", details["method"], details["path"], details["client"], detail
        )
        if self.audit is not None:
            actor = f"tls:{self.subject_text}" if self.subject_text else "anonymous"
            try:
                await asyncio.to_thread(self.audit.append, "api.refused", actor=actor, details=details)
            except Exception:
                # The refusal stands even when the audit database is unavailable.
                log.exception("could not audit a refused client certificate")
        body = json.dumps({"detail": detail}).encode()
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _peer_der(transport: Any) -> bytes | None:
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return bytes(der) if der else None


def gated_protocol_class(tls: TlsConfig, audit: AuditSink | None) -> type:
    """A uvicorn HTTP protocol class that wraps the app in a ClientCertGate per connection
    (the peer certificate is fixed for a connection's lifetime)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    enforce = tls.client_ca_file is not None
    allowed = list(tls.allowed_client_subjects)

    class GatedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[valid-type,misc]
        app: Any

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.app = ClientCertGate(
                self.app, _peer_der(transport), enforce=enforce, allowed=allowed, audit=audit
            )

    return GatedHTTPProtocol


def uvicorn_ssl_kwargs(tls: TlsConfig | None, audit: AuditSink | None = None) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config``/``uvicorn.run`` that serve HTTPS from the
    config's certificate and, with ``client_ca_file``, enforce mutual TLS. Refusals are
    written to AUDIT as ``api.refused`` events. Empty for plain HTTP (``tls`` is None).
    Raises TlsError naming the file or key when the TLS material cannot be used."""
    if tls is None:
        return {}
    context = server_ssl_context(tls)

    def factory(config: Any, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return context

    return {
        "ssl_certfile": str(tls.cert_file),
        "ssl_keyfile": str(tls.key_file),
        "ssl_context_factory": factory,
        "http": gated_protocol_class(tls, audit),
    }


# --------------------------------------------------------------------------- health probe


def probe_health(config_path: str | Path = DEFAULT_CONFIG, *, timeout: float = 5.0) -> int:
    """Container health check: GET /v1/health on the configured port over HTTP or HTTPS.
    Returns a process exit status (0 healthy). Loopback only, so the server certificate is
    not verified (its names are the site's public ones) and no credential is sent."""
    try:
        cfg = load_config(config_path, check_paths=False)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    host = cfg.api.host
    if host in ("0.0.0.0", ""):  # noqa: S104 - the wildcard is what we translate away from
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if cfg.api.tls is not None else "http"
    url = f"{scheme}://{host}:{cfg.api.port}/v1/health"
    context = None
    if scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:  # noqa: S310 - fixed scheme
            body = json.loads(resp.read() or b"{}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    if body.get("status") != "ok":
        print(f"{url}: unhealthy: {body}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- issuing


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey, force: bool) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    if force and path.exists():
        path.unlink()
    # Created 0600 from the start: the key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _write_public(path: Path, cert: x509.Certificate, force: bool) -> None:
    if force and path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: Any, days: int, now: dt.datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        # A few minutes back, so that a peer whose clock lags slightly accepts it at once.
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def create_ca(
    site_id: str, days: int, now: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsite"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"fedsite {site_id} CA"),
        ]
    )
    cert = (
        _builder(name, name, key.public_key(), days, now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName],
    days: int,
    now: dt.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    builder = (
        _builder(subject, ca_cert.subject, key.public_key(), days, now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def parse_hosts(text: str) -> list[x509.GeneralName]:
    """Comma-separated host names and IP addresses as subject alternative names."""
    names: list[x509.GeneralName] = []
    for raw in text.split(","):
        host = raw.strip()
        if not host:
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if not _DNS_RE.fullmatch(host.lstrip("*.")):
            raise ValueError(f"--hosts: {host!r} is neither an IP address nor a DNS name")
        names.append(x509.DNSName(host))
    if not names:
        raise ValueError("--hosts: at least one host name or IP address is needed")
    return names


def _split_names(values: list[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        out.extend(v.strip() for v in value.split(",") if v.strip())
    return out


def init_certificates(
    outdir: Path,
    *,
    site_id: str,
    hosts: str = "localhost,127.0.0.1",
    clients: list[str] | None = None,
    days: int = 825,
    ca_days: int = 3650,
    force: bool = False,
    now: dt.datetime | None = None,
) -> dict[str, Path]:
    """Create (or reuse) a site CA in OUTDIR and issue a server certificate and client
    certificates from it. Layout::

        OUTDIR/ca.crt, ca.key                 the site CA; keep ca.key off the agent's host
        OUTDIR/agent/server.crt, server.key   mount into the agent (with agent/ca.crt)
        OUTDIR/agent/ca.crt                   the client CA for mutual TLS
        OUTDIR/clients/NAME.crt, NAME.key     one per client (CN=NAME), e.g. the coordinator

    Existing certificates are never overwritten unless FORCE; an existing CA is reused, so
    that adding a client does not invalidate what was handed out. Returns the written paths.
    """
    if not _NAME_RE.fullmatch(site_id):
        raise ValueError(f"--site-id: {site_id!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if days <= 0 or ca_days <= 0:
        raise ValueError("--days and --ca-days must be positive")
    sans = parse_hosts(hosts)
    client_names = _split_names(clients or [])
    for name in client_names:
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"--client: {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if len(set(client_names)) != len(client_names):
        raise ValueError("--client: a name is given twice")
    now = now or dt.datetime.now(dt.UTC)

    ca_crt, ca_key_path = outdir / "ca.crt", outdir / "ca.key"
    server_dir, clients_dir = outdir / "agent", outdir / "clients"
    leaf_files = [server_dir / "server.crt", server_dir / "server.key", server_dir / "ca.crt"]
    for name in client_names:
        leaf_files += [clients_dir / f"{name}.crt", clients_dir / f"{name}.key"]
    if not force:
        existing = [p for p in leaf_files if p.exists()]
        if existing:
            raise FileExistsError(f"{existing[0]}: exists; pass --force to issue new certificates")
    if ca_crt.exists() != ca_key_path.exists():
        present = ca_crt if ca_crt.exists() else ca_key_path
        raise FileExistsError(f"{present}: exists without its pair (ca.crt and ca.key go together)")

    for folder in (outdir, server_dir, clients_dir if client_names else None):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if ca_crt.exists():
        ca_cert = load_certificate(ca_crt)
        ca_key = load_private_key(ca_key_path)
        if _public_bytes(ca_key) != _public_bytes(ca_cert):
            raise TlsError(f"{ca_key_path} is not the key of {ca_crt}")
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise TlsError(f"{ca_key_path}: expected the EC key that `fedsite certs init` creates")
    else:
        ca_key, ca_cert = create_ca(site_id, ca_days, now)
        _write_private(ca_key_path, ca_key, force=False)
        _write_public(ca_crt, ca_cert, force=False)
        written["ca_cert"], written["ca_key"] = ca_crt, ca_key_path

    first = sans[0].value
    server_subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsite"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, site_id),
            x509.NameAttribute(NameOID.COMMON_NAME, str(first)),
        ]
    )
    key, cert = _leaf(ca_key, ca_cert, server_subject, ExtendedKeyUsageOID.SERVER_AUTH, sans, days, now)
    _write_private(server_dir / "server.key", key, force)
    _write_public(server_dir / "server.crt", cert, force)
    _write_public(server_dir / "ca.crt", ca_cert, force)
    written["server_cert"], written["server_key"] = server_dir / "server.crt", server_dir / "server.key"
    written["client_ca"] = server_dir / "ca.crt"
    for name in client_names:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        key, cert = _leaf(ca_key, ca_cert, subject, ExtendedKeyUsageOID.CLIENT_AUTH, [], days, now)
        _write_private(clients_dir / f"{name}.key", key, force)
        _write_public(clients_dir / f"{name}.crt", cert, force)
        written[f"client:{name}:cert"] = clients_dir / f"{name}.crt"
        written[f"client:{name}:key"] = clients_dir / f"{name}.key"
    return written


# --------------------------------------------------------------------------- CLI

certs_app = typer.Typer(help="TLS certificates for the agent's API.", no_args_is_help=True)


@certs_app.command("init")
def init_command(
    outdir: Path = typer.Argument(..., help="Folder for the CA, the server and the client certificates."),
    site_id: str = typer.Option(..., "--site-id", help="The site's id (config site.id)."),
    hosts: str = typer.Option(
        "localhost,127.0.0.1", "--hosts", help="Comma-separated DNS names and IPs the agent is reached at."
    ),
    client: list[str] = typer.Option(
        [], "--client", help="Issue a client certificate with CN=NAME (repeat, or comma-separate)."
    ),
    days: int = typer.Option(825, "--days", help="Validity of the server and client certificates."),
    ca_days: int = typer.Option(3650, "--ca-days", help="Validity of a newly created CA."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing server and client certificates."),
) -> None:
    """Create a site CA, a server certificate and client certificates (test or small
    deployments; a hospital PKI can issue the same files instead). Keys are written 0600."""
    try:
        written = init_certificates(
            outdir, site_id=site_id, hosts=hosts, clients=client, days=days, ca_days=ca_days, force=force
        )
    except (ValueError, FileExistsError, OSError) as exc:
        typer.echo(f"certs init: {exc}", err=True)
        raise typer.Exit(2) from None
    for label, path in written.items():
        typer.echo(f"{label}: {path}")
    names = _split_names(client)
    agent_dir = outdir / "agent"
    typer.echo("\n# agent config (paths as the agent sees them):")
    typer.echo("api:\n  tls:")
    typer.echo(f"    cert_file: {agent_dir / 'server.crt'}\n    key_file: {agent_dir / 'server.key'}")
    if names:
        typer.echo(f"    client_ca_file: {agent_dir / 'ca.crt'}")
        typer.echo(f"    allowed_client_subjects: {json.dumps([f'CN={n}' for n in names])}")
        typer.echo("\n# federation file, for this agent:")
        typer.echo(f"    ca_file: {outdir / 'ca.crt'}")
        typer.echo(f"    client_cert: {outdir / 'clients' / (names[0] + '.crt')}")
        typer.echo(f"    client_key: {outdir / 'clients' / (names[0] + '.key')}")


@certs_app.command("show")
def show_command(
    cert_file: Path = typer.Argument(..., help="A PEM certificate."),
) -> None:
    """Print a certificate's subject (the string for allowed_client_subjects), issuer, names,
    validity and SHA-256 fingerprint."""
    try:
        cert = load_certificate(cert_file)
    except TlsError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    try:
        sans = [
            str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ]
    except x509.ExtensionNotFound:
        sans = []
    typer.echo(f"subject: {cert.subject.rfc4514_string()}")
    typer.echo(f"issuer: {cert.issuer.rfc4514_string()}")
    typer.echo(f"names: {', '.join(sans) if sans else '-'}")
    typer.echo(f"valid: {cert.not_valid_before_utc.isoformat()} .. {cert.not_valid_after_utc.isoformat()}")
    typer.echo(f"sha256: {cert.fingerprint(hashes.SHA256()).hex()}")
