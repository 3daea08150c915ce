"""align.export and align.generate on a run directory built by hand (tiny Llama base, random LoRA adapters)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align import export, generate
from align.adapters import AdapterModel, LoraConfig
from align.data.synthetic import build_tokenizer
from align.models.heads import ScalarHead
from align.models.loading import load_base
from align.models.tiny import tiny_llama

IDS = torch.tensor([[1, 4, 9, 17, 25, 33, 41, 60], [1, 7, 12, 19, 88, 100, 120, 5]])


def _logits(model, adapter=None) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, AdapterModel):
            with model.use(adapter):
                return model(input_ids=IDS).logits
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run as pipelines/runner.py leaves it after base -> dpo (sft pending), plus a finished rm stage."""
    root = tmp_path_factory.mktemp("exportgen")
    base_dir, run = root / "base", root / "run"
    tokenizer = build_tokenizer()
    tiny_llama(seed=3, vocab_size=len(tokenizer), hidden_size=32, num_layers=2).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    base, _ = load_base(base_dir)
    model = AdapterModel(base)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian")
    torch.manual_seed(5)
    for name in ("policy", "reward"):
        model.add_adapter(name, config)
        with torch.no_grad():  # 'gaussian' init still starts B at zero (PEFT's meaning): make the update real
            for param in model.adapter_parameters(name):
                param.normal_(0.0, 0.2)
    model.save_adapter("policy", run / "dpo" / "adapter")
    model.save_adapter("reward", run / "rm" / "adapter")
    ScalarHead(32).save(run / "rm" / "adapter")
    manifest = {"version": 1, "pipeline": "dpo", "stages": {
        "base": {"status": "done", "artifacts": {"model_dir": str(base_dir), "data_dir": None}},
        "sft": {"status": "pending"},
        "rm": {"status": "done", "artifacts": {"adapter": "rm/adapter"}},
        "dpo": {"status": "done", "artifacts": {"adapter": "dpo/adapter"}},
    }}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


@pytest.fixture(scope="module")
def reference(run_dir):
    """(logits of the bare base, logits with the dpo adapter) on IDS."""
    base, _ = load_base(_model_dir(run_dir))
    model = AdapterModel(base)
    model.load_adapter(run_dir / "dpo" / "adapter", "policy")
    return _logits(model), _logits(model, "policy")


def _model_dir(run_dir: Path) -> Path:
    return Path(json.loads((run_dir / "manifest.json").read_text())["stages"]["base"]["artifacts"]["model_dir"])


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------------- export
def test_export_merged_reloads_with_transformers_and_matches_the_adapter(run_dir, reference, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert export.main([f"run.dir={run_dir}"]) == 0  # default stage: the policy stage, dpo
    out = Path(_last_line(capsys.readouterr().out))
    assert out == run_dir / "export" / "dpo-merged"
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name in merged.state_dict())
    base_logits, adapter_logits = reference
    logits = _logits(merged)
    torch.testing.assert_close(logits, adapter_logits, atol=1e-5, rtol=0)
    assert (logits - base_logits).abs().max() > 1e-3
    assert AutoTokenizer.from_pretrained(out).chat_template == build_tokenizer().chat_template
    assert json.loads((out / export.EXPORT_MARKER).read_text())["stage"] == "dpo"
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_export_merged_bf16_and_re_export_replaces_the_earlier_one(run_dir, reference, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert export.main([f"run.dir={run_dir}", "stage=dpo", "dtype=bf16", f"out={out}"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(merged.float()), reference[1], atol=0.1, rtol=0.05)
    assert export.main([f"run.dir={run_dir}", f"out={out}"]) == 0  # an earlier export is replaced
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out)), reference[1], atol=1e-5, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_export_adapter_copies_and_reloads(run_dir, reference, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert export.main([f"run.dir={run_dir}", "stage=dpo", "format=adapter", f"out={out}"]) == 0
    captured = capsys.readouterr()
    assert Path(_last_line(captured.out)) == out
    assert "PeftModel.from_pretrained" in captured.err and str(_model_dir(run_dir)) in captured.err
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "align_base.json"} <= names
    base, _ = load_base(_model_dir(run_dir))
    model = AdapterModel(base)
    model.load_adapter(out, "copy")
    torch.testing.assert_close(_logits(model, "copy"), reference[1], atol=0, rtol=0)


def test_export_adapter_loads_with_peft(run_dir, reference, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    assert export.main([f"run.dir={run_dir}", "format=adapter", f"out={out}"]) == 0
    assert "exported the dpo adapter" in capsys.readouterr().err  # the default is the policy stage, not rm
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(_model_dir(run_dir)), out).eval()
    torch.testing.assert_close(_logits(model), reference[1], atol=1e-5, rtol=0)


def test_export_rm_adapter_keeps_its_head_but_merged_rm_is_refused(run_dir, tmp_path, capsys):
    out = tmp_path / "rm"
    assert export.main([f"run.dir={run_dir}", "stage=rm", "format=adapter", f"out={out}"]) == 0
    assert {"head.json", "head.safetensors"} <= {p.name for p in out.iterdir()}
    assert "ScalarHead.load" in capsys.readouterr().err
    assert export.main([f"run.dir={run_dir}", "stage=rm", f"out={tmp_path / 'rm-merged'}"]) == 2
    err = capsys.readouterr().err
    assert "reward model" in err and "format=adapter" in err
    assert not (tmp_path / "rm-merged").exists()


