"""docs/data.md: its python blocks run, and the section the embedded task fills in is there."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "data.md"


def test_data_doc_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/data.md has no python example"
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), {"__name__": "__doc_example__"})


def test_data_doc_keeps_the_embedded_task_section():
    assert "\n## The embedded task\n" in DOC.read_text()
