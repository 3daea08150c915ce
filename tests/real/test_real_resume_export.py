"""On the real SmolLM2 (slow, real): kill -9 of a run mid-stage and a rerun that resumes to the adapter an
uninterrupted run writes; ``align.export format=merged`` reloads in transformers with the adapter's logits;
``align.generate`` samples from a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO, real_overrides

pytestmark = [pytest.mark.slow, pytest.mark.real]
LONGER = {"dpo": ["trainer.dpo.max_steps=8", "trainer.dpo.save_every=2", "trainer.dpo.pairs=dataset"],
          "grpo": ["trainer.grpo.max_steps=6", "trainer.grpo.save_every=2"]}


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2",
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}


def _command(pipeline: str, smollm2, files, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "align.run", f"pipeline={pipeline}", *real_overrides(smollm2, files),
            *LONGER[pipeline], "ray.enabled=false", f"run.dir={run_dir}"]


def _adapter(run_dir: Path, stage: str) -> dict:
    return load_file(str(run_dir / stage / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("pipeline", ["dpo", "grpo"])
def test_kill_9_mid_stage_then_rerun_resumes_to_the_same_adapter(pipeline, smollm2, chat_files, tmp_path):
    env = _env(tmp_path)
    straight = subprocess.run(_command(pipeline, smollm2, chat_files, tmp_path / "straight"), cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=900)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(_command(pipeline, smollm2, chat_files, run_dir), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoints = run_dir / pipeline / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and not any(int(p.name[5:]) >= 2 for p in checkpoints.glob("step-*")):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"][pipeline]["status"] == "running"

    rerun = subprocess.run(_command(pipeline, smollm2, chat_files, run_dir), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"[{pipeline}] running (attempt 2)" in rerun.stdout + rerun.stderr
    assert "[sft] done earlier with the same config: skipped" in rerun.stdout + rerun.stderr
    ours, theirs = _adapter(run_dir, pipeline), _adapter(tmp_path / "straight", pipeline)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6)


def test_export_merged_and_generate_on_smollm2(smollm2, chat_files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.adapters import AdapterModel
    from align.config.compose import compose_run_config
    from pipelines.runner import run_pipeline

    cfg = compose_run_config(["pipeline=dpo", *real_overrides(smollm2, chat_files), "trainer.dpo.pairs=dataset",
                              "pipeline.stages=[base,sft,dpo]", "ray.enabled=false",
                              f"run.dir={tmp_path / 'run'}"])
    run_pipeline(cfg, log=lambda _: None)
    out = tmp_path / "merged"
    export = subprocess.run([sys.executable, "-m", "align.export", f"run.dir={tmp_path / 'run'}", f"out={out}"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr[-2000:]
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 3 * 4?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    model = AdapterModel(AutoModelForCausalLM.from_pretrained(smollm2).eval())
    model.load_adapter(tmp_path / "run" / "dpo" / "adapter", "dpo")
    with torch.no_grad(), model.use("dpo"):
        adapted = model(ids).logits
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=0, atol=1e-4)

    gen = subprocess.run([sys.executable, "-m", "align.generate", f"run.dir={tmp_path / 'run'}",
                          "prompt=What is 3 * 4?", "max_new_tokens=12"], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.strip()  # a sampled answer, decoded without the chat template's special tokens
    assert "<|im_start|>" not in gen.stdout
