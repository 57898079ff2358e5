#!/usr/bin/env bash
# Follows the admin guide (deploy/README.md) literally: runs its ```sh blocks as written, in
# the order they appear, and fails when a command fails. Two passes, each in one shell, on a
# site folder and a compose project of its own, so that neither sees the other's files:
#   quick-start  the blocks marked `<!-- guide-check: quick-start -->` on the line above their
#                fence: the "Quick start with `fedsite init`" section (init on generated data,
#                up, /v1/info over mutual TLS with the hand-off files, `down -v`);
#   steps        every other block: the step-by-step set-up (steps 2 to 12).
# A block is skipped only when the line above its fence is a comment
# `<!-- guide-check: skip (reason) -->` (building the image, real data, PostgreSQL, upgrades,
# backups); the skipped blocks are listed with their reasons.
#
# Nothing in the blocks is rewritten. The guide's own variables are the only inputs:
#   FEDSITE_IMAGE      the image to run (default fedsite:latest; make e2e-docker passes the
#                      image it built from the tree)
#   FEDSITE_SITE_DIR   set here to a fresh temporary folder per pass, removed at the end
# and each pass's compose project gets a name of its own (COMPOSE_PROJECT_NAME, which the
# environment sets over .env), so that a real site named `fedsite` on the same host is never
# touched. The guide publishes the agent on 127.0.0.1:8443, which must be free; the passes run
# one after the other, each ending with `docker-compose down -v`.
# Run as root without sudo installed, `sudo CMD` runs CMD (it already has the rights).
#
# The step-by-step pass brings one site up over mutual TLS on generated data, reaches /v1/info
# with the coordinator's client certificate and token, exports the audit log to the host and
# ends with `docker-compose down -v`. Whatever happens, each project's containers, network and
# volumes are removed here too, and each pass is bounded (GUIDE_CHECK_TIMEOUT, 900 s).
#
#   FEDSITE_IMAGE=fedsite:e2e deploy/guide-check.sh                # both passes
#   FEDSITE_IMAGE=fedsite:e2e deploy/guide-check.sh quick-start    # one pass
#   deploy/guide-check.sh --list [quick-start|steps]  # print the script a pass would run
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
guide="deploy/README.md"

# One pass of the guide's sh blocks as one bash script: each block is announced with its
# line in the guide, and a failure names the block it happened in. PASS is quick-start or
# steps; the other pass's blocks are listed as skipped.
extract() {
  local pass="$1"
  echo 'set -euo pipefail'
  echo 'guide_step="(none)"'
  echo 'trap '\''rc=$?; [ "$rc" -eq 0 ] || echo "guide-check: FAILED in $guide_step (exit $rc)" >&2'\'' EXIT'
  echo 'if [ "$(id -u)" -eq 0 ] && ! command -v sudo >/dev/null 2>&1; then sudo() { "$@"; }; fi'
  awk -v guide="$guide" -v pass="$pass" '
    /^```sh[[:space:]]*$/ && !inblock {
      inblock = 1; n++
      skip = 0
      if (prev ~ /^<!-- guide-check: skip/) {
        skip = 1
        reason = prev; sub(/^<!-- guide-check: skip ?\(?/, "", reason); sub(/\)? ?-->.*$/, "", reason)
      } else {
        block_pass = (prev ~ /^<!-- guide-check: quick-start/) ? "quick-start" : "steps"
        if (block_pass != pass) { skip = 1; reason = "run in the " block_pass " pass" }
      }
      if (skip) {
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

passes=(quick-start steps)
if [ "${1:-}" = "--list" ]; then
  case "${2:-steps}" in
    quick-start | steps) extract "${2:-steps}" ;;
    *) echo "guide-check: no pass ${2} (quick-start or steps)" >&2; exit 2 ;;
  esac
  exit 0
fi
case "${1:-}" in
  "") ;;
  quick-start | steps) passes=("$1") ;;
  *) echo "usage: guide-check.sh [--list] [quick-start|steps]" >&2; exit 2 ;;
esac

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
t0=$(date +%s)
# Each pass's compose project (its site folder is $work/PASS).
project_of() { echo "fedsite-guide-check-$1-$$"; }
remove_project() {
  local pass="$1" project ids
  project="$(project_of "$pass")"
  if [ -f "$work/$pass/.env" ] && [ -f "$work/$pass/docker-compose.yml" ]; then
    (cd "$work/$pass" && COMPOSE_PROJECT_NAME="$project" timeout 120 docker-compose down -v --remove-orphans \
      --timeout 10 >/dev/null 2>&1) || true
  fi
  # Whatever compose could not remove (no .env yet, an interrupted `up`): by the project's label.
  ids="$(docker ps -aq --filter "label=com.docker.compose.project=$project")"
  [ -z "$ids" ] || docker rm -f $ids >/dev/null 2>&1 || true
  ids="$(docker network ls -q --filter "label=com.docker.compose.project=$project")"
  [ -z "$ids" ] || docker network rm $ids >/dev/null 2>&1 || true
  ids="$(docker volume ls -q --filter "label=com.docker.compose.project=$project")"
  [ -z "$ids" ] || docker volume rm -f $ids >/dev/null 2>&1 || true
}
cleanup() {
  local rc=$? pass
  cd "$root"
  for pass in "${passes[@]}"; do remove_project "$pass"; done
  # Files the containers wrote as uid 10001 (tls/server.key) need root, or the image, to go.
  rm -rf "$work" 2>/dev/null || docker run --rm -u 0 -v "$work:/w" --entrypoint sh "$image" -c 'rm -rf /w/*' \
    >/dev/null 2>&1 || true
  rm -rf "$work" 2>/dev/null || true
  echo "[guide-check] finished with status $rc after $(($(date +%s) - t0))s" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for pass in "${passes[@]}"; do
  extract "$pass" >"$work/$pass.sh"
  echo "[guide-check] $pass pass of $guide as written: image $image, site folder $work/$pass," \
    "project $(project_of "$pass")" >&2
  FEDSITE_IMAGE="$image" FEDSITE_SITE_DIR="$work/$pass" COMPOSE_PROJECT_NAME="$(project_of "$pass")" \
    timeout --kill-after=30 "$limit" bash "$work/$pass.sh" </dev/null
  cd "$root"
  echo "[guide-check] every block of the $pass pass ran" >&2
done
