"""Every pipeline on the real SmolLM2-135M-Instruct (slow, real): conversational files through its chat template, a
full-precision and an NF4 base, a few steps per stage. Each adapter a run writes loads in the real peft onto the
SmolLM2 directory with no missing or unexpected keys and gives peft the logits align gives."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.adapters import AdapterModel
from align.config.compose import compose_run_config
from pipelines.runner import run_pipeline

from .conftest import real_overrides

pytestmark = [pytest.mark.slow, pytest.mark.real]
PIPELINES = ["sft", "rm", "dpo", "ppo", "grpo", "rloo"]


def adapter_dirs(run_dir: Path) -> list[Path]:
    return sorted(p.parent for p in run_dir.glob("*/**/adapter_model.safetensors") if "checkpoints" not in p.parts
                  and ".tmp" not in str(p))


def check_with_peft(model_dir: Path, adapter_dir: Path) -> float:
    """Load ``adapter_dir`` with peft onto the SmolLM2 directory; asserts no missing/unexpected adapter keys and
    returns the largest logit difference between peft and align on a chat prompt."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 7 + 5?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    config = peft.PeftConfig.from_pretrained(adapter_dir)
    peft_model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    result = peft.set_peft_model_state_dict(peft_model, load_file(str(adapter_dir / "adapter_model.safetensors")))
    adapter_missing = [k for k in result.missing_keys if any(t in k for t in ("lora_", "ia3_", "prompt_"))]
    assert not adapter_missing and not result.unexpected_keys, (adapter_dir, adapter_missing,
                                                                result.unexpected_keys)
    with torch.no_grad():
        theirs = peft_model.eval()(ids).logits
        ours_model = AdapterModel(AutoModelForCausalLM.from_pretrained(model_dir).eval())
        ours_model.load_adapter(adapter_dir, "x")
        with ours_model.use("x"):
            ours = ours_model(ids).logits
    return (theirs - ours).abs().max().item()


@pytest.mark.parametrize("quantization", ["none", "nf4"])
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_pipeline_on_smollm2(pipeline, quantization, smollm2, chat_files, tmp_path, restore_threads):
    overrides = real_overrides(smollm2, chat_files, quantization)
    if pipeline == "dpo":
        overrides.append("trainer.dpo.pairs=onpolicy")  # sampled pairs ranked by the user's reward file
    start = time.perf_counter()
    manifest = run_pipeline(compose_run_config([f"pipeline={pipeline}", *overrides, f"run.dir={tmp_path}",
                                                "ray.enabled=false"]), log=lambda _: None)
    if os.environ.get("ALIGN_REAL_TIMINGS"):  # a JSON line per run: wall and stage seconds (for the docs)
        with open(os.environ["ALIGN_REAL_TIMINGS"], "a") as out:
            out.write(json.dumps({"pipeline": pipeline, "quantization": quantization,
                                  "wall": round(time.perf_counter() - start, 1),
                                  "stages": {s: r.get("seconds") for s, r in manifest.stages.items()}}) + "\n")
    assert all(rec["status"] == "done" for rec in manifest.stages.values()), manifest.stages
    if pipeline == "rm":
        accuracy = manifest.stages["rm"]["metrics"]["eval/accuracy"]
        assert 0.0 <= accuracy <= 1.0
    else:
        result = json.loads((tmp_path / "eval" / "result.json").read_text())
        assert result["prompts"] == 4 and result["policy_length"] > 0
        assert all(isinstance(e["policy"], str) for e in result["examples"])
        # the chat template framed the prompts, and the report shows the user's words
        assert result["examples"][0]["prompt"].startswith("What is ")
        assert math.isfinite(result["kl_to_reference"])
        assert 0.0 <= result["pairs_accuracy"] <= 1.0 and result["pairs"] == 8
    dirs = adapter_dirs(tmp_path)
    expected = {"sft": {"sft"}, "rm": {"rm"}, "dpo": {"sft", "dpo"}, "ppo": {"sft", "rm", "ppo"},
                "grpo": {"sft", "grpo"}, "rloo": {"sft", "rloo"}}[pipeline]
    assert {d.relative_to(tmp_path).parts[0] for d in dirs} == expected
    if quantization == "none":  # peft on the full-precision SmolLM2 directory (a QLoRA adapter loads the same way)
        for adapter_dir in dirs:
            assert check_with_peft(smollm2, adapter_dir) < 1e-4, adapter_dir
    else:
        for adapter_dir in dirs:
            base = json.loads((adapter_dir / "align_base.json").read_text())
            assert base["quantization"] == ["nf4"] and base["num_parameters"] > 100_000_000
