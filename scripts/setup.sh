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

# --- system packages for the test suite ---
# Real servers and tools the tests start (tests fail, never skip, without them): postgresql
# (the collector's PostgreSQL backend), prometheus (a real scraper, promtool for the rules and
# config), chromium (headless browser tests of the pages and audit reports). Installed with
# apt-get, only when the dev extra is requested and a package is missing. Add further packages
# to this one list.
APT_PACKAGES=(postgresql prometheus chromium)
if [[ ",$extras," == *",dev,"* ]] && command -v apt-get >/dev/null; then
  missing=()
  for package in "${APT_PACKAGES[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=(); [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}"
  fi
fi
# --- end of system packages ---
