#!/usr/bin/env bash
# Set up dtr-scale in ./.venv with the exact package set CI uses (constraints.txt).
# Idempotent: a second run installs nothing new.
#
# CI also builds the lowest supported set (constraints-lowest.txt, base install plus pytest) with
#   VENV=build/venv-lowest CONSTRAINTS=constraints-lowest.txt EXTRAS=webdataset,dev bash install.sh
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CONSTRAINTS=${CONSTRAINTS:-constraints.txt}
EXTRAS=${EXTRAS:-all,dev}

pip_install() {
  # pipefail keeps pip's exit status; the filter only hides this machine's find-links noise.
  "$VENV/bin/python" -m pip install --quiet "$@" 2>&1 | { grep -v "is ignored" || true; }
}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_install --upgrade "pip>=24"
# torch and torchvision first: every other pin then resolves without backtracking.
pip_install -c "$CONSTRAINTS" torch torchvision
pip_install -c "$CONSTRAINTS" -e ".[$EXTRAS]"
"$VENV/bin/python" -c "import dtr_scale, torch; print(f'dtr-scale {dtr_scale.__version__} ready (torch {torch.__version__})')"
