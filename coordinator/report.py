"""What a run leaves behind and shows while it runs.

- `RunRecorder` writes `results.json` after every round (so a run cut short keeps what it
  did), the global model of every round as safetensors, and a PNG of Dice per round. It
  also keeps each site's signed audit anchors (`audit_anchors`, per site, as each completed
  round's status carried them): the coordinator cannot check them, but a site's privacy
  officer can check the site's audit log against them (`fedsite audit verify --anchors`).
- `Reporter` is the live display: one progress line per site (rich), warnings naming the
  site, and a one-line summary per round. `QuietReporter` keeps only warnings, for tests
  and scripts that print their own output.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agent.fileio import atomic_write_bytes

if TYPE_CHECKING:
    from coordinator.runner import RunResult


def progress_fraction(progress: Any) -> float | None:
    """The fraction of a job done, from whatever progress shape the agent reports."""
    if isinstance(progress, int | float):
        value = float(progress)
        return value / 100.0 if value > 1.0 else value
    if not isinstance(progress, dict):
        return None
    if isinstance(progress.get("fraction"), int | float):
        return float(progress["fraction"])
    epoch, epochs = progress.get("epoch"), progress.get("epochs")
    step, steps = progress.get("step"), progress.get("steps")
    if isinstance(epoch, int | float) and isinstance(epochs, int | float) and epochs > 0:
        within = (
            step / steps
            if isinstance(step, int | float) and isinstance(steps, int | float) and steps
            else 0.0
        )
        return max(0.0, min(1.0, (max(epoch - 1, 0) + within) / epochs))
    return None


def progress_text(progress: Any) -> str:
    if isinstance(progress, dict):
        parts = []
        if "epoch" in progress and "epochs" in progress:
            parts.append(f"epoch {progress['epoch']}/{progress['epochs']}")
        if "step" in progress and "steps" in progress:
            parts.append(f"step {progress['step']}/{progress['steps']}")
        if isinstance(progress.get("loss"), int | float):
            parts.append(f"loss {progress['loss']:.3f}")
        return " ".join(parts)
    return ""


class Reporter:
    """Live progress on the terminal: a bar per site, warnings and round summaries above it."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._tasks: dict[str, Any] = {}

    def start(self, title: str, sites: Sequence[str]) -> None:
        self.console.print(f"[bold]{title}[/bold]")
        self._progress = Progress(
            TextColumn("{task.fields[site]:<14}"),
            BarColumn(bar_width=28),
            TextColumn("{task.description}", markup=False),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self._progress.start()
        self._tasks = {s: self._progress.add_task("waiting", total=1.0, site=s) for s in sites}

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def site(self, site: str, text: str, fraction: float | None = None) -> None:
        if self._progress is None or site not in self._tasks:
            return
        kwargs: dict[str, Any] = {"description": text}
        if fraction is not None:
            kwargs["completed"] = fraction
        self._progress.update(self._tasks[site], **kwargs)

    # Messages carry the sites' own words (reasons, paths): printed as text, never as markup.
    def info(self, message: str) -> None:
        self.console.print(message, markup=False)

    def warning(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/yellow] {escape(message)}")

    def round_done(self, record: dict[str, Any]) -> None:
        dice = record.get("weighted_dice")
        dice_s = f"{dice:.4f}" if isinstance(dice, float) else "n/a"
        left = record.get("left_out") or []
        left_s = f"; left out: {', '.join(x['site'] for x in left)}" if left else ""
        self.console.print(
            f"{record['label']}: weighted Dice {dice_s} over {len(record.get('evaluation', {}))} site(s); "
            f"trained at {', '.join(record['participants']) or 'no site'}{left_s} "
            f"({record['duration_s']:.1f} s, sent {_mb(record['bytes_sent'])}, "
            f"received {_mb(record['bytes_received'])})",
            markup=False,
        )


class QuietReporter(Reporter):
    """Warnings only (still naming the site); no bars, no summaries."""

    def start(self, title: str, sites: Sequence[str]) -> None:
        return None

    def info(self, message: str) -> None:
        return None

    def round_done(self, record: dict[str, Any]) -> None:
        return None


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


class RunRecorder:
    """Writes the run's outputs under OUT as they happen."""

    def __init__(self, out_dir: Path, header: dict[str, Any]) -> None:
        self.out_dir = out_dir
        self.models_dir = out_dir / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.results_path = out_dir / "results.json"
        self.plot_path = out_dir / "dice_per_round.png"
        self.started = time.time()
        # Re-entrant: add_anchor flushes while holding it.
        self._lock = threading.RLock()
        self.doc: dict[str, Any] = {
            **header,
            "status": "running",
            "started_at": _iso(self.started),
            "rounds": [],
        }
        self.flush()

    def save_model(self, index: int, data: bytes, name: str | None = None) -> tuple[str, str]:
        """Store one global model; returns (path relative to OUT, sha256)."""
        path = self.models_dir / (name or f"round-{index:03d}.safetensors")
        atomic_write_bytes(path, data)
        return path.relative_to(self.out_dir).as_posix(), hashlib.sha256(data).hexdigest()

    def add_round(self, record: dict[str, Any]) -> None:
        self.doc["rounds"].append(record)
        self.flush()

    def add_anchor(self, site: str, anchor: dict[str, Any]) -> None:
        """Keep SITE's signed audit anchor (from a completed round's status) in results.json at
        once: sites train in parallel threads, and an anchor is worth keeping even if the run
        stops before its round is recorded."""
        with self._lock:
            self.doc.setdefault("audit_anchors", {}).setdefault(site, []).append(anchor)
            self.flush()

    def finish(self, status: str, *, error: str | None = None, final: dict[str, Any] | None = None) -> None:
        end = time.time()
        self.doc.update(status=status, finished_at=_iso(end), duration_s=round(end - self.started, 3))
        if error is not None:
            self.doc["error"] = error
        if final is not None:
            self.doc["final"] = final
        self.flush()
        self.plot()

    def flush(self) -> None:
        with self._lock:
            atomic_write_bytes(
                self.results_path, (json.dumps(self.doc, indent=2, sort_keys=False) + "\n").encode()
            )

    def plot(self) -> Path | None:
        rounds = [r for r in self.doc["rounds"] if isinstance(r.get("weighted_dice"), float)]
        if not rounds:
            return None
        plot_dice_curves(
            {str(self.doc.get("strategy", "run")): [(r["index"], r["weighted_dice"]) for r in rounds]},
            self.plot_path,
            title=f"{self.doc.get('strategy', 'run')}: sample-weighted validation Dice",
            xlabel=str(self.doc.get("round_label", "round")),
        )
        return self.plot_path


def plot_dice_curves(
    curves: dict[str, Sequence[tuple[float, float]]],
    path: Path,
    *,
    title: str,
    xlabel: str = "round",
    reference: dict[str, float] | None = None,
) -> Path:
    """A line per curve of Dice against round; optional horizontal reference lines (e.g. CDS)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for label, points in curves.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=label)
    for label, value in (reference or {}).items():
        ax.axhline(value, linestyle="--", linewidth=1, color="grey", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Dice")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def print_text(console: Console, text: str) -> None:
    """TEXT as it is: never read as markup (a "[...]" in a path or in a site's words would vanish,
    or stop the command) and never wrapped (a path cut by a line break cannot be pasted)."""
    console.print(text, markup=False, soft_wrap=True)


def print_outputs(console: Console, result: RunResult) -> None:
    """The Dice table of every round and where the results, the plot and the final model are."""
    console.print(dice_table(result.rounds))
    print_text(console, f"results.json:  {result.results_path}")
    if result.plot_path is not None:
        print_text(console, f"Dice plot:     {result.plot_path}")
    print_text(console, f"final model:   {result.final_model_path}")


def dice_table(rounds: Sequence[dict[str, Any]]) -> Table:
    table = Table(title="Dice per round (sample-weighted over the sites' validation splits)")
    table.add_column("round")
    table.add_column("weighted Dice", justify="right")
    table.add_column("per site")
    table.add_column("left out")
    for r in rounds:
        dice = r.get("weighted_dice")
        per_site = ", ".join(
            f"{s} {m['dice']:.3f}"
            for s, m in r.get("evaluation", {}).items()
            if isinstance(m.get("dice"), float)
        )
        table.add_row(
            r["label"],
            f"{dice:.4f}" if isinstance(dice, float) else "n/a",
            per_site,
            ", ".join(x["site"] for x in r.get("left_out", [])),
        )
    return table


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
