#!/usr/bin/env bash
# Collects every wheel an image needs into one folder, on a machine that can reach a package
# index, so that the image builds with `pip install --no-index` on an air-gapped one.
#
#   docker/wheelhouse.sh [OUT] [cpu|cuda]          (defaults: wheelhouse, cpu): the agent's image
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu docker/wheelhouse.sh
#   docker/wheelhouse.sh build/flower-wheelhouse flower: the Flower image (docker/flower.Dockerfile)
#
# The fedsite package itself is not put in the agent's wheelhouse: the Dockerfile builds it from
# the source tree, so that a code change needs no new wheelhouse. The Flower variant is the other
# way round: its folder is the Flower image's whole build context, so it holds the integration
# package (integrations/flower, built here) next to flwr and its dependencies, and no torch.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-wheelhouse}"
variant="${2:-${TORCH_VARIANT:-cpu}}"
python="${PYTHON:-.venv/bin/python}"

if [ "$variant" = flower ]; then
  app=integrations/flower
  [ -f "$app/pyproject.toml" ] || { echo "$app/pyproject.toml not found: the Flower variant builds that package" >&2; exit 1; }
  mkdir -p "$out"
  # A stale build of the integration would be installed in its place: always a fresh one.
  rm -f "$out"/fedsite_flower-*.whl
  # flwr pins its own FastAPI, Starlette, uvicorn and cryptography: resolved here alone, never
  # against the agent's dependencies (that is why it is an image of its own).
  "$python" -m pip wheel -q --wheel-dir "$out" "./$app" "setuptools>=68" wheel pip
  if ls "$out"/torch-*.whl >/dev/null 2>&1; then
    echo "$out holds a torch wheel: the Flower side must not depend on torch (remove it and check $app's dependencies)" >&2
    exit 1
  fi
  ls "$out"/flwr-*.whl >/dev/null 2>&1 || { echo "$app does not depend on flwr: no flwr wheel in $out" >&2; exit 1; }
  echo "$(ls "$out"/*.whl | wc -l) wheels in $out ($(du -sh "$out" | cut -f1)), $(ls "$out"/flwr-*.whl | xargs -n1 basename)"
  exit 0
fi
torch_version="$(sed -nE 's/^ *"torch==([^"]+)",.*/\1/p' pyproject.toml)"
[ -n "$torch_version" ] || { echo "pyproject.toml: no exact torch==X pin found" >&2; exit 1; }

case "$variant" in
  # PyPI's Linux torch wheel is the CUDA build; the CPU build carries the local label +cpu.
  cpu) torch_spec="torch==${torch_version}+cpu"; default_index="https://download.pytorch.org/whl/cpu" ;;
  cuda) torch_spec="torch==${torch_version},!=${torch_version}+cpu"; default_index="https://pypi.org/simple" ;;
  *) echo "TORCH_VARIANT must be cpu or cuda, not '$variant' (or flower: the Flower image's wheelhouse)" >&2; exit 2 ;;
esac

mkdir -p "$out"
rm -f "$out"/fedsite-*.whl
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$torch_spec" >"$constraints"

# torch first, alone: from pip's configured sources, else from the PyTorch index for the variant.
if ! "$python" -m pip download -q --no-deps -d "$out" "$torch_spec"; then
  echo "torch ($torch_spec) not found in pip's configured sources; trying ${TORCH_INDEX_URL:-$default_index}" >&2
  "$python" -m pip download -q --no-deps -d "$out" --extra-index-url "${TORCH_INDEX_URL:-$default_index}" "$torch_spec"
fi
# Everything else (including torch's own dependencies) resolved against that torch; pip builds
# a wheel for any dependency that only ships a source archive.
"$python" -m pip wheel -q --wheel-dir "$out" --find-links "$out" -c "$constraints" \
  "$torch_spec" . "setuptools>=68" wheel pip
rm -f "$out"/fedsite-*.whl
echo "$(ls "$out"/*.whl | wc -l) wheels in $out ($(du -sh "$out" | cut -f1)), torch: $(ls "$out"/torch-*.whl | xargs -n1 basename)"
