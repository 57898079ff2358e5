#!/bin/sh
# One-shot set-up of the local federation demo (deploy/federation-demo.yml), run in the
# fedsite image: generated data for each site; for each push (listening) site a CA + server
# certificate + coordinator client certificate and a coordinator token in its database; for
# the pull (outbound-only) sites named in DEMO_PULL_SITES, a relay CA with the relay's server
# certificate and a client certificate per pull site, a relay token per pull site (only its
# hash is kept, in the relay's database) and the `connect:` section of the site's config; and
# the federation file the coordinator container uses. Idempotent: a second `up` reuses what
# exists.
#
# Starts as root only to hand the fresh volumes to the agent's user, then drops to uid 10001.
set -eu

demo=/demo
sites="${DEMO_SITES:-3}"
# Site numbers (space- or comma-separated) that run outbound-only and reach the relay.
pull_sites="$(echo "${DEMO_PULL_SITES:-}" | tr ',' ' ')"
relay_dir=/relay
relay_url=https://coordinator:8700

is_pull() {
  for p in $pull_sites; do [ "$p" = "$1" ] && return 0; done
  return 1
}

if [ "$(id -u)" = 0 ]; then
  chown 10001:10001 "$demo" /results "$relay_dir"
  for k in $(seq 1 "$sites"); do chown 10001:10001 "/work/site-$k"; done
  exec setpriv --reuid 10001 --regid 10001 --clear-groups --inh-caps=-all -- /bin/sh "$0" "$@"
fi

umask 077
if [ -f "$demo/.ready" ]; then
  echo "demo set-up exists in $demo: reusing it"
  exit 0
fi

if [ -n "$(ls -A "$demo")" ]; then
  echo "$demo holds an incomplete set-up (no .ready): remove the volumes (down -v) and retry" >&2
  exit 1
fi

# A sub-folder: demo-data stages next to its output, and only the volume is writable.
fedsite demo-data "$demo/sites" --sites "$sites" --subjects-per-site "${DEMO_SUBJECTS:-6,5,4}" \
  --size "${DEMO_SIZE:-32}" --seed "${DEMO_SEED:-0}"

mkdir -p "$demo/tokens"
fed="$demo/federation-docker.yaml"
echo "# Written by demo-setup.sh: the agents as the coordinator container reaches them." >"$fed.tmp"
pull_names=""
for k in $pull_sites; do pull_names="$pull_names site-$k"; done
if [ -n "$pull_names" ]; then
  # The relay's own CA: its server certificate (the name the pull sites connect to) and one
  # client certificate per pull site (mutual TLS); the relay trusts only this CA's clients.
  clients=""
  for name in $pull_names; do clients="$clients --client $name"; done
  # shellcheck disable=SC2086 # one --client NAME pair per pull site
  fedsite certs init "$demo/pki/relay" --site-id relay --hosts "coordinator,localhost,127.0.0.1" $clients >/dev/null
  cat >>"$fed.tmp" <<YAML
# The relay that \`fedsite coordinate --serve\` runs for the pull sites: its database and
# the uploaded chunks in the relay volume, HTTPS with mutual TLS.
relay:
  dir: $relay_dir
  register_wait_s: 900
  tls:
    cert_file: $demo/pki/relay/agent/server.crt
    key_file: $demo/pki/relay/agent/server.key
    client_ca_file: $demo/pki/relay/agent/ca.crt
YAML
fi
echo "agents:" >>"$fed.tmp"
for k in $(seq 1 "$sites"); do
  site="site-$k"
  if is_pull "$k"; then
    # A pull site has no address here: it connects to the relay with its relay token.
    cat >>"$fed.tmp" <<YAML
  - name: $site
    pull: true
YAML
    continue
  fi
  # The CA key stays in the set-up volume folder pki/; the agent mounts only pki/$site/agent.
  fedsite certs init "$demo/pki/$site" --site-id "$site" --hosts "$site,localhost,127.0.0.1" \
    --client coordinator >/dev/null
  # The token goes straight from `tokens add` into a 0600 file; it is never printed.
  FEDSITE_WORK_DIR="/work/$site" fedsite tokens add coordinator --role coordinator \
    --config "$demo/sites/$site/config.yaml" | tail -n 1 >"$demo/tokens/$site.token"
  [ -s "$demo/tokens/$site.token" ] || { echo "tokens add printed no token for $site" >&2; exit 1; }
  cat >>"$fed.tmp" <<YAML
  - name: $site
    url: https://$site:8443
    token_file: $demo/tokens/$site.token
    ca_file: $demo/pki/$site/ca.crt
    client_cert: $demo/pki/$site/clients/coordinator.crt
    client_key: $demo/pki/$site/clients/coordinator.key
YAML
done
cat >>"$fed.tmp" <<YAML
min_sites: $sites
timeouts: {connect: 10, read: 120, round: 1800, evaluation: 900}
YAML
mv "$fed.tmp" "$fed"

for k in $pull_sites; do
  site="site-$k"
  # The relay keeps only the token's hash; the token goes straight into a 0600 file.
  fedsite relay add-site "$site" --federation "$fed" --token-file "$demo/tokens/relay-$site.token" >/dev/null
  [ -s "$demo/tokens/relay-$site.token" ] || { echo "relay add-site wrote no token for $site" >&2; exit 1; }
  # Outbound-only: the agent opens no control port and takes its work from the relay.
  cat >>"$demo/sites/$site/config.yaml" <<YAML
connect:
  mode: outbound
  coordinator_url: $relay_url
  token_file: $demo/tokens/relay-$site.token
  ca_file: $demo/pki/relay/ca.crt
  client_cert: $demo/pki/relay/clients/$site.crt
  client_key: $demo/pki/relay/clients/$site.key
  # The relay starts with the coordinator, after this agent: retry soon rather than after a
  # long backoff.
  max_backoff_s: 5
YAML
done
# Agents and coordinator run as the same uid and read this volume only.
chmod -R go-rwx "$demo"
touch "$demo/.ready"
echo "demo set-up done: $sites sites in $demo (pull sites:${pull_names:- none})"
