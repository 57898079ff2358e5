"""Issuing certificates for test and small deployments: a site CA, the agent's server
certificate and client certificates (e.g. the coordinator's), all P-256.

A hospital PKI can issue the same files instead; the agent only reads them (`agent.tls.files`).
Keys are written 0600 from the moment they exist, and nothing is overwritten unless asked.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import TlsError
from agent.tls.files import load_certificate, load_private_key, public_key_der

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DNS_RE = re.compile(
    r"(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*"
)


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
    """A new self-signed site CA that may sign leaf certificates only (path length 0)."""
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


def split_names(values: list[str]) -> list[str]:
    """Client names from repeated and comma-separated ``--client`` values, in order."""
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
    client_names = split_names(clients or [])
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
        if public_key_der(ca_key) != public_key_der(ca_cert):
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
