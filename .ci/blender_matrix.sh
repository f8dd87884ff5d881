#!/usr/bin/env bash
# The Blender tests (tests/blender, tests/addon) on several bpy wheels, each in its own venv (4.2 LTS, 4.5 LTS
# and 5.0 are supported: docs/addon.md, Blender versions).
# Usage: .ci/blender_matrix.sh [VERSION...]   (default: 4.2 4.5 5.0; venvs in $PBNDS_MATRIX_DIR, default /tmp)
# A venv is made on first use (~1 GB download each): python3.11 -m venv, bpy==<VERSION>.*, torch, the
# project without its blender extra. Extra pytest arguments: PYTEST_ARGS. Exit status: failed versions.
set -uo pipefail
cd "$(dirname "$0")/.."
dir=${PBNDS_MATRIX_DIR:-/tmp}
versions=("$@")
[ $# -eq 0 ] && versions=(4.2 4.5 5.0)
failed=()
for v in "${versions[@]}"; do
  venv="$dir/bpy${v//./}"
  if ! "$venv/bin/python" -c "import bpy, OpenEXR, pytest" 2>/dev/null; then
    SECONDS=0
    python3.11 -m venv "$venv" && "$venv/bin/pip" install -q "bpy==$v.*" torch==2.13.0 \
      && "$venv/bin/pip" install -q -e ".[dev,eval]" || { failed+=("$v (install)"); continue; }
    echo "== bpy $v installed in ${SECONDS}s"
  fi
  SECONDS=0
  # One pytest process per folder: on the bpy 4.5 wheel a process that ran tests of both folders passes them
  # and then never exits (bpy's exit-time hang, docs/addon.md); each folder alone exits.
  for folder in tests/blender tests/addon; do
    # shellcheck disable=SC2086
    timeout 1800 "$venv/bin/python" -m pytest -q -p no:cacheprovider "$folder" ${PYTEST_ARGS:-} || failed+=("$v $folder")
  done
  echo "== bpy $v tested in ${SECONDS}s"
done
[ ${#failed[@]} -eq 0 ] && echo "matrix: all passed" || { echo "matrix: failed on ${failed[*]}"; exit 1; }
