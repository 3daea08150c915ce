#!/usr/bin/env bash
# Install align into ./.venv (or $VENV). torch goes first, pinned, so pip never pulls a CUDA build.
# Usage: bash scripts/install.sh [dev]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
python -m pip install -q -c scripts/constraints.txt -e ".${extra}"
python - <<'PY'
import torch
assert torch.__version__.startswith("2.13"), f"unexpected torch {torch.__version__}: a CUDA build was pulled?"
print(f"align installed: torch {torch.__version__}")
PY
