#!/bin/sh
# One-shot set-up of the Flower federation demo (deploy/flower/docker-compose.demo.yml), run in
# the fedsite image as root. The agents' side is deploy/demo-setup.sh, unchanged (generated data,
# each site's config and a coordinator-role token in its database, kept in a 0600 file), with no
# pull sites. Then the Flower side, each part in the volume of the one container that needs it,
# owned by the Flower image's uid 10002:
#
#   /flower/superlink: the SuperLink's TLS certificate and key (a CA made here, for the name
#     `superlink`), the plan and the initial model (`fedsite flower initial-weights`, built here
#     because the Flower image has no torch), both read by the ServerApp in that container;
#   /flower/site-K: site K's agent token and the SuperLink's CA certificate, for its SuperNode
#     (its ClientApp reads the token; nothing else of the site is there);
#   /flower/runner: the SuperLink's CA certificate, for `flwr run`.
#
# The CA's key is not kept (the demo makes no further certificates). Idempotent: a second `up`
# reuses what exists.
set -eu

sites="${DEMO_SITES:-3}"
if [ "$(id -u)" != 0 ]; then
  echo "deploy/flower/demo-setup.sh runs as root: it hands the volumes to uid 10001 (agents) and 10002 (Flower)" >&2
  exit 1
fi

# deploy/demo-setup.sh hands /results and /relay to the agents' user: no relay here (a local
# folder), and the results volume goes to the ServerApp's user (the SuperLink's container) below.
mkdir -p /results /relay
DEMO_PULL_SITES="" DEMO_SITES="$sites" sh /opt/demo-setup.sh
chown 10002:10002 /results

if [ -f /flower/superlink/.ready ]; then
  echo "Flower set-up exists: reusing it"
  exit 0
fi

umask 077
pki="$(mktemp -d /tmp/flower-pki.XXXXXX)"
trap 'rm -rf "$pki"' EXIT
fedsite certs init "$pki/superlink" --site-id superlink --hosts "superlink,localhost,127.0.0.1" >/dev/null
ca="$pki/superlink/ca.crt"

link=/flower/superlink
install -m 0400 "$pki/superlink/agent/server.crt" "$link/server.crt"
install -m 0400 "$pki/superlink/agent/server.key" "$link/server.key"
install -m 0400 "$ca" "$link/ca.crt"
install -m 0400 /demo/sites/plan.json "$link/plan.json"
fedsite flower initial-weights --plan /demo/sites/plan.json --out "$link/initial.safetensors" >/dev/null
chmod 0400 "$link/initial.safetensors"

for k in $(seq 1 "$sites"); do
  dir="/flower/site-$k"
  token="/demo/tokens/site-$k.token"
  [ -s "$token" ] || { echo "deploy/demo-setup.sh wrote no token for site-$k ($token)" >&2; exit 1; }
  install -m 0400 "$token" "$dir/agent.token"
  install -m 0400 "$ca" "$dir/superlink-ca.crt"
done
install -m 0400 "$ca" /flower/runner/superlink-ca.crt

for dir in "$link" /flower/runner $(for k in $(seq 1 "$sites"); do echo "/flower/site-$k"; done); do
  chown -R 10002:10002 "$dir"
  chmod 0700 "$dir"
done
touch "$link/.ready"
echo "Flower set-up done: a SuperLink certificate, the plan and initial model, and an agent token for each of $sites SuperNodes"
