#!/usr/bin/env bash
# Install align into ./.venv (or $VENV). torch goes first, pinned to the CPU wheel, so pip never pulls a CUDA build;
# everything else is installed under scripts/constraints.txt, which pins torch too.
# Usage: bash scripts/install.sh [dev]      (dev adds pytest, ruff and the peers peft/trl for tests and benchmarks)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"

pip_quiet() {  # pip, minus the harmless notes about absent local index folders; keeps pip's exit status
  python -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
pip_quiet install -q --upgrade pip
pip_quiet install -q torch==2.13.0
extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
pip_quiet install -q -c scripts/constraints.txt -e ".${extra}"
python - <<'PY'
import torch
assert torch.__version__.startswith("2.13"), f"unexpected torch {torch.__version__}: a CUDA build was pulled?"
print(f"align installed into {__import__('sys').prefix} (torch {torch.__version__})")
PY
