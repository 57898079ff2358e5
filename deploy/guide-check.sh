#!/usr/bin/env bash
# Follows the admin guide (deploy/README.md) literally: runs its ```sh blocks as written, in
# the order they appear, in one shell, on a site folder of its own, and fails when a command
# fails. A block is skipped only when the line above its fence is a comment
# `<!-- guide-check: skip (reason) -->` (building the image, real data, PostgreSQL, upgrades,
# backups); the skipped blocks are listed with their reasons.
#
# Nothing in the blocks is rewritten. The guide's own variables are the only inputs:
#   FEDSITE_IMAGE      the image to run (default fedsite:latest; make e2e-docker passes the
#                      image it built from the tree)
#   FEDSITE_SITE_DIR   set here to a fresh temporary folder, removed at the end
# and the compose project gets a name of its own (COMPOSE_PROJECT_NAME, which the environment
# sets over .env), so that a real site named `fedsite` on the same host is never touched.
# The guide publishes the agent on 127.0.0.1:8443, which must be free.
# Run as root without sudo installed, `sudo CMD` runs CMD (it already has the rights).
#
# The guide brings one site up over mutual TLS on generated data, reaches /v1/info with the
# coordinator's client certificate and token, exports the audit log to the host and ends
# with `docker-compose down -v`. Whatever happens, the project's containers, network and
# volumes are removed here too, and the whole run is bounded (GUIDE_CHECK_TIMEOUT, 900 s).
#
#   FEDSITE_IMAGE=fedsite:e2e deploy/guide-check.sh
#   deploy/guide-check.sh --list          # print the script it would run, run nothing
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
guide="deploy/README.md"

# The guide's sh blocks as one bash script: each block is announced with its line in the
# guide, and a failure names the block it happened in.
extract() {
  echo 'set -euo pipefail'
  echo 'guide_step="(none)"'
  echo 'trap '\''rc=$?; [ "$rc" -eq 0 ] || echo "guide-check: FAILED in $guide_step (exit $rc)" >&2'\'' EXIT'
  echo 'if [ "$(id -u)" -eq 0 ] && ! command -v sudo >/dev/null 2>&1; then sudo() { "$@"; }; fi'
  awk -v guide="$guide" '
    /^```sh[[:space:]]*$/ && !inblock {
      inblock = 1; n++
      skip = (prev ~ /^<!-- guide-check: skip/)
      if (skip) {
        reason = prev; sub(/^<!-- guide-check: skip ?\(?/, "", reason); sub(/\)? ?-->.*$/, "", reason)
        printf "echo \"[guide-check] block %d (%s line %d) skipped: %s\" >&2\n", n, guide, NR, reason
      } else {
        printf "guide_step=\"block %d (%s line %d)\"\n", n, guide, NR
        printf "echo \"[guide-check] $guide_step\" >&2\n"
      }
      prev = $0; next
    }
    /^```[[:space:]]*$/ && inblock { inblock = 0; prev = $0; next }
    inblock { if (!skip) print; prev = $0; next }
    { if ($0 !~ /^[[:space:]]*$/) prev = $0 }
  ' "$guide"
}

if [ "${1:-}" = "--list" ]; then
  extract
  exit 0
fi

image="${FEDSITE_IMAGE:-fedsite:latest}"
limit="${GUIDE_CHECK_TIMEOUT:-900}"
command -v docker-compose >/dev/null 2>&1 || { echo "guide-check: docker-compose is required" >&2; exit 1; }
docker image inspect "$image" >/dev/null 2>&1 || { echo "guide-check: no image $image" >&2; exit 1; }
if curl -s -o /dev/null --max-time 5 http://127.0.0.1:8443/ 2>/dev/null \
  || curl -sk -o /dev/null --max-time 5 https://127.0.0.1:8443/ 2>/dev/null; then
  echo "guide-check: something already answers on 127.0.0.1:8443, the port the guide uses" >&2
  exit 1
fi

work="$(mktemp -d /tmp/fedsite-guide-check.XXXXXX)"
project="fedsite-guide-check-$$"
t0=$(date +%s)
cleanup() {
  local rc=$?
  if [ -f "$work/site/.env" ]; then
    (cd "$work/site" && COMPOSE_PROJECT_NAME="$project" timeout 120 docker-compose down -v --remove-orphans \
      --timeout 10 >/dev/null 2>&1) || true
  fi
  # Whatever compose could not remove (no .env yet, an interrupted `up`): by the project's label.
  local ids
  ids="$(docker ps -aq --filter "label=com.docker.compose.project=$project")"
  [ -z "$ids" ] || docker rm -f $ids >/dev/null 2>&1 || true
  ids="$(docker network ls -q --filter "label=com.docker.compose.project=$project")"
  [ -z "$ids" ] || docker network rm $ids >/dev/null 2>&1 || true
  ids="$(docker volume ls -q --filter "label=com.docker.compose.project=$project")"
  [ -z "$ids" ] || docker volume rm -f $ids >/dev/null 2>&1 || true
  # Files the containers wrote as uid 10001 (tls/server.key) need root, or the image, to go.
  rm -rf "$work" 2>/dev/null || docker run --rm -u 0 -v "$work:/w" --entrypoint rm "$image" -rf /w/site \
    >/dev/null 2>&1 || true
  rm -rf "$work" 2>/dev/null || true
  echo "[guide-check] finished with status $rc after $(($(date +%s) - t0))s" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

extract >"$work/guide.sh"
echo "[guide-check] running $guide as written: image $image, site folder $work/site, project $project" >&2
FEDSITE_IMAGE="$image" FEDSITE_SITE_DIR="$work/site" COMPOSE_PROJECT_NAME="$project" \
  timeout --kill-after=30 "$limit" bash "$work/guide.sh" </dev/null
cd "$root"
echo "[guide-check] every block of $guide ran" >&2
