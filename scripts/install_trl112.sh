#!/usr/bin/env bash
# A benchmark-only environment holding TRL 1.12.0, the last TRL release with a PPO trainer
# (trl.experimental.ppo.PPOTrainer; TRL 1.16, which align's dev extra pins, has none). Used by
# scripts/bench_ppo_trl.py; nothing in align imports it.
#
# The environment (./.venv-trl112, or $TRL_VENV) holds only trl 1.12.0 itself (pure Python, no dependencies
# installed); a .pth file puts the main venv's site-packages (./.venv, or $VENV) after it on sys.path, so TRL 1.12
# shadows TRL 1.16 and runs on exactly the torch, transformers, peft, accelerate and datasets that align runs on:
# the benchmark compares trainers, not builds of the stack. Run bash scripts/install.sh dev first.
# Usage: bash scripts/install_trl112.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN="${VENV:-.venv}"
OUT="${TRL_VENV:-.venv-trl112}"
[ -x "$MAIN/bin/python" ] || { echo "no $MAIN/bin/python: run bash scripts/install.sh dev first" >&2; exit 1; }
[ -x "$OUT/bin/python" ] || "$MAIN/bin/python" -m venv --without-pip "$OUT"
purelib() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
main_site="$(purelib "$MAIN")"
out_site="$(purelib "$OUT")"
"$MAIN/bin/python" -m pip install -q --no-deps --upgrade --target "$out_site" trl==1.12.0 2>&1 \
  | { grep -v -e "is ignored: it is neither" -e "Target directory .* already exists" || true; }
echo "import site; site.addsitedir('$main_site')" > "$out_site/zz_align_main_venv.pth"
"$OUT/bin/python" - <<'PY'
import importlib.metadata as md

import peft, torch, transformers, trl
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: F401 - the import is the check

assert trl.__version__ == "1.12.0" and md.version("trl") == "1.12.0", trl.__version__
print(f"TRL {trl.__version__} ({trl.__file__}) with torch {torch.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}: trl.experimental.ppo.PPOTrainer imports")
PY
