"""The docs and scripts a user runs first must keep working."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("doc", ["docs/adapters.md"])
def test_doc_examples_run(doc):
    blocks = _python_blocks(ROOT / doc)
    assert blocks, f"{doc} has no python example"
    for block in blocks:
        exec(compile(block, doc, "exec"), {"__name__": "__doc_example__"})


def test_adapter_demo_learns_two_skills(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/demo_adapters.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, check=True, timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # a tiny model: one thread avoids oversubscription stalls
    ).stdout
    continuations = dict(re.findall(r"(count_up|count_down) -> (\[.*?\])", out))
    up, down = eval(continuations["count_up"]), eval(continuations["count_down"])
    assert up[:3] == [33, 34, 35]  # prompt 30 31 32: the same base counts up ...
    assert down[:3] == [31, 30, 29]  # ... or down, depending on the adapter
    assert out.count("reloaded logits identical: True") == 2
    assert (tmp_path / "count_up" / "adapter_model.safetensors").is_file()
