#!/usr/bin/env bash
# Set up dtr-scale in ./.venv with the exact package set CI uses (constraints.txt).
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

pip_install() {
  # pipefail keeps pip's exit status; the filter only hides this machine's find-links noise.
  .venv/bin/python -m pip install --quiet "$@" 2>&1 | { grep -v "is ignored" || true; }
}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install --upgrade "pip>=24"
# torch and torchvision first: every other pin then resolves without backtracking.
pip_install -c constraints.txt torch torchvision
pip_install -c constraints.txt -e ".[all,dev]"
.venv/bin/python -c "import dtr_scale, torch; print(f'dtr-scale {dtr_scale.__version__} ready (torch {torch.__version__})')"
