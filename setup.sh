#!/usr/bin/env bash
# Creates .venv with everything pixart-min needs. `bash setup.sh test` adds the test-only packages.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
# A CPU build of torch (quick to install); a torch that is already there, e.g. a CUDA one, is kept.
$py -c "import torch" 2>/dev/null || $py -m pip install -q "torch==2.13.0"
$py -m pip install -q -r requirements.txt
if [ "${1:-}" = test ]; then $py -m pip install -q -r requirements-test.txt; fi
