"""End to end: three fedsite agents under Flower (a SuperLink, three SuperNodes, `flwr run`).

Runs in the AGENT's environment (it generates the sites, starts the agents and the reference
coordinator); every Flower process runs from the Flower environment (--flower-venv, default
.venv-flower), which holds flwr and this app but no torch. Everything listens on 127.0.0.1; the
SuperLink and the SuperNodes run with --insecure (plain gRPC/HTTP on loopback only: this is a
test of the bridge, not of Flower's TLS).

Steps and checks:

1. three generated sites, their agents, and the plan's initial model (`fedsite flower
   initial-weights`);
2. the reference: `fedsite coordinate`'s FedAvg (`run_strategy`), ROUNDS rounds, same plan,
   seed and initial model, on the same agents;
3. Flower: SuperLink + one SuperNode per agent (node config: agent URL, token file, site),
   `flwr run` of ROUNDS FedAvg rounds. Checks: exit 0, results.json completed; every agent's
   audit log holds exactly one `egress.sent` per Flower round, whose SHA-256 equals what the
   ServerApp logged for that site and round (received_updates.jsonl); the final model is the
   reference's, byte for byte (the same updates, averaged the coordinator's way), and the final
   weighted Dice within 0.01 of the reference's;
4. one site restarted with `approval.policy: manual` and the plan not approved, one more
   `flwr run` (one round): that site is reported as left out with the agent's reason naming the
   plan's hash (the agent's own hash of the plan), the other two complete.

It prints one JSON object (checks and measurements: round time under Flower against the
reference, bytes per round) and exits 1 if any check fails.

    .venv/bin/python integrations/flower/e2e.py --out flower-e2e-out
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]
APP_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import yaml  # noqa: E402

from coordinator.demo_federation import default_plan, generate_federation  # noqa: E402
from coordinator.federation import parse_federation  # noqa: E402
from coordinator.local import LocalFederation, add_static_token, free_port, run_fedsite, write_secret  # noqa: E402
from coordinator.options import RunOptions  # noqa: E402
from coordinator.report import QuietReporter  # noqa: E402
from coordinator.runner import run_strategy  # noqa: E402
from coordinator.weights import load_file  # noqa: E402

DICE_TOLERANCE = 0.01
FLWR_RUN_TIMEOUT_S = 1200.0


def e2e_plan() -> dict[str, Any]:
    """A plan that trains in seconds on the generated data yet reaches a Dice well above 0 in two
    rounds, so that comparing the two engines' Dice says something."""
    plan = default_plan(size=32)
    plan["local_epochs"] = 3
    plan["optimizer"]["lr"] = 0.005
    return plan


