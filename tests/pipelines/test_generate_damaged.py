"""align.generate on a run whose adapter files are damaged (cut short, garbled) or with empty prompts: a message
naming the file and what to do, and exit status 1 or 2, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from align import generate
from align.adapters import AdapterModel, LoraConfig
from align.data.synthetic import build_tokenizer
from align.models.loading import load_base
from align.models.tiny import tiny_llama


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A run as the runner leaves it after base -> sft: a tiny Llama base and a LoRA 'sft' adapter."""
    root = tmp_path_factory.mktemp("damaged")
    base_dir, run = root / "base", root / "run"
    tokenizer = build_tokenizer()
    tiny_llama(seed=3, vocab_size=len(tokenizer), hidden_size=32, num_layers=2).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = AdapterModel(load_base(base_dir)[0])
    model.add_adapter("sft", LoraConfig(r=4, target_modules="all-linear"))
    model.save_adapter("sft", run / "sft" / "adapter")
    manifest = {"version": 1, "pipeline": "sft", "stages": {
        "base": {"status": "done", "artifacts": {"model_dir": str(base_dir), "data_dir": None}},
        "sft": {"status": "done", "artifacts": {"adapter": "sft/adapter"}},
    }}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


@pytest.fixture
def run_dir(pristine, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(pristine, copy)
    return copy


def _generate(run_dir: Path, capsys, *extra: str) -> tuple[int, str]:
    rc = generate.main([f"run.dir={run_dir}", "max_new_tokens=2", *(extra or ("prompt=hi",))])
    return rc, capsys.readouterr().err


def test_an_intact_run_generates(run_dir, capsys):
    assert _generate(run_dir, capsys)[0] == 0


def test_a_truncated_adapter_file_is_named_with_what_to_do(run_dir, capsys):
    weights = run_dir / "sft" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    rc, err = _generate(run_dir, capsys)
    assert rc == 1 and "Traceback" not in err
    assert err.startswith(f"error: {weights} cannot be read as safetensors (")
    assert f"the file is damaged (cut short?); rerun `python -m align.run run.dir={run_dir} ...` to rebuild the " \
           "sft stage" in err


@pytest.mark.parametrize(("text", "words"), [
    ("{not json", "is not valid JSON"),
    ("", "is not valid JSON"),
    ("[1, 2]", "holds a list, not the base's fingerprint"),
])
def test_a_corrupt_base_fingerprint_is_named_with_what_to_do(run_dir, capsys, text, words):
    fingerprint = run_dir / "sft" / "adapter" / "align_base.json"
    fingerprint.write_text(text)
    rc, err = _generate(run_dir, capsys)
    assert rc == 1 and "Traceback" not in err
    assert err.startswith(f"error: {fingerprint} {words}")
    assert "rerun `python -m align.run" in err


def test_empty_prompts_are_refused_with_their_line(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n\n{"prompt": "  "}\n')
    rc, err = _generate(run_dir, capsys, f"prompts_file={prompts}")
    assert rc == 2
    assert f'prompts_file={prompts}, line 3: the "prompt" is empty' in err
    rc, err = _generate(run_dir, capsys, "prompt=")
    assert rc == 2 and 'prompt="": the prompt is empty' in err
