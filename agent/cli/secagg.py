"""`fedsite secagg`: the site's long-term secure-aggregation signing key.

`keygen PATH` writes a new Ed25519 key (PEM, mode 0600, never over an existing one) and
prints its public key; `public-key` prints the public key of an existing one, from `--key`
or from the config's `secure_aggregation.site_key_file`. The public key (base64 of 32 bytes)
is what the consortium pins: in every site's `secure_aggregation.peers` and in the
coordinator's federation file (`secagg_public_key`). The private key never leaves the site.
Exit codes: 0 success, 1 a refused operation (a key already there), 2 a file that cannot be used.
"""

from __future__ import annotations

from pathlib import Path

import typer

from agent.cli.common import fail, load
from agent.errors import SecAggError
from agent.exchange.secagg.primitives import generate_site_key, load_site_key, public_key_b64, write_site_key

secagg_app = typer.Typer(help="Secure aggregation: the site's signing key.", no_args_is_help=True)


@secagg_app.command("keygen")
def secagg_keygen(
    path: Path = typer.Argument(..., help="Where to write the key, e.g. /etc/fedsite/secagg.key."),
) -> None:
    """Create the site's signing key (0600) and print its public key as the last line."""
    key = generate_site_key()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_site_key(path, key)
    except SecAggError as exc:
        fail(f"error: {exc}", 1)
    except OSError as exc:
        fail(f"error: {path}: cannot write the key: {exc.strerror}", 2)
    typer.echo(
        f"Wrote the signing key to {path}. Set secure_aggregation.site_key_file to it, and give "
        "every site and the coordinator this public key:"
    )
    typer.echo(public_key_b64(key))


@secagg_app.command("public-key")
def secagg_public_key(
    key: Path | None = typer.Option(None, "--key", help="The key file (default: the config's)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Path to the agent's config.yaml."),
) -> None:
    """Print the public key (base64 of 32 bytes) of the site's signing key."""
    if (key is None) == (config is None):
        fail("error: give exactly one of --key and --config", 2)
    if key is None:
        assert config is not None
        key = load(config).secure_aggregation.site_key_file
        if key is None:
            fail(f"error: {config}: secure_aggregation.site_key_file is not set", 2)
    try:
        typer.echo(public_key_b64(load_site_key(key)))
    except SecAggError as exc:
        fail(f"error: {exc}", 2)
