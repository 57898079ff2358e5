"""SSL contexts: the agent's server context, a client context for the coordinator and tests,
and the keyword arguments that make uvicorn serve HTTPS with the server context.

With ``api.tls.client_ca_file`` set the server context *asks* for a client certificate
(``CERT_OPTIONAL``) and rejects any certificate not signed by that CA during the handshake.
Absence of a certificate and subjects outside the allow-list are refused later, per request,
by the mutual-TLS gate in `agent.api.middleware`: a refusal must leave a trace in the audit
log, and a handshake failure never reaches the application.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import TlsConfig
from agent.errors import TlsError
from agent.tls.files import check_tls_files, load_private_key


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


def uvicorn_ssl_kwargs(tls: TlsConfig | None) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config``/``uvicorn.run`` that serve HTTPS with
    `server_ssl_context` (empty for plain HTTP, when ``tls`` is None). The per-request gate
    is added by the API (`agent.api.server.tls_options`). Raises TlsError naming the file or
    key when the TLS material cannot be used."""
    if tls is None:
        return {}
    context = server_ssl_context(tls)

    def factory(config: Any, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return context

    return {
        "ssl_certfile": str(tls.cert_file),
        "ssl_keyfile": str(tls.key_file),
        "ssl_context_factory": factory,
    }