def test_export_refuses_to_overwrite_a_directory_that_is_not_an_export(run_dir, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert export.main([f"run.dir={run_dir}", "format=adapter", f"out={out}"]) == 2
    assert "not an earlier export" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------------------------------- generate
def test_generate_prints_a_response_and_is_reproducible(run_dir, capsys):
    argv = [f"run.dir={run_dir}", "prompt=the film was", "max_new_tokens=8", "seed=7"]
    assert generate.main(argv) == 0
    first = capsys.readouterr().out
    assert first.strip()
    assert generate.main(argv) == 0
    assert capsys.readouterr().out == first
    assert generate.main([*argv[:-1], "stage=dpo", "seed=8", "num_samples=3"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 3


def test_generate_from_a_prompts_file(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the story"}\n\n{"prompt": "overall it was", "id": 2}\n')
    assert generate.main([f"run.dir={run_dir}", f"prompts_file={prompts}", "max_new_tokens=6",
                          "temperature=0", "num_samples=2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["prompt"], r["sample"]) for r in rows] == [("the story", 0), ("the story", 1),
                                                          ("overall it was", 0), ("overall it was", 1)]
    assert rows[0]["response"] == rows[1]["response"]  # greedy


def test_generate_refuses_the_reward_model(run_dir, capsys):
    assert generate.main([f"run.dir={run_dir}", "stage=rm", "prompt=hi"]) == 2
    err = capsys.readouterr().err
    assert "stage=rm" in err and "dpo" in err


# ----------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("module", [export, generate])
def test_unknown_key_suggests_the_closest(module, run_dir, capsys):
    assert module.main([f"run.dir={run_dir}", "stag=dpo", "prompt=x"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'stag'" in err and "did you mean 'stage'" in err


@pytest.mark.parametrize("module", [export, generate])
def test_unfinished_stage_lists_the_finished_ones(module, run_dir, capsys):
    extra = ["prompt=x"] if module is generate else []
    assert module.main([f"run.dir={run_dir}", "stage=ppo", *extra]) == 2
    err = capsys.readouterr().err
    assert "stage=ppo" in err and "never run" in err and "dpo" in err
    assert module.main([f"run.dir={run_dir}", "stage=sft", *extra]) == 2
    assert "status: pending" in capsys.readouterr().err


@pytest.mark.parametrize("module", [export, generate])
def test_not_a_run_directory(module, tmp_path, capsys):
    extra = ["prompt=x"] if module is generate else []
    assert module.main([f"run.dir={tmp_path}", *extra]) == 2
    err = capsys.readouterr().err
    assert "not a run directory" in err and "python -m align.run" in err


@pytest.mark.parametrize("argv, words", [
    ([], "missing run.dir"),
    (["run.dir={run}", "run.dir=y"], "given twice"),
    (["run.dir={run}", "format=gguf"], "format='gguf': expected one of merged, adapter"),
    (["run.dir={run}", "stage=dop"], "did you mean 'dpo'"),
    (["run.dir={run}", "stage=eval"], "expected one of dpo, ppo, grpo, rloo, sft"),
    (["run.dir={run}", "--stage=dpo"], "write stage=dpo"),
    (["run.dir={run}", "dpo"], "expected key=value"),
    (["run.dir={run}", "format=adapter", "dtype=bf16"], "dtype applies to format=merged only"),
])
def test_export_usage_errors(argv, words, run_dir, capsys):
    assert export.main([a.format(run=run_dir) for a in argv]) == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["max_new_tokens=abc", "prompt=x"], "max_new_tokens='abc': expected an integer"),
    (["top_p=0", "prompt=x"], "top_p='0': expected a number in (0, 1]"),
    ([], "exactly one of prompt"),
    (["prompt=x", "prompts_file=y.jsonl"], "exactly one of prompt"),
    (["prompts_file=missing.jsonl"], "no such file"),
])
def test_generate_usage_errors(argv, words, run_dir, capsys):
    assert generate.main([f"run.dir={run_dir}", *argv]) == 2
    assert words in capsys.readouterr().err


def test_help(capsys):
    assert export.main(["--help"]) == 0 and "format=merged" in capsys.readouterr().out
    assert generate.main(["-h"]) == 0 and "prompts_file" in capsys.readouterr().out


def test_a_run_without_a_finished_policy_stage(run_dir, tmp_path, capsys):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["stages"]["dpo"]["status"] = "failed"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "rm").symlink_to(run_dir / "rm")
    assert export.main([f"run.dir={tmp_path}", "format=adapter"]) == 2
    err = capsys.readouterr().err
    assert "no finished policy stage" in err and "stage=rm" in err
    assert generate.main([f"run.dir={tmp_path}", "prompt=x"]) == 2
    assert "no finished policy stage" in capsys.readouterr().err
    assert export.main([f"run.dir={tmp_path}", "stage=rm", "format=adapter", f"out={tmp_path / 'o'}"]) == 0
