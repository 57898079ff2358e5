#!/bin/sh
# One-shot set-up of the local federation demo (deploy/federation-demo.yml), run in the
# fedsite image: generated data for each site, a CA + server certificate + coordinator client
# certificate per site, a coordinator token in each site's database, and the federation file
# the coordinator container uses. Idempotent: a second `up` reuses what exists.
#
# Starts as root only to hand the fresh volumes to the agent's user, then drops to uid 10001.
set -eu

demo=/demo
sites="${DEMO_SITES:-3}"

if [ "$(id -u)" = 0 ]; then
  chown 10001:10001 "$demo" /results
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
echo "agents:" >>"$fed.tmp"
for k in $(seq 1 "$sites"); do
  site="site-$k"
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
# Agents and coordinator run as the same uid and read this volume only.
chmod -R go-rwx "$demo"
touch "$demo/.ready"
echo "demo set-up done: $sites sites in $demo"
