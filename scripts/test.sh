#!/usr/bin/env bash
# Install align with its dev extras into ./.venv, lint, and run the test suite.
# Default: the fast CPU suite. ALIGN_SLOW=1 (set by CI) runs the end-to-end tests marked `slow` in the same
# pytest run. Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/adapters -k dora`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
. "${VENV:-.venv}/bin/activate"
ruff check .
markers=()
[ "${ALIGN_SLOW:-0}" = "1" ] && markers=(-m "not gpu")
python -m pytest -q "${markers[@]}" "$@"
