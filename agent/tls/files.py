"""Certificate and key files: loading them with errors that name the file, checking the
configured TLS material before the server starts, and parsing certificate subjects.

Subjects are parsed here rather than in the mutual-TLS gate because the config check needs
them too: an allow-list entry that does not parse must stop `fedsite serve` before it binds.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from agent.config import TlsConfig
from agent.errors import TlsError

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


def public_key_der(key_or_cert: Any) -> bytes:
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
    if public_key_der(key) != public_key_der(cert):
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


def describe_certificate(cert: x509.Certificate) -> dict[str, str]:
    """What an administrator needs to know of a certificate, in display order: the subject
    (the string for allowed_client_subjects), issuer, names, validity and SHA-256 fingerprint."""
    try:
        sans = [
            str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ]
    except x509.ExtensionNotFound:
        sans = []
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "names": ", ".join(sans) if sans else "-",
        "valid": f"{cert.not_valid_before_utc.isoformat()} .. {cert.not_valid_after_utc.isoformat()}",
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
    }


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
    return subject_pairs(name)


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


def subject_pairs(name: x509.Name) -> frozenset[tuple[str, str]]:
    """A certificate name as the (OID, value) pairs that `parse_subject` yields, for comparison."""
    return frozenset((attr.oid.dotted_string, str(attr.value)) for attr in name)
