#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine (this is what .ci/run calls).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec .venv/bin/python -m pytest "$@"
