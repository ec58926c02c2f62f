#!/usr/bin/env bash
# bench/gpu.py on a lent GPU machine. Its python3 (CPython 3.12) has torch and transformers, not
# moxco's own dependencies (SQLAlchemy, Alembic, Mako), and it reaches no network. Two steps:
#
#   here, right before the device run (needs the network once):
#       bash bench/gpu_device.sh prepare   # the wheels into .whl/ (git-ignored), and the commit measured
#   on the device (the run tool: carry [".whl"], timeout_s 420):
#       bash bench/gpu_device.sh run       # installs them and moxco into /tmp/site, writes into $OUT
#
# Back here, the results are gpu-bench.json, gpu-bench.md and gpu-bench.log in the run's files; then
#       python bench/gpu.py --report <files>/gpu-bench.json --write-docs
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(SQLAlchemy==2.1.9 alembic==1.20.1 Mako==1.4.3)

case "${1:-}" in
  prepare)
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "${WHEELS[@]}"
    commit=$(git rev-parse --short HEAD)
    dirty=$(git status --porcelain -- agent moxco collector bench)
    echo "commit ${commit}${dirty:+ with uncommitted changes in agent/, moxco/, collector/ or bench/}" > .whl/SOURCE
    ls .whl
    ;;
  run)
    : "${OUT:?OUT must name the folder the results go to}"
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
      --target /tmp/site .whl/*.whl .
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    source_args=()
    [[ -f .whl/SOURCE ]] && source_args=(--source "$(cat .whl/SOURCE)")
    timeout 360 python3 bench/gpu.py --device cuda --out "$OUT" ${source_args[@]+"${source_args[@]}"} 2>&1 \
      | tee "$OUT/gpu-bench.log"
    ;;
  *)
    echo "usage: bash bench/gpu_device.sh prepare|run" >&2
    exit 2
    ;;
esac
