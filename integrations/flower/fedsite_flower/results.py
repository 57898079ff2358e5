"""What a Flower run leaves behind: the same `results.json` and Dice plot as `fedsite coordinate`.

The layout follows `coordinator.report.RunRecorder` (the Flower side cannot import the
coordinator: it needs torch and the agent's packages): `results.json` rewritten after every
round, the global model of every round under `models/`, `dice_per_round.png` at the end; plus
`received_updates.jsonl`, one line per update the ServerApp received (site, round, SHA-256 of
the arrays in the agent's encoding), which the end-to-end test compares with each agent's
`egress.sent` audit events.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def atomic_write(path: Path, data: bytes) -> None:
    """Write DATA to PATH so that a reader sees the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def weighted_dice(evaluation: Mapping[str, Mapping[str, Any]]) -> float | None:
    """Sample-weighted mean Dice over the sites that answered (None when none did)."""
    num, den = 0.0, 0
    for r in evaluation.values():
        dice, n = r.get("dice"), r.get("num_samples")
        if isinstance(dice, float) and isinstance(n, int) and n > 0:
            num += dice * n
            den += n
    return num / den if den else None


class RunRecorder:
    """Writes the run's outputs under OUT as they happen."""

    def __init__(self, out_dir: Path, header: dict[str, Any]) -> None:
        self.out_dir = out_dir
        self.models_dir = out_dir / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.results_path = out_dir / "results.json"
        self.plot_path = out_dir / "dice_per_round.png"
        self.updates_path = out_dir / "received_updates.jsonl"
        self.started = time.time()
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
        atomic_write(path, data)
        return path.relative_to(self.out_dir).as_posix(), hashlib.sha256(data).hexdigest()

    def log_update(self, entry: dict[str, Any]) -> None:
        """One received update (site, round, sha256, ...) as a JSON line, appended at once."""
        with self._lock, self.updates_path.open("a") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")

    def add_anchor(self, site: str, anchor: dict[str, Any]) -> None:
        """Keep SITE's signed audit anchor (from a completed round) in results.json at once."""
        with self._lock:
            self.doc.setdefault("audit_anchors", {}).setdefault(site, []).append(anchor)
            self.flush()

    def add_round(self, record: dict[str, Any]) -> None:
        with self._lock:
            self.doc["rounds"].append(record)
            self.flush()

    def finish(self, status: str, *, error: str | None = None, final: dict[str, Any] | None = None) -> None:
        end = time.time()
        with self._lock:
            self.doc.update(status=status, finished_at=_iso(end), duration_s=round(end - self.started, 3))
            if error is not None:
                self.doc["error"] = error
            if final is not None:
                self.doc["final"] = final
            self.flush()
        self.plot()

    def flush(self) -> None:
        with self._lock:
            atomic_write(self.results_path, (json.dumps(self.doc, indent=2) + "\n").encode())

    def plot(self) -> Path | None:
        rounds = [r for r in self.doc["rounds"] if isinstance(r.get("weighted_dice"), float)]
        if not rounds:
            return None
        label = str(self.doc.get("strategy", "run"))
        plot_dice_curves(
            {label: [(r["index"], r["weighted_dice"]) for r in rounds]},
            self.plot_path,
            title=f"{label}: sample-weighted validation Dice",
            xlabel=str(self.doc.get("round_label", "round")),
        )
        return self.plot_path


def plot_dice_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]], path: Path, *, title: str, xlabel: str = "round"
) -> Path:
    """A line per curve of Dice against round (the coordinator's plot, without reference lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for label, points in curves.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=label)
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
