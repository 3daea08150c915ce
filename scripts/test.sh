#!/usr/bin/env bash
# Install align with its dev extras into ./.venv, lint, and run the test suite.
# Default: the fast CPU suite. ALIGN_SLOW=1 (set by CI) also runs the end-to-end tests marked `slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
. "${VENV:-.venv}/bin/activate"
ruff check .
python -m pytest -q "$@"
if [ "${ALIGN_SLOW:-0}" = "1" ]; then
  rc=0
  python -m pytest -q -m slow || rc=$?
  [ "$rc" = 0 ] || [ "$rc" = 5 ] || exit "$rc"   # 5: no test marked slow yet
fi
