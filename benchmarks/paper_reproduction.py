"""The reference study's comparison, end to end over HTTP: FL (FedAvg), CIIL, IIL against CDS.

Generates the 10-site data set with the study's institutional split (70, 27, 17, 12, 11, 9,
6, 6, 4, 3 patients; scaled down with --scale) plus two sites kept outside the federation,
starts one real agent per site (a `fedsite serve` subprocess on a loopback port, each with
its own SQLite database), and drives FL, CIIL and IIL through the coordinator. CDS (pooled
data) trains in this process on the union of the sites' training splits. Every final model
is evaluated by the agents (POST /v1/evaluations) on every federation site's validation
split and on the outside sites. All methods share the model, the plan and the epoch budget
N = R x E epochs over each site's data: R rounds of E local epochs (FL), N / C cycles of C
epochs per visit (CIIL), N epochs over the pooled data (CDS); IIL trains at each site until
the site's own validation Dice has not improved for `patience` epochs (at most N). N is
chosen so that every method has converged: the CDS curve (its models after N/4, N/2 and N
epochs) and the FL/CIIL curves per round are in results.json and the PNG.

Every round costs a little fixed time at the agents (HTTP, weights in and out, a job in the
agent's worker), so quick mode takes E = 10 local epochs per round (the study: 1). The
agents evaluate the final models; the per-round curves of FL and CIIL are computed in this
process from the saved models (--eval-every-round: FL's at the agents as well).

    python -m benchmarks.paper_reproduction --quick   # scale 0.2, 1 seed
    python -m benchmarks.paper_reproduction           # the full split, 3 seeds for CIIL and IIL
    python -m benchmarks.paper_reproduction --quick --methods fl --dp-epsilon 8   # FL with DP

With --dp-epsilon E, FL trains with DP-SGD at every site (plan privacy.dp, subject-level
sampling, `agent.training.dp`) and every site's config gets the privacy budget (E, 1e-5), which
its agent enforces. One noise multiplier for all sites is chosen so that the whole FL run costs
at most E at the site where it costs most (the site with the fewest training subjects, whose
sample rate is highest), with the sites' own accountant (RDP). Each FL run also reports the
membership-inference AUC of its final global model (loss-threshold attack, `agent.privacy.mia`):
every federation site's training subjects against their validation subjects.
    python -m benchmarks.paper_reproduction --fl-strategy fedavg,fednova,fedadam --methods fl,cds

``--fl-strategy`` runs FL with each of the named coordinator strategies (FedAvg and its server
optimisers: same rounds, same budget), each in its own row; ``--methods`` runs a subset. An
entry's ``keep_state=1`` keeps each site's Adam state from round to round of the run.

Prints a table like the study's and a JSON summary; writes OUT/results.json and PNGs.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from agent.training.plan import MAX_SEED
from benchmarks.pooled import SiteSplit, evaluate_in_process, fix_site_secret, site_splits, train_pooled
from coordinator.client import AgentClient
from coordinator.federation import Federation, load_federation, write_federation
from coordinator.local import LocalFederation, add_static_token, terminate_on_sigterm, write_secret
from coordinator.options import RunOptions
from coordinator.report import QuietReporter, Reporter, plot_dice_curves
from coordinator.runner import Coordinator, run_strategy, weighted_dice
from coordinator.weights import encode, initial_weights, load_file

# Dice of the reference study on its real 10-site split (Sheller et al. 2018/2020).
STUDY = {"CDS": 0.862, "FL": 0.852, "CIIL": 0.82, "IIL": 0.803}
METHODS = ("fl", "cds", "ciil", "iil")
# FedAvg and the strategies that keep its round (every site trains from the global model) and
# change only how the updates make the next model.
FL_STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fednova")


# The server optimisers' settings an --fl-strategy entry may give (RunOptions' fields).
SERVER_SETTINGS = ("server_lr", "server_momentum", "server_beta1", "server_beta2", "server_tau")
# An entry's setting for the sites: keep_state=1 carries each site's Adam state from round to
# round of the run (the plan's optimizer.keep_state), as CDS's one Adam carries its own.
KEEP_STATE = "keep_state"


def parse_fl_strategy(entry: str) -> tuple[str, dict[str, float]]:
    """One --fl-strategy entry, ``name`` or ``name:setting=value:...``: the name and its settings
    (the server optimiser's, and keep_state as 0 or 1)."""
    name, *pairs = entry.split(":")
    if name not in FL_STRATEGIES:
        raise ValueError(f"{entry!r}: {name!r} is not one of {', '.join(FL_STRATEGIES)}")
    settings: dict[str, float] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if key not in (*SERVER_SETTINGS, KEEP_STATE) or not eq:
            raise ValueError(
                f"{entry!r}: {pair!r} is not setting=value with one of "
                f"{', '.join((*SERVER_SETTINGS, KEEP_STATE))}"
            )
        try:
            settings[key] = float(value)
        except ValueError:
            raise ValueError(f"{entry!r}: {key}={value!r} is not a number") from None
        if key == KEEP_STATE and settings[key] not in (0.0, 1.0):
            raise ValueError(f"{entry!r}: {KEEP_STATE} is 0 or 1, not {value!r}")
    return name, settings


def fl_label(strategy: str) -> str:
    """The table's name for FL run with STRATEGY: "FL" for FedAvg (the study's), else "FL (entry)"."""
    return "FL" if strategy == "fedavg" else f"FL ({strategy})"


def fl_run_label(strategy: str) -> str:
    """The run's folder and id stem: FedAvg keeps its historical "fl"; settings become a suffix."""
    if strategy == "fedavg":
        return "fl"
    return "fl-" + strategy.replace(":", "-").replace("=", "")


@dataclass
class Settings:
    out: Path
    quick: bool
    scale: float
    size: int
    rounds: int
    local_epochs: int
    ciil_epochs: int
    seeds: list[int]
    patience: int
    max_epochs: int
    samples_per_subject: int
    batch_size: int
    lr: float
    extra_sites: int
    data_seed: int
    eval_every_round: bool
    # The coordinator strategies run as FL (fedavg and its server-optimiser variants); the
    # first is the table's "FL" row, the others "FL (<name>)" rows beside it.
    fl_strategies: list[str] = field(default_factory=lambda: ["fedavg"])
    # Which methods run (all by default); CDS always runs when a percentage of CDS is wanted.
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    # FL with DP-SGD at this total ε per site over the whole run (None: without DP).
    dp_epsilon: float | None = None
    dp_max_grad_norm: float = 1.0
    dp_subject_slices: int = 4
    # Each site derives its own noise from a per-round target ε (plan privacy.dp.target_epsilon)
    # instead of one noise multiplier for all sites.
    dp_per_site: bool = False
    # Each run samples (batches, crops, the epochs' seeds) with seed + this, while its initial
    # weights and CIIL/IIL site order still come from the seed: another draw of the data alone.
    sampling_seed_offset: int = 0

    @property
    def epochs_per_site(self) -> int:
        """The budget every method shares: epochs over each site's data (CDS: over the pool)."""
        return self.rounds * self.local_epochs

    @property
    def ciil_cycles(self) -> int:
        return self.epochs_per_site // self.ciil_epochs


# Quick: a few rounds of several local epochs (the study: 1), CIIL a few cycles of longer
# visits, with the same total of local epochs per site for every method.
QUICK = {
    "size": 32,
    "rounds": 6,
    "local_epochs": 10,
    "ciil_epochs": 30,
    "seeds": 1,
    "patience": 8,
    "samples": 8,
    "batch_size": 8,
}
QUICK_LR = 1e-2
# Full: the study's split at scale 1 (165 patients), every method once per seed. Adam at
# 1e-3 and batch 16 (the default plan's): at 1e-2 / 3e-3 and batch 8 the pooled model's
# validation Dice swung by several points between epochs, so that a single run's "% of
# CDS" was mostly chance; here both FL and CDS level off well within the 100 epochs.
FULL = {
    "size": 32,
    "rounds": 20,
    "local_epochs": 5,
    "ciil_epochs": 25,
    "seeds": 3,
    "patience": 8,
    "samples": 8,
    "batch_size": 16,
}
FULL_LR = 1e-3


# Options that default when absent: given, they must be positive (0 would silently mean the default).
POSITIVE_OPTIONS = (
    "seeds",
    "rounds",
    "local_epochs",
    "ciil_epochs",
    "scale",
    "size",
    "patience",
    "max_epochs",
    "samples_per_subject",
    "batch_size",
    "lr",
)


def settings_from(args: argparse.Namespace) -> Settings:
    for name in POSITIVE_OPTIONS:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {value}")
    quick = bool(args.quick)
    base = QUICK if quick else FULL
    rounds = args.rounds or base["rounds"]
    epochs = args.local_epochs or base["local_epochs"]
    ciil_epochs = args.ciil_epochs or min(base["ciil_epochs"], rounds * epochs)
    if (rounds * epochs) % ciil_epochs:
        budget = rounds * epochs
        raise SystemExit(
            f"--ciil-epochs {ciil_epochs} must divide the epoch budget rounds x local epochs = {budget}"
        )
    n_seeds = args.seeds or base["seeds"]
    if args.first_seed < 0:
        raise SystemExit(f"--first-seed must be 0 or more, got {args.first_seed}")
    if args.data_seed < 0:
        raise SystemExit(f"--data-seed must be 0 or more, got {args.data_seed}")
    # Checked here, not by the first plan an agent refuses after minutes of set-up.
    lowest = args.first_seed + args.sampling_seed_offset
    highest = args.first_seed + n_seeds - 1 + args.sampling_seed_offset
    if lowest < 0 or highest > MAX_SEED:
        raise SystemExit(
            f"--sampling-seed-offset {args.sampling_seed_offset}: the sampling seeds would run from "
            f"{lowest} to {highest}; a plan's seed is 0 to {MAX_SEED}"
        )
    fl_strategies = [x.strip() for x in (args.fl_strategy or "fedavg").split(",") if x.strip()]
    try:
        for entry in fl_strategies:
            parse_fl_strategy(entry)
    except ValueError as exc:
        raise SystemExit(f"--fl-strategy: {exc}") from None
    if not fl_strategies or len(set(fl_strategies)) != len(fl_strategies):
        raise SystemExit(f"--fl-strategy {args.fl_strategy!r}: give distinct entries")
    methods = [x.strip() for x in (args.methods or ",".join(METHODS)).split(",") if x.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise SystemExit(f"--methods {args.methods!r}: give names from {', '.join(METHODS)}")
    return Settings(
        out=args.out or Path("bench-out/paper-quick" if quick else "bench-out/paper"),
        quick=quick,
        scale=args.scale or (0.2 if quick else 1.0),
        size=args.size or base["size"],
        rounds=rounds,
        local_epochs=epochs,
        ciil_epochs=ciil_epochs,
        seeds=list(range(args.first_seed, args.first_seed + n_seeds)),
        patience=args.patience or base["patience"],
        max_epochs=args.max_epochs or rounds * epochs,
        samples_per_subject=args.samples_per_subject or base["samples"],
        batch_size=args.batch_size or base["batch_size"],
        lr=args.lr or (QUICK_LR if quick else FULL_LR),
        extra_sites=2,
        data_seed=args.data_seed,
        eval_every_round=bool(args.eval_every_round),
        fl_strategies=fl_strategies,
        methods=[m for m in METHODS if m in methods],
        dp_epsilon=args.dp_epsilon,
        dp_max_grad_norm=args.dp_max_grad_norm,
        dp_subject_slices=args.dp_subject_slices,
        dp_per_site=bool(args.dp_per_site),
        sampling_seed_offset=args.sampling_seed_offset,
    )


def budget_lines(s: Settings) -> list[str]:
    """The epoch budget of every method, printed before the run and kept in results.json."""
    n = s.epochs_per_site
    return [
        f"FL:   {s.rounds} rounds x {s.local_epochs} local epoch(s) = {n} epochs at every site",
        f"CIIL: {s.ciil_cycles} cycle(s) x {s.ciil_epochs} epoch(s) per visit = {n} epochs at every site",
        f"CDS:  {n} epochs over the pooled training data (its curve: the models after {n // 4} and {n // 2})",
        f"IIL:  one visit per site, until {s.patience} epochs without improvement, at most {s.max_epochs}",
    ]


def scaled_split(scale: float) -> list[int]:
    from coordinator.demo_federation import PAPER_SPLIT

    # At least 3 subjects per site: two to train on (a CIIL/IIL visit) and one to validate.
    return [max(3, round(n * scale)) for n in PAPER_SPLIT]


def make_plan(s: Settings) -> dict[str, Any]:
    from coordinator.demo_federation import default_plan

    plan = default_plan(size=s.size)
    plan["local_epochs"] = s.local_epochs
    plan["batch_size"] = s.batch_size
    plan["optimizer"] = {"name": "adam", "lr": s.lr}
    plan["data"]["samples_per_subject"] = s.samples_per_subject
    return plan


def _outside_sites_evaluate_everything(config: Path) -> None:
    """Outside sites never train, so (nearly) all their subjects form the validation split."""
    text = config.read_text()
    if "val_fraction: 0.25" not in text:
        raise RuntimeError(f"{config}: expected 'val_fraction: 0.25' in the generated config")
    config.write_text(text.replace("val_fraction: 0.25", "val_fraction: 0.95"))


DP_DELTA = 1e-5


def set_privacy_budget(config: Path, epsilon: float) -> None:
    """Every dataset of the site may spend at most (EPSILON, DP_DELTA), DP rounds only."""
    import yaml

    raw = yaml.safe_load(config.read_text())
    raw["privacy"] = {"accountant": "rdp", "budgets": {"*": {"epsilon": epsilon, "delta": DP_DELTA}}}
    config.write_text(yaml.safe_dump(raw, sort_keys=False))


def dp_noise(s: Settings, train_counts: Sequence[int]) -> tuple[float, dict[str, float]]:
    """One noise multiplier for every site such that the FL run's total ε (all rounds) is at most
    s.dp_epsilon at every site; with the ε it gives each site, keyed by its training count."""
    from agent.training.dp import epsilon

    assert s.dp_epsilon is not None
    per_step = max(1, s.batch_size // s.dp_subject_slices)

    def history(n: int, sigma: float) -> list[tuple[float, float, int]]:
        rate = min(1.0, per_step / n)
        return [(sigma, rate, s.rounds * s.local_epochs * max(1, round(1.0 / rate)))]

    def worst(sigma: float) -> float:
        return max(epsilon(history(n, sigma), DP_DELTA, "rdp") for n in set(train_counts))

    target = s.dp_epsilon * 0.999  # the sites' budget is s.dp_epsilon exactly
    low, high = 0.3, 1.0
    while worst(high) > target:
        low, high = high, high * 2
    for _ in range(30):
        mid = (low + high) / 2
        low, high = (mid, high) if worst(mid) > target else (low, mid)
    return high, {str(n): epsilon(history(n, high), DP_DELTA, "rdp") for n in sorted(set(train_counts))}


def dp_round_target(s: Settings, train_counts: Sequence[int]) -> tuple[float, dict[str, float]]:
    """The per-round target ε (plan privacy.dp.target_epsilon) such that the whole FL run costs at
    most s.dp_epsilon at every site, each site deriving its own noise for its own sample rate
    (as the agent does, `agent.training.dp.resolve`); with the run's ε at each site size."""
    from opacus.accountants.utils import get_noise_multiplier

    from agent.training.dp import epsilon

    assert s.dp_epsilon is not None
    per_step = max(1, s.batch_size // s.dp_subject_slices)

    def run_epsilon(n: int, target: float) -> float:
        rate = min(1.0, per_step / n)
        steps = s.local_epochs * max(1, round(1.0 / rate))
        sigma = get_noise_multiplier(
            target_epsilon=target,
            target_delta=DP_DELTA,
            sample_rate=rate,
            steps=steps,
            accountant="rdp",
            epsilon_tolerance=0.01,
        )
        return epsilon([(sigma, rate, s.rounds * steps)], DP_DELTA, "rdp")

    sizes = sorted(set(train_counts))
    budget = s.dp_epsilon * 0.999
    low, high = s.dp_epsilon / (4 * s.rounds), s.dp_epsilon
    for _ in range(12):
        mid = (low + high) / 2
        low, high = (mid, high) if max(run_epsilon(n, mid) for n in sizes) <= budget else (low, mid)
    return low, {str(n): run_epsilon(n, low) for n in sizes}


def prepare(console: Console, s: Settings) -> Any:
    from coordinator.demo_federation import generate_federation

    counts = scaled_split(s.scale)
    console.rule(
        f"[bold]Generating 10 sites ({', '.join(map(str, counts))} subjects) + {s.extra_sites} outside"
    )
    t0 = time.monotonic()
    layout = generate_federation(
        s.out / "data",
        sites=10,
        subjects_per_site=counts,
        extra_sites=s.extra_sites,
        size=s.size,
        seed=s.data_seed,
        force=True,
    )
    for site in layout.outside:
        _outside_sites_evaluate_everything(site.config_path)
    for site in layout.all_sites:
        fix_site_secret(site.config_path, s.data_seed)
        if s.dp_epsilon is not None:
            set_privacy_budget(site.config_path, s.dp_epsilon)
    console.print(f"generated in {time.monotonic() - t0:.0f} s under {layout.root}")

    # Static config tokens (hash in the config, token in the site's token file): one
    # `fedsite tokens add` process per site would cost a minute of start-up on 2 cores.
    for site in layout.all_sites:
        write_secret(site.token_file, add_static_token(site.config_path))
    return layout


def federation_file(s: Settings, layout: Any, agents: dict[str, Any]) -> Federation:
    def entry(site: Any) -> dict[str, Any]:
        return {"name": site.site_id, "url": agents[site.site_id].url, "token_file": str(site.token_file)}

    path = write_federation(
        s.out / "federation.yaml",
        [entry(x) for x in layout.sites],
        min_sites=len(layout.sites),
        outside=[entry(x) for x in layout.outside],
        timeouts={"connect": 10, "read": 120, "round": 3600, "evaluation": 1800},
        retries={"attempts": 5, "backoff": 1.0, "max_backoff": 8},
        poll_interval=0.5,
    )
    return load_federation(path)


def shuffled(names: Sequence[str], seed: int) -> list[str]:
    order = list(names)
    random.Random(1000 + seed).shuffle(order)
    return order


def require_every_site(label: str, *evaluations: dict[str, dict[str, Any]]) -> None:
    """Stop the reproduction when a site's evaluation of a final model failed.

    The coordinator leaves such a site out of the mean Dice (right for a federation that goes
    on), but then the method's figure is over other sites than the others' and its "% of CDS"
    compares nothing: a reproduction with a site missing is refused, naming it and why.
    """
    failed = {site: e["error"] for ev in evaluations for site, e in ev.items() if "error" in e}
    if failed:
        reasons = "; ".join(f"{site}: {why}" for site, why in sorted(failed.items()))
        raise SystemExit(f"{label}: the final model's evaluation failed at {len(failed)} site(s): {reasons}")


def summarise_run(doc: dict[str, Any]) -> dict[str, Any]:
    final = doc.get("final", {})
    curve = [
        (r["index"], r["weighted_dice"]) for r in doc["rounds"] if isinstance(r.get("weighted_dice"), float)
    ]
    return {
        "inside": final.get("weighted_dice"),
        "outside": final.get("outside_weighted_dice"),
        "per_site": {k: v.get("dice") for k, v in (final.get("evaluation") or {}).items()},
        "outside_per_site": {k: v.get("dice") for k, v in (final.get("outside_evaluation") or {}).items()},
        "curve": curve,
        "duration_s": doc.get("duration_s"),
        "bytes_sent": sum(int(r.get("bytes_sent", 0)) for r in doc["rounds"]),
        "bytes_received": sum(int(r.get("bytes_received", 0)) for r in doc["rounds"]),
        "left_out": [x for r in doc["rounds"] for x in r.get("left_out", [])],
        "epochs_per_visit": [
            t.get("metrics", {}).get("epochs_run")
            for r in doc["rounds"]
            for t in r.get("training", {}).values()
        ],
    }


def curve_in_process(
    doc: dict[str, Any], run_dir: Path, plan: dict[str, Any], splits: Sequence[SiteSplit], cache: Path
) -> list[tuple[int, float | None]]:
    """Dice of every round's saved global model on the sites' validation splits, in this process.

    With per-round evaluation at the agents off (the default: it adds an evaluation job per
    site and round), this still shows whether a run has converged. Same engine, same items: the
    catalog is scanned with each site's secret, so each subject is in the split its agent uses.
    """
    out: list[tuple[int, float | None]] = []
    for r in doc["rounds"]:
        path = run_dir / str(r.get("model", ""))
        if not r.get("model") or not path.is_file():
            continue
        per_site = evaluate_in_process(plan, load_file(path), splits, cache)
        out.append((int(r["index"]), weighted_dice(per_site)))
    return out


class MethodRunner:
    """Runs each method of the comparison once per seed, against the running agents."""

    def __init__(self, console: Console, s: Settings, fed: Federation, layout: Any) -> None:
        self.console = console
        self.s = s
        self.fed = fed
        self.plan = make_plan(s)
        self.reporter: Reporter = QuietReporter(console) if s.quick else Reporter(console)
        self.splits = site_splits(
            [x.config_path for x in layout.sites], self.plan["dataset"], s.out / "cds" / "catalog"
        )
        self.cache = s.out / "cds" / "cache"

    def seeded(self, seed: int) -> dict[str, Any]:
        """The plan of a run with seed SEED: its sampling seed is SEED plus the offset."""
        return {**self.plan, "seed": seed + self.s.sampling_seed_offset}

    def start(self, seed: int) -> dict[str, torch.Tensor]:
        """The initial weights of a run with seed SEED, whatever its sampling seed."""
        return initial_weights({**self.plan, "seed": seed})

    def curve_from_models(self, res: Any, summary: dict[str, Any]) -> None:
        if not summary["curve"]:
            summary["curve"] = curve_in_process(res.doc, res.out_dir, self.plan, self.splits, self.cache)
            summary["curve_source"] = "in process, from the saved global model of every round"
        else:
            summary["curve_source"] = "agents (POST /v1/evaluations)"

    def run_over_agents(
        self, label: str, seed: int, plan: dict[str, Any], opts: RunOptions
    ) -> tuple[Any, dict[str, Any]]:
        """One strategy through the coordinator, results under OUT/<label>-seed<seed>; its summary."""
        res = run_strategy(
            self.fed,
            plan,
            self.s.out / f"{label}-seed{seed}",
            opts,
            initial_weights=self.start(seed),
            reporter=self.reporter,
        )
        final = res.doc.get("final", {})
        require_every_site(label, final.get("evaluation") or {}, final.get("outside_evaluation") or {})
        summary = summarise_run(res.doc)
        summary["seed"] = seed
        summary["sampling_seed"] = int(plan["seed"])
        return res, summary

    def fl(self, seed: int, strategy: str = "fedavg") -> dict[str, Any]:
        s = self.s
        plan = self.seeded(seed)
        name = fl_label(strategy)
        dp: dict[str, Any] | None = None
        if s.dp_epsilon is not None:
            counts = [len(x.train) for x in self.splits]
            spec: dict[str, Any] = {
                "max_grad_norm": s.dp_max_grad_norm,
                "subject_slices": s.dp_subject_slices,
            }
            dp = {"epsilon": s.dp_epsilon, "delta": DP_DELTA, "per_site_noise": s.dp_per_site}
            if s.dp_per_site:
                target, per_count = dp_round_target(s, counts)
                spec["target_epsilon"] = dp["round_target_epsilon"] = target
            else:
                sigma, per_count = dp_noise(s, counts)
                spec["noise_multiplier"] = dp["noise_multiplier"] = sigma
            plan["privacy"] = {"dp": spec}
            dp["epsilon_by_train_subjects"] = per_count
            self.console.print(f"DP: {spec}; run epsilon by site size {per_count}")
        what = f"{s.rounds} rounds x {s.local_epochs} local epoch(s) at every site"
        self.console.rule(f"[bold]{name} seed {seed}: {what}")
        label = fl_run_label(strategy)
        strategy_name, server_settings = parse_fl_strategy(strategy)
        keep_state = bool(server_settings.pop(KEEP_STATE, 0.0))
        if keep_state:
            plan["optimizer"] = {**plan["optimizer"], "keep_state": True}
        res, summary = self.run_over_agents(
            label,
            seed,
            plan,
            RunOptions(
                strategy=strategy_name,
                rounds=s.rounds,
                evaluate=s.eval_every_round,
                reseed_rounds=True,
                run_id=f"{label}-s{seed}",
                **server_settings,  # type: ignore[arg-type]
            ),
        )
        summary["strategy"] = strategy_name
        summary["strategy_settings"] = res.doc.get("strategy_settings", {})
        summary["keep_optimizer_state"] = keep_state
        summary["dp"] = dp
        summary["mia"] = self.mia(plan, res.final_model_path)
        self.curve_from_models(res, summary)
        self.console.print(
            f"{name} seed {seed}: Dice {_d(summary['inside'])} ({res.doc['duration_s']:.0f} s); "
            f"per round: {_curve(summary['curve'])}"
        )
        return summary

    def mia(self, plan: dict[str, Any], model_path: Path) -> dict[str, Any]:
        """Loss-threshold membership inference on a final model: every federation site's training
        subjects (members) against their validation subjects (non-members)."""
        from agent.privacy.mia import membership_report
        from agent.training.plan import parse_plan

        members = [item for x in self.splits for item in x.train]
        nonmembers = [item for x in self.splits for item in x.val]
        [loss] = membership_report(
            parse_plan(plan), load_file(model_path), members, nonmembers, cache_dir=self.cache
        )
        out = loss.summary()
        self.console.print(
            f"MIA (loss) on the final model: AUC {loss.auc:.3f} [{loss.auc_low:.3f}, {loss.auc_high:.3f}], "
            f"TPR at 5% FPR {loss.tpr_at_5_fpr:.3f}"
        )
        return out

    def cds(self, seed: int) -> dict[str, Any]:
        s, n = self.s, self.s.epochs_per_site
        plan = self.seeded(seed)
        self.console.rule(f"[bold]CDS seed {seed}: {n} epochs on the pooled training data, in this process")
        torch.set_num_threads(2)
        cpu0 = time.process_time()
        # One run of N epochs; its models after N/4 and N/2 epochs give the curve that shows
        # whether N epochs of pooled training have converged.
        marks = sorted({max(1, n // 4), max(1, n // 2)} - {n})
        out = s.out / f"cds-seed{seed}"
        pooled = train_pooled(
            plan,
            self.splits,
            epochs=n,
            initial=self.start(seed),
            work_dir=out / "work",
            cache_dir=self.cache,
            progress=not s.quick,
            snapshots=marks,
        )
        weights = pooled.weights
        curve: list[tuple[int, float | None]] = []
        for epochs, snapshot in sorted(pooled.snapshots.items()):
            per_site = evaluate_in_process(plan, snapshot, self.splits, self.cache)
            curve.append((epochs, weighted_dice(per_site)))
        data = encode(weights)
        (out / "cds.safetensors").write_bytes(data)
        clients = AgentClient.for_federation(self.fed)
        try:
            opts = RunOptions(run_id=f"cds-s{seed}")
            judge = Coordinator(self.fed, plan, out, opts, initial_weights=weights, clients=clients)
            per_site, inside_dice = judge.evaluate_everywhere(data, "final")
            per_out, outside_dice = judge.evaluate_everywhere(data, "final-out", self.fed.outside_names)
        finally:
            for c in clients.values():
                c.close()
        require_every_site(f"cds-seed{seed}", per_site, per_out)
        # The final model's point is the agents' evaluation: same splits, same engine.
        curve.append((n, inside_dice))
        self.console.print(
            f"CDS seed {seed}: Dice {_d(inside_dice)} (agents' evaluation; "
            f"{pooled.info['duration_s']:.0f} s); curve {_curve(curve)}"
        )
        return {
            "seed": seed,
            "sampling_seed": int(plan["seed"]),
            "inside": inside_dice,
            "outside": outside_dice,
            "per_site": {k: v.get("dice") for k, v in per_site.items()},
            "outside_per_site": {k: v.get("dice") for k, v in per_out.items()},
            "curve": curve,
            "curve_source": "in process: the CDS run's models after N/4 and N/2 epochs; "
            "the last point is the agents' evaluation of the final model",
            "cpu_s": round(time.process_time() - cpu0, 1),
            **pooled.info,
        }

    def incremental(self, strategy: str, seed: int) -> dict[str, Any]:
        """CIIL or IIL with seed SEED: its own site order and plan seed."""
        s = self.s
        name = strategy.upper()
        plan = self.seeded(seed)
        if strategy == "ciil":
            plan["local_epochs"] = s.ciil_epochs
        order = shuffled(self.fed.names, seed)
        what = (
            f"{s.ciil_cycles} cycle(s) x {s.ciil_epochs} epoch(s) per visit"
            if strategy == "ciil"
            else f"one visit per site, patience {s.patience}, at most {s.max_epochs} epochs"
        )
        self.console.rule(f"[bold]{name} seed {seed}: {what}; order {', '.join(order)}")
        res, summary = self.run_over_agents(
            strategy,
            seed,
            plan,
            RunOptions(
                strategy=strategy,
                rounds=s.ciil_cycles,
                order=order,
                patience=s.patience,
                max_epochs=s.max_epochs,
                # Evaluating at 10 agents after each of the 10 visits per cycle would cost
                # more than the training; the agents evaluate the final model and the curve
                # comes from the saved models, evaluated in this process.
                evaluate=False,
                reseed_rounds=True,
                run_id=f"{strategy}-s{seed}",
            ),
        )
        summary["order"] = order
        if strategy == "ciil":
            self.curve_from_models(res, summary)
        took = res.doc["duration_s"]
        self.console.print(f"{name} seed {seed}: Dice {_d(summary['inside'])} ({took:.0f} s)")
        return summary


def run_methods(console: Console, s: Settings, fed: Federation, layout: Any) -> dict[str, Any]:
    """Every method once per seed; FL and CDS first, since the headline compares them."""
    runner = MethodRunner(console, s, fed, layout)
    for line in budget_lines(s):
        console.print(line)
    methods: dict[str, list[dict[str, Any]]] = {}
    if "fl" in s.methods:
        methods.update({fl_label(x): [] for x in s.fl_strategies})
    methods.update({m.upper(): [] for m in s.methods if m != "fl"})
    for seed in s.seeds:
        if "fl" in s.methods:
            for strategy in s.fl_strategies:
                methods[fl_label(strategy)].append(runner.fl(seed, strategy))
                save_partial(s, methods)
        if "cds" in s.methods:
            methods["CDS"].append(runner.cds(seed))
            save_partial(s, methods)
    for seed in s.seeds:
        for strategy in ("ciil", "iil"):
            if strategy in s.methods:
                methods[strategy.upper()].append(runner.incremental(strategy, seed))
                save_partial(s, methods)
    return methods


def save_partial(s: Settings, methods: dict[str, Any]) -> None:
    """The methods finished so far, so that an interrupted run keeps what it measured."""
    (s.out / "methods.partial.json").write_text(json.dumps(methods, indent=2) + "\n")


def _curve(curve: Sequence[tuple[int, float | None]]) -> str:
    return ", ".join(f"{i}: {_d(v)}" for i, v in curve) or "n/a"


def _d(value: float | None) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "n/a"


def _stats(values: Sequence[float | None]) -> dict[str, float | None]:
    xs = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    if not xs:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(xs),
        "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
        "n": len(xs),
    }


def _study_name(method: str) -> str:
    """The study's method a row compares with: every FL variant with the study's FL (FedAvg)."""
    return "FL" if method.startswith("FL") else method


def table_rows(methods: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method run, CDS first, the FL rows in the order they ran, then CIIL and IIL."""
    cds_in = _stats([r["inside"] for r in methods.get("CDS", [])])["mean"]
    cds_out = _stats([r["outside"] for r in methods.get("CDS", [])])["mean"]
    fl_rows = [m for m in methods if m.startswith("FL")]
    rows = []
    for name in ("CDS", *fl_rows, "CIIL", "IIL"):
        if name not in methods:
            continue
        runs = methods[name]
        inside = _stats([r["inside"] for r in runs])
        outside = _stats([r["outside"] for r in runs])
        rows.append(
            {
                "method": name,
                "inside": inside,
                "outside": outside,
                "inside_pct_of_cds": 100 * inside["mean"] / cds_in if inside["mean"] and cds_in else None,
                "outside_pct_of_cds": 100 * outside["mean"] / cds_out
                if outside["mean"] and cds_out
                else None,
                "study_dice": STUDY[_study_name(name)],
                "study_pct_of_cds": round(100 * STUDY[_study_name(name)] / STUDY["CDS"], 1),
            }
        )
        if any(r.get("mia") for r in runs):
            rows[-1]["mia_auc"] = _stats([r["mia"]["auc"] for r in runs if r.get("mia")])
            rows[-1]["dp"] = runs[0].get("dp")
    return rows


def _fmt(stat: dict[str, Any]) -> str:
    if stat["mean"] is None:
        return "n/a"
    if stat["n"] > 1:
        return f"{stat['mean']:.4f} ± {stat['sd']:.4f} (n={stat['n']})"
    return f"{stat['mean']:.4f}"


def print_table(console: Console, rows: list[dict[str, Any]]) -> None:
    table = Table(title="Validation Dice (sample-weighted over sites) and % of pooled data (CDS)")
    for col in ("method", "Dice inside", "% of CDS", "Dice outside", "% of CDS", "study: Dice (% CDS)"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        pct_in = f"{r['inside_pct_of_cds']:.1f}%" if r["inside_pct_of_cds"] else "n/a"
        pct_out = f"{r['outside_pct_of_cds']:.1f}%" if r["outside_pct_of_cds"] else "n/a"
        table.add_row(
            r["method"],
            _fmt(r["inside"]),
            pct_in,
            _fmt(r["outside"]),
            pct_out,
            f"{r['study_dice']:.3f} ({r['study_pct_of_cds']}%)",
        )
    console.print(table)


def plot(s: Settings, methods: dict[str, Any], rows: list[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One x axis for all: epochs over each site's data so far (CDS: over the pool).
    def points(curve: Sequence[Sequence[Any]], per: int) -> list[tuple[float, float]]:
        return [(float(i * per), float(v)) for i, v in curve if isinstance(v, float)]

    curves: dict[str, Sequence[tuple[float, float]]] = {}
    per_epoch = {name: s.local_epochs for name in methods if name.startswith("FL")}
    per_epoch.update({"CIIL": s.ciil_epochs, "CDS": 1})
    for name, per in per_epoch.items():
        for run in methods.get(name, []):
            if run.get("curve"):
                curves[f"{name} seed {run['seed']}"] = points(run["curve"], per)
    cds = next((r["inside"]["mean"] for r in rows if r["method"] == "CDS"), None)
    curve_png = plot_dice_curves(
        curves,
        s.out / "dice_per_round.png",
        title="Sample-weighted validation Dice inside the federation",
        xlabel="epochs per site (CDS: epochs over the pooled data)",
        reference={"CDS (final)": cds} if cds is not None else None,
    )
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    names = [r["method"] for r in rows]
    width = 0.38
    for k, (key, label) in enumerate((("inside", "inside the federation"), ("outside", "outside sites"))):
        means = [r[key]["mean"] or 0.0 for r in rows]
        errs = [r[key]["sd"] or 0.0 for r in rows]
        xs = [i + (k - 0.5) * width for i in range(len(rows))]
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=label)
    ax.set_xticks(range(len(rows)), names)
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.set_title("Final models: Dice by collaboration method")
    ax.legend(loc="lower right")
    fig.tight_layout()
    bars_png = s.out / "dice_by_method.png"
    fig.savefig(bars_png)
    plt.close(fig)
    return [curve_png, bars_png]


def _cpu_times() -> dict[str, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "this_process": me.ru_utime + me.ru_stime,
        "agents_and_workers": kids.ru_utime + kids.ru_stime,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Small setting: about 5 minutes on 2 CPU cores.")
    ap.add_argument(
        "--out", type=Path, help="Output folder (default bench-out/paper or bench-out/paper-quick)."
    )
    ap.add_argument(
        "--seeds", type=int, help="Runs of every method, one per seed (their spread); default 3 (quick: 1)."
    )
    ap.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="The seeds are this and the next --seeds - 1 (default 0): more seeds of a table "
        "without rerunning the ones it has.",
    )
    ap.add_argument(
        "--rounds", type=int, help="FL rounds; the budget is rounds x local epochs per site (CDS: in all)."
    )
    ap.add_argument("--local-epochs", type=int, help="FL: epochs per site per round (study: 1; default 5).")
    ap.add_argument(
        "--ciil-epochs",
        type=int,
        help="CIIL: epochs per visit; cycles = budget / this (default: 20 quick, 25 full).",
    )
    ap.add_argument(
        "--eval-every-round",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Evaluate FL at every agent after every round too (default: off; the curves come "
        "from the saved models, evaluated in this process, for every method).",
    )
    ap.add_argument(
        "--scale", type=float, help="Fraction of the study's patients per site (default 1; quick 0.2)."
    )
    ap.add_argument("--size", type=int, help="Volume size in voxels per side (multiple of 8).")
    ap.add_argument("--patience", type=int, help="IIL patience in epochs (study and default: 8).")
    ap.add_argument(
        "--max-epochs", type=int, help="IIL: most epochs at one site (default rounds x local epochs)."
    )
    ap.add_argument("--samples-per-subject", type=int, help="2D slices drawn per subject per epoch.")
    ap.add_argument("--batch-size", type=int, help="Slices per batch (default 16; quick 8).")
    ap.add_argument("--lr", type=float, help="Adam learning rate (default 3e-3; quick 1e-2).")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument(
        "--sampling-seed-offset",
        type=int,
        default=0,
        help="Every run samples its data with its seed plus this, keeping the seed's initial "
        "weights: how much a result moves with the draw of the data alone (default 0).",
    )
    ap.add_argument(
        "--fl-strategy",
        help=f"FL run with these coordinator strategies, comma-separated ({', '.join(FL_STRATEGIES)}); "
        "default fedavg (the study's). Each gets its own row. An entry may set the server "
        "optimiser: fedavgm:server_lr=1:server_momentum=0.5 (settings: "
        f"{', '.join(SERVER_SETTINGS)}), and keep_state=1 keeps each site's Adam state from "
        "round to round of the run.",
    )
    ap.add_argument(
        "--dp-epsilon",
        type=float,
        help="FL with DP-SGD: the total epsilon (delta 1e-5) each site may spend on the whole run; "
        "the sites' budgets are set to it. Default: no DP.",
    )
    ap.add_argument("--dp-max-grad-norm", type=float, default=1.0, help="DP: per-subject clipping norm.")
    ap.add_argument(
        "--dp-per-site",
        action="store_true",
        help="DP: every site derives its own noise from a per-round target epsilon (less noise at "
        "larger sites) instead of one noise multiplier for all, set by the smallest site.",
    )
    ap.add_argument(
        "--dp-subject-slices", type=int, default=4, help="DP: slices drawn per sampled subject per step."
    )
    ap.add_argument(
        "--methods",
        help=f"Run only these methods, comma-separated ({', '.join(METHODS)}); default all.",
    )
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    s = settings_from(parse_args(argv))
    console = Console(stderr=True)
    t0 = time.monotonic()
    cpu0 = _cpu_times()
    s.out.mkdir(parents=True, exist_ok=True)
    with terminate_on_sigterm():
        layout = prepare(console, s)
        console.rule(f"[bold]Starting {len(layout.all_sites)} agents (one process each, one thread each)")
        with LocalFederation(s.out / "logs") as local:
            t1 = time.monotonic()
            agents = local.start_many({x.site_id: x.config_path for x in layout.all_sites})
            console.print(f"agents ready in {time.monotonic() - t1:.0f} s; logs under {s.out / 'logs'}")
            fed = federation_file(s, layout, agents)
            methods = run_methods(console, s, fed, layout)
    # After the agents have stopped: their CPU time (and their workers') is in the children's.
    cpu1 = _cpu_times()
    rows = table_rows(methods)
    print_table(console, rows)
    pngs = plot(s, methods, rows)
    fl_pct = next((r["inside_pct_of_cds"] for r in rows if r["method"] == "FL"), None)
    fl_rows = [r for r in rows if r["method"].startswith("FL") and r["inside_pct_of_cds"] is not None]
    best = max(fl_rows, key=lambda r: r["inside_pct_of_cds"], default=None)
    doc = {
        "benchmark": "paper_reproduction",
        "settings": {**asdict(s), "out": str(s.out), "subjects_per_site": scaled_split(s.scale)},
        "table": rows,
        "methods": methods,
        "fl_reaches_99pct_of_cds": bool(fl_pct is not None and fl_pct >= 99.0),
        "best_fl": None
        if best is None
        else {"method": best["method"], "pct_of_cds": best["inside_pct_of_cds"]},
        "budget": budget_lines(s),
        "duration_s": round(time.monotonic() - t0, 1),
        "cpu_s": {k: round(cpu1[k] - cpu0[k], 1) for k in cpu0},
        "pngs": [str(p) for p in pngs],
    }
    (s.out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    for line in budget_lines(s):
        console.print(line)
    cpu = {k: round(cpu1[k] - cpu0[k], 1) for k in cpu0}
    console.print(
        f"wall {doc['duration_s']:.0f} s; CPU {cpu['this_process']:.0f} s here, "
        f"{cpu['agents_and_workers']:.0f} s in the agents and their workers"
    )
    console.print(f"results: {s.out / 'results.json'}; plots: {', '.join(map(str, pngs))}")
    keys = ("table", "fl_reaches_99pct_of_cds", "best_fl", "budget", "duration_s", "cpu_s", "pngs")
    print(json.dumps({k: doc[k] for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
