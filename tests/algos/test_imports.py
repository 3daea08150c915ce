"""``align.algos`` is pure torch: importing it must not load any heavy or peer package."""

import subprocess
import sys

HEAVY = ("transformers", "datasets", "deepspeed", "bitsandbytes", "ray", "wandb", "peft", "trl", "accelerate")


def test_algos_imports_only_torch():
    code = f"import sys, align.algos; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