class FlowerProcess:
    """One Flower process (SuperLink, SuperNode) in its own process group, logging to a file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("ab")
        self.process = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to its group (it starts flower-superexec children), SIGKILL after TIMEOUT."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self._log.close()


def flower_env(venv: Path, home: Path) -> dict[str, str]:
    """The environment of a Flower process: the Flower venv first on PATH, no telemetry, no
    update check, its own FLWR_HOME, nothing of the agent's venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(
        {
            "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            "VIRTUAL_ENV": str(venv),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_HOME": str(home),
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    home.mkdir(parents=True, exist_ok=True)
    return env


def wait_port(port: int, proc: FlowerProcess, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with code {proc.process.returncode}:\n{proc.tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} does not listen on 127.0.0.1:{port} after {timeout:g} s:\n{proc.tail()}")


@contextlib.contextmanager
def flower_federation(
    venv: Path, work: Path, agents: dict[str, str], token_files: dict[str, Path]
) -> Iterator[int]:
    """A SuperLink and one SuperNode per agent; yields the SuperLink's port; stops them all."""
    procs: list[FlowerProcess] = []
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    link_port = free_port()
    try:
        link = FlowerProcess(
            "superlink",
            [
                str(venv / "bin" / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
                "--disable-runtime-dependency-installation",
            ],
            flower_env(venv, work / "home" / "superlink"),
            logs / "superlink.log",
        )
        procs.append(link)
        wait_port(link_port, link)
        for site, url in agents.items():
            node_config = f"agent-url='{url}' token-file='{token_files[site]}' site='{site}'"
            procs.append(
                FlowerProcess(
                    f"supernode {site}",
                    [
                        str(venv / "bin" / "flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{link_port}",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(free_port()),
                        "--node-config",
                        node_config,
                    ],
                    flower_env(venv, work / "home" / site),
                    logs / f"supernode-{site}.log",
                )
            )
        yield link_port
    finally:
        for proc in reversed(procs):
            proc.stop()


def flwr_run(
    venv: Path, work: Path, link_port: int, run_config: dict[str, Any], name: str
) -> tuple[int, float, str]:
    """`flwr run` of this app against the SuperLink; returns (exit code, seconds, output)."""
    home = work / "home" / f"cli-{name}"
    env = flower_env(venv, home)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "fedsite"\n\n'
        f'[superlink.fedsite]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    # flwr builds the app bundle from the app folder; a copy keeps build leftovers out of the repo.
    app = work / f"app-{name}"
    shutil.copytree(
        APP_DIR, app, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build", "e2e.py")
    )
    cmd = [str(venv / "bin" / "flwr"), "run", str(app), "fedsite", "--run-config", pairs, "--stream"]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            cmd,
            env=env,
            capture_output=True,
            text=True,
            timeout=FLWR_RUN_TIMEOUT_S,
            check=False,
            cwd=str(work),
        )
    except subprocess.TimeoutExpired as exc:
        out = (
            (exc.stdout or b"").decode(errors="replace")
            if isinstance(exc.stdout, bytes)
            else (exc.stdout or "")
        )
        return 124, time.monotonic() - t0, out
    output = proc.stdout + proc.stderr
    (work / "logs" / f"flwr-run-{name}.log").write_text(output)
    return proc.returncode, time.monotonic() - t0, output


def wait_results(path: Path, timeout: float = 120.0) -> dict[str, Any]:
    """results.json once the ServerApp has finished writing it (`flwr run --stream` may return first)."""
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(path.read_text())
            if doc.get("status") in ("completed", "failed"):
                return doc
        time.sleep(0.5)
    raise RuntimeError(f"{path} did not reach a final status within {timeout:g} s; last: {doc.get('status')}")


def egress_events(url: str, admin_token: str) -> list[dict[str, Any]]:
    """Every `egress.sent` event of the agent at URL (its audit API, read with an admin token)."""
    events: list[dict[str, Any]] = []
    since = 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=30) as http:
        while True:
            resp = http.get("/v1/audit", params={"since_id": since, "limit": 1000, "action": "egress.sent"})
            resp.raise_for_status()
            body = resp.json()
            events += body["events"]
            if not body["events"]:
                return events
            since = body["next_since_id"]


def check_audit(
    results: dict[str, Any], updates: list[dict[str, Any]], urls: dict[str, str], admins: dict[str, str]
) -> list[str]:
    """Exactly one egress.sent per site and Flower round, with the SHA-256 the ServerApp logged."""
    problems: list[str] = []
    prefix = results["run_id"] + "-"
    logged = {(u["site"], int(u["round"])): u for u in updates}
    rounds = [int(r["index"]) for r in results["rounds"]]
    for site, url in urls.items():
        mine = [
            e
            for e in egress_events(url, admins[site])
            if str(e["details"].get("round_id", "")).startswith(prefix)
        ]
        for index in rounds:
            tag = f"-r{index:03d}-"
            events = [e for e in mine if tag in e["details"]["round_id"]]
            entry = logged.get((site, index))
            if entry is None:
                problems.append(f"{site} round {index}: the ServerApp logged no update")
                continue
            if len(events) != 1:
                problems.append(f"{site} round {index}: {len(events)} egress.sent events, expected exactly 1")
                continue
            if events[0]["details"]["sha256"] != entry["sha256"]:
                problems.append(
                    f"{site} round {index}: egress.sent sha256 {events[0]['details']['sha256']} != "
                    f"ServerApp's {entry['sha256']}"
                )
    return problems


def read_updates(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def set_policy(config: Path, policy: str) -> None:
    doc = yaml.safe_load(config.read_text())
    doc.setdefault("approval", {})["policy"] = policy
    config.write_text(yaml.safe_dump(doc, sort_keys=False))


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def overhead(rounds: list[dict[str, Any]]) -> float:
    """Mean seconds per round spent outside the sites' jobs: the round's duration less its slowest
    training job and its slowest evaluation (each as its caller timed it, transfers included)."""
    spans = []
    for r in rounds:
        train = max((float(t["duration_s"]) for t in r.get("training", {}).values()), default=0.0)
        evals = max((float(e.get("duration_s", 0.0)) for e in r.get("evaluation", {}).values()), default=0.0)
        spans.append(float(r["duration_s"]) - train - evals)
    return round(mean(spans), 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "flower-e2e-out")
    parser.add_argument("--flower-venv", type=Path, default=REPO / ".venv-flower")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--subjects", type=int, default=4, help="subjects per site")
    parser.add_argument("--skip-manual", action="store_true", help="leave out the manual-approval run")
    args = parser.parse_args(argv)
    venv = args.flower_venv.resolve()
    if not (venv / "bin" / "flwr").exists():
        parser.error(
            f"{venv} has no flwr; create it with `make e2e-flower` (or pip install flwr==1.42.0 there)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fedsite-flower-e2e-"))
    checks: dict[str, Any] = {}
    report: dict[str, Any] = {"test": "e2e-flower", "rounds": args.rounds, "checks": checks}
    plan = e2e_plan()
    try:
        layout = generate_federation(
            work / "data", sites=3, subjects_per_site=[args.subjects] * 3, size=32, seed=0
        )
        configs = {s.site_id: s.config_path for s in layout.sites}
        tokens = {name: add_static_token(path) for name, path in configs.items()}
        admins = {name: add_static_token(path, name="admin", role="admin") for name, path in configs.items()}
        token_files = {
            name: write_secret(work / "tokens" / f"{name}.token", tok) for name, tok in tokens.items()
        }
        for path in configs.values():
            doc = yaml.safe_load(path.read_text())
            doc["device"] = "cpu"
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
        plan_file = work / "plan.json"
        plan_file.write_text(json.dumps(plan, indent=2))
        init_file = work / "initial.safetensors"
        run_fedsite(
            "flower", "initial-weights", "--plan", str(plan_file), "--out", str(init_file), site="e2e"
        )

        with LocalFederation(work / "logs") as local:
            agents = local.start_many(configs, ready_timeout=300)
            urls = {name: a.url for name, a in agents.items()}
            ports = {name: a.port for name, a in agents.items()}

            # The reference: fedsite coordinate's FedAvg on the same agents, plan, seed and model.
            fed = parse_federation(
                {
                    "agents": [{"name": n, "url": u, "token": tokens[n]} for n, u in urls.items()],
                    "poll_interval": 0.5,
                    "min_sites": 3,
                },
                source=work / "federation.yaml",
            )
            t0 = time.monotonic()
            ref = run_strategy(
                fed,
                plan,
                args.out / "coordinate",
                RunOptions(strategy="fedavg", rounds=args.rounds, run_id="reference"),
                initial_weights=load_file(init_file),
                reporter=QuietReporter(),
            )
            ref_wall = time.monotonic() - t0

            with flower_federation(venv, work, urls, token_files) as link_port:
                out_dir = (args.out / "flower").resolve()
                shutil.rmtree(out_dir, ignore_errors=True)
                run_config = {
                    "plan-file": str(plan_file),
                    "initial-weights": str(init_file),
                    "out-dir": str(out_dir),
                    "num-server-rounds": args.rounds,
                    "min-nodes": 3,
                    "sites": ",".join(urls),
                }
                code, flower_wall, output = flwr_run(venv, work, link_port, run_config, "fedavg")
                checks["flwr_run_exit_0"] = code == 0
                if code != 0:
                    report["flwr_run_output"] = output[-3000:]
                results = wait_results(out_dir / "results.json")
                checks["results_completed"] = results.get("status") == "completed"
                updates = read_updates(out_dir / "received_updates.jsonl")
                problems = check_audit(results, updates, urls, admins)
                checks["audit_matches_serverapp"] = not problems
                if problems:
                    report["audit_problems"] = problems
                flower_dice = results.get("final", {}).get("weighted_dice")
                ref_dice = ref.doc["final"].get("weighted_dice")
                # A Dice of 0 on both sides would agree without saying anything.
                checks["reference_dice_above_0.1"] = isinstance(ref_dice, float) and ref_dice > 0.1
                checks["dice_within_0.01"] = (
                    isinstance(flower_dice, float)
                    and isinstance(ref_dice, float)
                    and abs(flower_dice - ref_dice) <= DICE_TOLERANCE
                )
                flower_rounds = results.get("rounds", [])
                ref_rounds = ref.rounds
                # The same results.json as `fedsite coordinate`: every key of its rounds and final.
                missing = sorted(
                    {f"rounds[].{k}" for r in ref_rounds for k in r if any(k not in f for f in flower_rounds)}
                    | {f"final.{k}" for k in ref.doc["final"] if k not in results.get("final", {})}
                )
                checks["results_json_has_the_coordinators_keys"] = not missing and len(flower_rounds) == len(
                    ref_rounds
                )
                ref_anchors = ref.doc.get("audit_anchors", {})
                checks["audit_anchors_kept"] = bool(ref_anchors) and all(
                    len(results.get("audit_anchors", {}).get(site, [])) == len(kept)
                    for site, kept in ref_anchors.items()
                )
                checks["dice_plot_written"] = (out_dir / "dice_per_round.png").is_file()
                if missing:
                    report["results_keys_missing"] = missing
                f_round = mean([float(r["duration_s"]) for r in flower_rounds])
                r_round = mean([float(r["duration_s"]) for r in ref_rounds])
                report["dice"] = {"flower": flower_dice, "coordinate": ref_dice}
                # One trainer and one mean (fedsite_flower.aggregate), whoever drives the rounds.
                checks["same_final_model_as_coordinate"] = results.get("final", {}).get(
                    "model_sha256"
                ) == ref.doc["final"].get("model_sha256")
                report["round_time"] = {
                    "flower_round_s_mean": round(f_round, 3),
                    "coordinate_round_s_mean": round(r_round, 3),
                    "ratio_flower_over_coordinate": round(f_round / r_round, 3) if r_round else None,
                    "flower_overhead_s_per_round": overhead(flower_rounds),
                    "coordinate_overhead_s_per_round": overhead(ref_rounds),
                    "flower_flwr_run_s": round(flower_wall, 3),
                    "coordinate_run_s": round(ref_wall, 3),
                    "note": "a round = train at every site + aggregate + evaluate at every site, in both",
                }
                report["bytes_per_round"] = {
                    "flower_clientapp_agent_bodies": mean(
                        [float(r["bytes_sent"] + r["bytes_received"]) for r in flower_rounds]
                    ),
                    "flower_superlink_supernode_arrays": mean(
                        [
                            float(r["flower_bytes_to_nodes"] + r["flower_bytes_from_nodes"])
                            for r in flower_rounds
                        ]
                    ),
                    "coordinate_agent_bodies": mean(
                        [float(r["bytes_sent"] + r["bytes_received"]) for r in ref_rounds]
                    ),
                    "how": "HTTP request+response body bytes between the ClientApps and their agents (as "
                    "the coordinator counts its own), and the ArrayRecord payload bytes the SuperLink sent "
                    "to and received from the SuperNodes (train and evaluate messages; framing not counted)",
                }

                if not args.skip_manual:
                    manual_site = list(configs)[-1]
                    local.agents[manual_site].stop()
                    set_policy(configs[manual_site], "manual")
                    local.start(manual_site, configs[manual_site], port=ports[manual_site])
                    from agent.training.plan import parse_plan, plan_hash

                    expected_hash = plan_hash(parse_plan(plan))
                    out2 = (args.out / "flower-manual").resolve()
                    shutil.rmtree(out2, ignore_errors=True)
                    code2, _, output2 = flwr_run(
                        venv,
                        work,
                        link_port,
                        {**run_config, "out-dir": str(out2), "num-server-rounds": 1},
                        "manual",
                    )
                    checks["manual_flwr_run_exit_0"] = code2 == 0
                    if code2 != 0:
                        report["manual_flwr_run_output"] = output2[-3000:]
                    res2 = wait_results(out2 / "results.json")
                    first = (res2.get("rounds") or [{}])[0]
                    left = first.get("left_out", [])
                    others = [s for s in configs if s != manual_site]
                    checks["manual_site_reported_with_plan_hash"] = any(
                        x["site"] == manual_site and expected_hash in x["reason"] for x in left
                    )
                    checks["other_sites_completed"] = res2.get("status") == "completed" and sorted(
                        first.get("participants", [])
                    ) == sorted(others)
                    report["manual"] = {"site": manual_site, "plan_hash": expected_hash, "left_out": left}
    finally:
        keep = args.out / "logs"
        shutil.rmtree(keep, ignore_errors=True)
        with contextlib.suppress(OSError):
            shutil.copytree(work / "logs", keep)
        shutil.rmtree(work, ignore_errors=True)
    report["ok"] = bool(checks) and all(checks.values())
    (args.out / "e2e-flower.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
