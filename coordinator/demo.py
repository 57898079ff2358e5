"""`fedsite demo`: a whole federation on this machine, end to end, in a few minutes.

Generates made-up sites, gives each a coordinator token, starts one agent per site on a
loopback port, runs FedAvg through them over HTTP with live progress, prints the Dice per
round and where everything was written, and verifies every site's audit chain. Every agent
it started is stopped on the way out, also on an error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from coordinator.errors import AgentError, DemoError, FederationError, LocalAgentError, RoundFailed, RunError
from coordinator.federation import load_federation, write_federation
from coordinator.local import LocalFederation, create_token, run_fedsite, terminate_on_sigterm, write_secret
from coordinator.options import RunOptions
from coordinator.report import Reporter, print_outputs, print_text
from coordinator.runner import RunResult, run_strategy

MARKER = ".fedsite-demo"
DEFAULT_SUBJECTS = (8, 6, 4)
DEMO_PLAN_OVERRIDES: dict[str, Any] = {
    "local_epochs": 2,
    "batch_size": 8,
    "optimizer": {"name": "adam", "lr": 0.01},
}


@dataclass
class DemoResult:
    out_dir: Path
    result: RunResult
    audit_databases: dict[str, str]
    audit_reports: dict[str, str]
    duration_s: float


def subject_counts(sites: int, subjects: str | None) -> list[int]:
    if subjects is None:
        return [
            DEFAULT_SUBJECTS[i] if i < len(DEFAULT_SUBJECTS) else DEFAULT_SUBJECTS[-1] for i in range(sites)
        ]
    try:
        counts = [int(x) for x in subjects.split(",") if x.strip()]
    except ValueError:
        raise DemoError(
            f"--subjects-per-site: {subjects!r} is not a comma-separated list of numbers"
        ) from None
    if len(counts) == 1:
        counts *= sites
    if len(counts) != sites:
        raise DemoError(f"--subjects-per-site lists {len(counts)} numbers for {sites} site(s)")
    if any(n < 2 for n in counts):
        raise DemoError(
            "--subjects-per-site: every site needs at least 2 subjects (one to train, one to validate)"
        )
    return counts


def prepare_out(out: Path) -> None:
    """OUT must be new, empty, or an earlier demo's folder (which is then replaced)."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise DemoError(
                f"{out}: folder is not empty and was not written by `fedsite demo`; choose another --out"
            )
        for name in ("results", "logs"):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `fedsite demo`; the next `fedsite demo --out` here replaces it\n")


def run_demo(
    out: Path,
    *,
    sites: int = 3,
    rounds: int = 3,
    subjects: str | None = None,
    size: int = 32,
    seed: int = 0,
    console: Console | None = None,
) -> DemoResult:
    console = console or Console()
    out = out.expanduser().resolve()
    counts = subject_counts(sites, subjects)
    t0 = time.monotonic()
    prepare_out(out)
    with terminate_on_sigterm():
        layout = _generate(console, out, sites=sites, counts=counts, size=size, seed=seed)
        _tokens(console, layout)
        console.rule(f"[bold]3. Starting {sites} agents on loopback ports")
        local = LocalFederation(out / "logs")
        try:
            try:
                agents = local.start_many({s.site_id: s.config_path for s in layout.sites})
            except LocalAgentError as exc:
                raise DemoError(f"starting the agents: {exc}") from None
            for s in layout.sites:
                print_text(
                    console, f"{s.site_id}: {agents[s.site_id].url}  (log: {agents[s.site_id].log_path})"
                )
            result = _federate(console, out, layout, agents, rounds=rounds)
        finally:
            console.print("stopping the agents")
            local.stop()
    audit_dbs, reports = _verify_audit(console, layout)
    duration = time.monotonic() - t0
    _summary(console, out, result, audit_dbs, duration)
    return DemoResult(out, result, audit_dbs, reports, duration)


