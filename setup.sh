#!/usr/bin/env bash
# Creates .venv with everything pixart-min needs. `bash setup.sh test` adds the test-only packages.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
# torch 2.13.0 unless .venv has one (a CUDA build put there first is kept). Where pip finds a CPU build, as on
# this project's machines, that is a quick install; from PyPI on Linux it is the CUDA build, several GB.
$py -c "import torch" 2>/dev/null || $py -m pip install -q "torch==2.13.0"
$py -m pip install -q -r requirements.txt
if [ "${1:-}" = test ]; then $py -m pip install -q -r requirements-test.txt; fi
