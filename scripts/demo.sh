#!/usr/bin/env bash
# Runs the main job on the embedded default (SQLite file, no server) on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/moxco demo "$@"