def _generate(console: Console, out: Path, *, sites: int, counts: list[int], size: int, seed: int) -> Any:
    from agent.errors import SyntheticDataError
    from coordinator.demo_federation import generate_federation

    console.rule(
        f"[bold]1. Generating {sites} sites of made-up brain MRI ({', '.join(map(str, counts))} subjects)"
    )
    try:
        layout = generate_federation(
            out, sites=sites, subjects_per_site=counts, size=size, seed=seed, force=True
        )
    except SyntheticDataError as exc:
        raise DemoError(f"generating the data: {exc}") from None
    table = Table("site", "institution (made up)", "subjects", "data", box=None)
    for s in layout.sites:
        table.add_row(s.site_id, s.institution, str(len(s.subjects)), escape(str(s.data_dir)))
    console.print(table)
    return layout


def _tokens(console: Console, layout: Any) -> None:
    console.rule("[bold]2. Creating a coordinator token at each site")

    def one(site: Any) -> None:
        token = create_token(site.config_path, site=site.site_id)
        write_secret(site.token_file, token)

    try:
        with ThreadPoolExecutor(max_workers=len(layout.sites)) as pool:
            list(pool.map(one, layout.sites))
    except LocalAgentError as exc:
        raise DemoError(f"creating tokens: {exc}") from None
    for s in layout.sites:
        print_text(
            console, f"{s.site_id}: token stored in {s.token_file} (only its hash is in the site's database)"
        )


def _federate(console: Console, out: Path, layout: Any, agents: dict[str, Any], *, rounds: int) -> RunResult:
    from coordinator.weights import initial_weights

    results = out / "results"
    fed_path = write_federation(
        results / "federation.yaml",
        [
            {"name": s.site_id, "url": agents[s.site_id].url, "token_file": str(s.token_file)}
            for s in layout.sites
        ],
        min_sites=1,
        timeouts={"connect": 5, "read": 60, "round": 900, "evaluation": 600},
        retries={"attempts": 4, "backoff": 0.5, "max_backoff": 4},
        poll_interval=0.5,
    )
    plan = json.loads(Path(layout.plan_path).read_text())
    # A few rounds on a few subjects: a higher learning rate and two epochs per round let the
    # Dice climb visibly within the demo's budget.
    plan.update(DEMO_PLAN_OVERRIDES)
    plan["data"] = {**plan.get("data", {}), "samples_per_subject": 16}
    console.rule(f"[bold]4. FedAvg: {rounds} round(s) over {len(layout.sites)} sites")
    print_text(console, f"federation file: {fed_path}")
    console.print(
        f"plan: {layout.plan_path} with {json.dumps(DEMO_PLAN_OVERRIDES)}", highlight=False, markup=False
    )
    try:
        fed = load_federation(fed_path)
        return run_strategy(
            fed,
            plan,
            results,
            RunOptions(strategy="fedavg", rounds=rounds),
            initial_weights=initial_weights(plan),
            reporter=Reporter(console),
        )
    except (FederationError, AgentError, RunError, RoundFailed, ValueError) as exc:
        logs = ", ".join(str(a.log_path) for a in agents.values())
        raise DemoError(f"federated training: {exc}\n(agent logs: {logs})") from None


def _verify_audit(console: Console, layout: Any) -> tuple[dict[str, str], dict[str, str]]:
    from agent.config import load_config

    console.rule("[bold]5. Verifying each site's audit chain")
    dbs: dict[str, str] = {}
    reports: dict[str, str] = {}
    for s in layout.sites:
        dbs[s.site_id] = load_config(s.config_path).db_url
        try:
            text = run_fedsite("audit", "verify", "--config", str(s.config_path), site=s.site_id)
        except LocalAgentError as exc:
            raise DemoError(f"audit verification: {exc}") from None
        reports[s.site_id] = text.strip()
        print_text(console, f"{s.site_id}: {text.strip().splitlines()[-1] if text.strip() else 'OK'}")
    return dbs, reports


def _summary(console: Console, out: Path, result: RunResult, dbs: dict[str, str], duration: float) -> None:
    console.rule("[bold]Done")
    print_outputs(console, result)
    for site, url in dbs.items():
        print_text(console, f"audit database of {site}: {url.removeprefix('sqlite:///')}")
    print_text(console, f"agent logs:    {out / 'logs'}")
    console.print(f"demo took {duration:.0f} s")
