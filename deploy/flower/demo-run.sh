#!/bin/sh
# The `flwr run` of the Flower federation demo (deploy/flower/docker-compose.demo.yml), in the
# Flower image on the `fleet` network: builds the app bundle from integrations/flower (mounted
# read-only at /app), submits it to the SuperLink's Control API over TLS, follows the run's log
# and exits 0 only when the SuperLink reports the run finished:completed (`flwr run` itself
# exits 0 as soon as the run is submitted).
#
# The run config names files in the SuperLink's container (deploy/flower/demo-setup.sh puts the
# plan and the initial model there); results go to its `results` volume, under /results/flower.
set -eu

rounds="${DEMO_ROUNDS:-2}"
sites="${DEMO_SITES:-3}"
timeout_s="${DEMO_RUN_TIMEOUT_S:-1800}"
names="$(for k in $(seq 1 "$sites"); do printf 'site-%s,' "$k"; done | sed 's/,$//')"

# The connection `flwr` uses: no account, TLS verified against the demo SuperLink's CA.
mkdir -p "$FLWR_HOME"
cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "demo"

[superlink.demo]
address = "superlink:9092"
root-certificates = "/flower/superlink-ca.crt"
TOML

run_config="plan-file='/flower/superlink/plan.json' initial-weights='/flower/superlink/initial.safetensors'"
run_config="$run_config out-dir='/results/flower' num-server-rounds=$rounds min-nodes=$sites sites='$names'"
submitted="$(flwr run /app demo --format json --run-config "$run_config")"
echo "$submitted"
run_id="$(printf '%s' "$submitted" | python3 -c 'import json, sys; print(json.load(sys.stdin)["run-id"] or "")')"
[ -n "$run_id" ] || { echo "flwr run started no run" >&2; exit 1; }

status_of() {
  flwr ls demo --run-id "$run_id" --format json \
    | python3 -c 'import json, sys; runs = json.load(sys.stdin).get("runs") or [{}]; print(runs[0].get("status", ""))'
}

# The log, while the run lasts (the stream ends with the run); bounded by the same timeout.
timeout "$timeout_s" flwr log "$run_id" demo --stream || true
deadline=$(($(date +%s) + 60))
status="$(status_of)"
while [ "${status#finished}" = "$status" ] && [ "$(date +%s)" -lt "$deadline" ]; do
  sleep 2
  status="$(status_of)"
done
echo "run $run_id: $status"
[ "$status" = "finished:completed" ]
