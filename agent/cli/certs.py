"""`fedsite certs init` and `fedsite certs show`: a small site PKI, and what a certificate says.

The issuing itself is `agent.tls.issue`; this module parses options and prints the files it
wrote, with the config lines that use them.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from agent.errors import TlsError
from agent.tls.files import describe_certificate, load_certificate
from agent.tls.issue import init_certificates, split_names

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
    names = split_names(client)
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
    for label, value in describe_certificate(cert).items():
        typer.echo(f"{label}: {value}")
