"""`fedsite init SITE_DIR`: a new site folder in one step, asked for or given by flags.

Writing the folder is `agent.site_setup.write_site`; this module asks the questions (or reads
`--non-interactive` flags), prints what was written, the token (once) and the next steps, and
then checks the result with the same function the check command runs (`run_site_checks`).
Exit codes: 0 written and checked, 1 written but the check failed, 2 nothing usable written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, cast

import click
import typer
import typer.main

from agent.cli.common import cli_actor, fail
from agent.cli.config import config_app
from agent.errors import FedsiteError
from agent.site_setup import APPROVAL_MEANING, RUNTIMES, DatasetSpec, SiteSpec, SiteWritten, write_site

init_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

# The same check, in the agent's container (compose runtime: the config's paths are the
# container's, so the check must run there). Changes with `run_site_checks`.
CONTAINER_CHECK = "config check /etc/fedsite/config.yaml"
# Names that only this host (or the compose project) reaches.
LOOPBACK = ("127.0.0.1", "localhost", "::1", "agent")


def run_site_checks(config_path: Path) -> int:
    """Check a written site as the admin's own check does; returns its exit status.

    The one place where `fedsite init` checks what it wrote: the `config check` command itself,
    run in this process with its own option parsing and defaults, so that init and the admin's
    check never disagree, and whatever that command checks (the config, the dataset folders and
    the doctor's checks it shows) init checks too.
    """
    command = typer.main.get_command(config_app)
    # Typer makes a one-command app that command itself, a group once it has several.
    args = ["check", str(config_path)] if isinstance(command, click.Group) else [str(config_path)]
    try:
        status = command.main(args, prog_name="fedsite config check", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return int(status or 0)


def _split(values: list[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _ask(value: str | None, interactive: bool, prompt: str, flag: str, default: str | None = None) -> str:
    if value is not None:
        return value
    if interactive:
        return str(typer.prompt(prompt, default=default))
    if default is not None:
        return default
    fail(f"init: {flag} is required with --non-interactive", 2)


def _print_result(out: SiteWritten, spec: SiteSpec) -> None:
    site = out.site_dir
    typer.echo(f"Wrote site {site} ({out.subjects} subject(s) found in the data):")
    for label, key in (
        ("compose variables", "env"),
        ("agent config", "config"),
        ("agent TLS files", "server_cert"),
        ("for the coordinator", "handoff"),
    ):
        path = out.files[key]
        typer.echo(f"  {label + ':':<21}{path.parent if key == 'server_cert' else path}")
    typer.echo(f"  {'server names:':<21}{', '.join(out.hosts)}")
    typer.echo(f"  {'URL:':<21}{out.url}")
    if spec.bind in LOOPBACK and any(h not in LOOPBACK for h in out.hosts):
        # Names for other machines, but published on loopback only: the hand-off URL would fail.
        typer.echo(
            f"\nNote: the API is published on {spec.bind} only, so a coordinator on another machine "
            f"cannot reach {out.url}; set --bind (FEDSITE_BIND in .env) to the interface it reaches."
        )
    typer.echo(f"\nKeep {site / 'pki' / 'ca.key'} (the site CA's key) off the agent's host.")
    typer.echo(
        f"Hand the coordinator the files in {out.handoff_path.parent} (see HANDOFF.txt) over a channel you "
        "trust; the token is also in its .token file (mode 600)."
    )
    if spec.runtime == "compose":
        typer.echo(
            "\nNext, on the Docker host (docker-compose, or `docker compose` with Compose v2):\n"
            f"  sudo chown 10001 {site / 'tls' / 'server.key'}     # the agent's uid reads its key\n"
            f"  cp deploy/docker-compose*.yml deploy/.gitignore {site}/ && cd {site}\n"
            f"  docker-compose run --rm -T agent {CONTAINER_CHECK}\n"
            "  docker-compose up -d"
        )
    else:
        typer.echo(f"\nNext: fedsite serve --config {out.config_path}")
    typer.echo("\nThe coordinator's token, shown only this once (store it now):")
    typer.echo(out.token)


@init_app.command("init")
def init_command(
    site_dir: Path = typer.Argument(..., help="Folder to create the site in (must be missing or empty)."),
    non_interactive: bool = typer.Option(
        False, "--non-interactive", help="Ask nothing: take every answer from the flags (or their defaults)."
    ),
    site_id: str | None = typer.Option(None, "--site-id", help="The site's id, as the coordinator sees it."),
    site_name: str = typer.Option("", "--site-name", help="A readable name (default: the id)."),
    runtime: str = typer.Option(
        "compose",
        "--runtime",
        help="compose: paths as deploy/docker-compose.yml mounts them; local: this host.",
    ),
    data: Path | None = typer.Option(None, "--data", help="Folder with the imaging data (on this host)."),
    dataset_name: str = typer.Option("brain", "--dataset-name", help="The dataset's name in plans."),
    fmt: str = typer.Option("nifti", "--format", help="nifti or dicom."),
    modalities: list[str] = typer.Option(
        ["flair"], "--modality", help="Modality names (repeat or comma-separate)."
    ),
    images: str | None = typer.Option(
        None,
        "--images",
        help="Images pattern under the folder (default {subject}/{modality}.nii.gz; "
        "dicom: {subject}/{modality}).",
    ),
    label: str = typer.Option("{subject}/seg.nii.gz", "--label", help="Label pattern; '' for none."),
    target_labels: str = typer.Option(
        "1", "--target-labels", help="Label values that form the target, e.g. 1,2,4."
    ),
    demo_data: int = typer.Option(
        0,
        "--demo-data",
        min=0,
        max=50,
        help="Generate N made-up subjects in SITE_DIR/data instead of --data.",
    ),
    demo_size: int = typer.Option(
        64, "--demo-size", help="In-plane size of the generated images (multiple of 8)."
    ),
    hosts: list[str] = typer.Option(
        [],
        "--hosts",
        help="DNS names and IPs the coordinator reaches the agent at (the first is in the URL).",
    ),
    bind: str = typer.Option("127.0.0.1", "--bind", help="Interface the API is published on (FEDSITE_BIND)."),
    port: int = typer.Option(8443, "--port", help="Port the API is published on (FEDSITE_PORT)."),
    approval: str | None = typer.Option(None, "--approval", help="auto or manual (default manual)."),
    mutual_tls: bool = typer.Option(
        True,
        "--mutual-tls/--no-mutual-tls",
        help="Require the coordinator's client certificate (recommended).",
    ),
    image: str = typer.Option("fedsite:0.1.0", "--image", help="The agent's image (FEDSITE_IMAGE)."),
    force: bool = typer.Option(False, "--force", help="Write over the files of an existing site folder."),
    check: bool = typer.Option(True, "--check/--no-check", help="Check the written site (local runtime)."),
) -> None:
    """Write a site folder: compose variables (.env), the agent's config with its data path
    checked, TLS files (always valid for localhost, 127.0.0.1 and the compose service name), the
    first coordinator token and a hand-off folder for the coordinator; then check it."""
    interactive = not non_interactive
    if runtime not in RUNTIMES:
        fail(f"init: --runtime must be one of {', '.join(RUNTIMES)}", 2)
    sid = _ask(site_id, interactive, "Site id (letters, digits, '.', '_', '-')", "--site-id")
    dataset: DatasetSpec | None = None
    if data is None and demo_data == 0:
        answer = _ask(
            None, interactive, "Data folder (or 'demo' for generated data)", "--data or --demo-data"
        )
        if answer.strip().lower() == "demo":
            demo_data = int(typer.prompt("Subjects to generate", default=6))
        else:
            data = Path(answer)
    if data is not None:
        if demo_data:
            fail("init: give --data or --demo-data, not both", 2)
        pattern = images or ("{subject}/{modality}" if fmt == "dicom" else "{subject}/{modality}.nii.gz")
        if interactive and images is None:
            pattern = str(typer.prompt("Images pattern under the folder", default=pattern))
        if fmt not in ("nifti", "dicom"):
            fail("init: --format must be nifti or dicom", 2)
        try:
            targets = tuple(int(v) for v in _split([target_labels]))
        except ValueError:
            fail(f"init: --target-labels {target_labels!r}: whole numbers, comma-separated", 2)
        dataset = DatasetSpec(
            path=data,
            name=dataset_name,
            format=cast(Literal["nifti", "dicom"], fmt),
            modalities=tuple(_split(modalities)),
            images=pattern,
            label=label or None,
            target_labels=targets,
        )
    names = _split(hosts)
    if not names and interactive:
        names = _split(
            [typer.prompt("Names the coordinator reaches this agent at (comma-separated)", default="")]
        )
    policy = approval
    if policy is None and interactive:
        typer.echo(
            f"Approval policy: auto ({APPROVAL_MEANING['auto']}); manual ({APPROVAL_MEANING['manual']})."
        )
        policy = str(typer.prompt("Approval policy", default="manual"))
    policy = policy or "manual"
    if policy not in ("auto", "manual"):
        fail("init: --approval must be auto or manual", 2)
    spec = SiteSpec(
        site_dir=site_dir,
        site_id=sid,
        site_name=site_name,
        runtime=runtime,
        dataset=dataset,
        demo_subjects=demo_data,
        demo_size=demo_size,
        hosts=tuple(names),
        bind=bind,
        port=port,
        approval=cast(Literal["auto", "manual"], policy),
        mutual_tls=mutual_tls,
        image=image,
        force=force,
        actor=cli_actor(),
    )
    try:
        written = write_site(spec)
    except (FedsiteError, OSError) as exc:
        fail(f"init: {exc}", 2)
    # The check first, so that the token stays the last line printed (as `tokens add` prints it).
    status = run_site_checks(written.config_path) if check and runtime == "local" else 0
    _print_result(written, spec)
    if status != 0:
        typer.echo(
            "init: the site was written but its check failed (above); fix it and run the check again",
            err=True,
        )
        raise typer.Exit(1)
