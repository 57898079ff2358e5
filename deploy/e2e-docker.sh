#!/usr/bin/env bash
# The deployment, end to end, under a real Docker engine (`make e2e-docker`):
#   1. a Docker engine (started here, as root, with the vfs driver, if none answers),
#   2. a Debian bookworm base image from Debian's package mirror (no registry pull; cached),
#   3. the wheelhouse (cached) and the fedsite image built offline from it,
#   4. deploy/guide-check.sh: the admin guide's commands, as written, on that image (one site
#      over mutual TLS on generated data, a round from a coordinator on the host, teardown),
#   5. tests/deploy/test_e2e_docker.py: the image runs as uid 10001 and cannot write the data
#      mount; deploy/federation-demo.yml brings up three agents and a coordinator, runs two
#      FedAvg rounds in a mixed federation (two sites over mutual TLS, one outbound-only site
#      through the coordinator's relay, with no published port, on an internal network), every
#      site's audit chain verifies, the outbound site's commits match its released updates;
#      then `down -v`.
# Nothing is left running: the compose project is removed by the tests and again here, and
# an engine started here is stopped here. Prints the duration of each step.
#
#   IMAGE=fedsite:e2e BASE_IMAGE=fedsite-base:bookworm deploy/e2e-docker.sh [pytest args]
#   E2E_BUILD_CACHE=10GB (default): the engine's build cache is trimmed to this after the build;
#   E2E_BUILD_CACHE=keep leaves it as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

image="${IMAGE:-fedsite:e2e}"
base_image="${BASE_IMAGE:-fedsite-base:bookworm}"
python="${PYTHON:-.venv/bin/python}"
t0=$(date +%s)
step_t=$t0
step() {
  local now
  now=$(date +%s)
  echo "[e2e-docker] +$((now - step_t))s (total $((now - t0))s) $*"
  step_t=$now
}

started_dockerd=""
cleanup() {
  local rc=$?
  # Any compose project the tests could not remove (an interrupted run): containers,
  # networks and volumes of projects named fedsite-e2e-*.
  if docker info >/dev/null 2>&1; then
    for p in $(docker ps -a --filter label=com.docker.compose.project --format '{{.Label "com.docker.compose.project"}}' \
      | sort -u | grep '^fedsite-e2e-' || true); do
      echo "[e2e-docker] removing left-over project $p"
      docker-compose -f deploy/federation-demo.yml -p "$p" down -v --remove-orphans --timeout 10 >/dev/null 2>&1 || true
    done
  fi
  if [ -n "$started_dockerd" ]; then
    echo "[e2e-docker] stopping the Docker engine started for this run (pid $started_dockerd)"
    kill "$started_dockerd" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$started_dockerd" 2>/dev/null || break; sleep 1; done
  fi
  echo "[e2e-docker] finished with status $rc after $(($(date +%s) - t0))s"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1. engine
if ! docker info >/dev/null 2>&1; then
  [ "$(id -u)" -eq 0 ] || { echo "no Docker engine answers, and starting one needs root" >&2; exit 1; }
  if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker-compose >/dev/null 2>&1 \
    || ! command -v debootstrap >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq docker.io docker-compose debootstrap >/dev/null
  fi
  log=/tmp/fedsite-e2e-dockerd.log
  # overlay2 where the kernel lets us mount an overlay here (fast); else vfs, which works on
  # any file system but copies the whole image for every layer and container.
  driver="${FEDSITE_DOCKER_STORAGE_DRIVER:-}"
  if [ -z "$driver" ]; then
    probe="$(mktemp -d)"
    mkdir -p "$probe"/{l,u,w,m}
    if mount -t overlay overlay -o "lowerdir=$probe/l,upperdir=$probe/u,workdir=$probe/w" "$probe/m" 2>/dev/null; then
      umount "$probe/m"
      driver=overlay2
    else
      driver=vfs
    fi
    rm -rf "$probe"
  fi
  dockerd --storage-driver="$driver" >"$log" 2>&1 &
  started_dockerd=$!
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start; see $log" >&2; tail -20 "$log" >&2; exit 1; }
  step "Docker engine started ($driver)"
else
  step "Docker engine already running"
fi
command -v docker-compose >/dev/null 2>&1 || { echo "docker-compose is required" >&2; exit 1; }

# 2. base image
if ! docker image inspect "$base_image" >/dev/null 2>&1; then
  bash docker/build-base.sh "$base_image"
  step "base image $base_image built"
else
  step "base image $base_image exists"
fi

# 3. wheelhouse + image
if ! ls wheelhouse/torch-*.whl >/dev/null 2>&1; then
  PYTHON="$python" bash docker/wheelhouse.sh wheelhouse cpu
  step "wheelhouse collected"
else
  step "wheelhouse exists ($(ls wheelhouse/*.whl | wc -l) wheels)"
fi
# BuildKit skips a commit per metadata step (a full copy each on vfs). Docker >= 23 needs the
# buildx plugin for it; older clients have it built in.
build=(docker build)
for candidate in $(which -a docker | awk '!seen[$0]++'); do
  major="$("$candidate" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)"
  if "$candidate" buildx version >/dev/null 2>&1 || { [ -n "$major" ] && [ "$major" -lt 23 ]; }; then
    build=(env DOCKER_BUILDKIT=1 "$candidate" build --progress=plain)
    break
  fi
done
"${build[@]}" -f docker/Dockerfile --build-arg BASE_IMAGE="$base_image" -t "$image" . >/tmp/fedsite-e2e-build.log 2>&1 \
  || { tail -30 /tmp/fedsite-e2e-build.log >&2; echo "image build failed; log: /tmp/fedsite-e2e-build.log" >&2; exit 1; }
# Dangling images from earlier builds of this tag only take disk (vfs stores full copies).
docker image prune -f >/dev/null 2>&1 || true
# Every build adds a copy of the image's layers to BuildKit's cache (the context changes with
# each commit), and nothing removes them: dozens of runs left 53 GB of it. The engine's
# cache is trimmed to its newest E2E_BUILD_CACHE (10 GB unless set); E2E_BUILD_CACHE=keep
# leaves it alone.
if [ "${E2E_BUILD_CACHE:-10GB}" != keep ]; then
  docker builder prune -f --keep-storage "${E2E_BUILD_CACHE:-10GB}" >/dev/null 2>&1 || true
fi
step "image $image built with ${build[*]:0:3} ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"

# 4. the admin guide, followed as written (deploy/README.md's sh blocks, in order)
FEDSITE_IMAGE="$image" bash deploy/guide-check.sh
step "the admin guide's commands ran as written"

# 5. the tests
FEDSITE_E2E_IMAGE="$image" "$python" -m pytest -q -m docker -p no:cacheprovider tests/deploy/test_e2e_docker.py "$@"
step "docker tests passed"
