#!/usr/bin/env bash
# Creates .venv and installs moxco into it on a fresh machine.
#   bash scripts/setup.sh            # the package itself (agent + embedded SQLite store)
#   bash scripts/setup.sh dev        # plus everything the tests and benchmarks need
# torch==2.13.0 is installed first: on these CPU machines pip takes it from a local wheel, while a
# bare `torch` requirement with nothing installed would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
[ -d /opt/wheels ] && pip+=(--find-links /opt/wheels)
.venv/bin/python -c 'import torch' 2>/dev/null || "${pip[@]}" torch==2.13.0
if [ -n "$extras" ]; then
  "${pip[@]}" -e ".[$extras]"
else
  "${pip[@]}" -e .
fi
