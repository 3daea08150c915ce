"""Two gloo ranks of ZeRO-3 with optimizer and parameter offload (DeepSpeedCPUAdam) against one plain PyTorch
process on the same global batch, launched with torchrun running ``run_dpo.py``.

Each step of the 2-rank run takes micro-batches of 2 pairs on each rank, 2 accumulated: the rows the single process
takes as 2 micro-batches of 4. ``stage3_param_persistence_threshold`` is 0 so that even this tiny adapter is
partitioned, which is what makes a save without gathering write empty tensors (trl#4416, peft#2892).

Slow: about 20 s with DeepSpeed's CPU ops cached, plus about 2 minutes in a fresh environment where both ranks wait
for the JIT build of ``cpu_adam`` and ``shm_comm`` (cached in $TORCH_EXTENSIONS_DIR afterwards)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import free_port
from .run_dpo import ACCUM, MICRO_BATCH, STEPS
from .tiny_dpo import dpo_trainer, loop_config, run, tiny_model

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = "adapter_model.safetensors"


def launch_two_ranks(out: Path, name: str = "zero3_offload", quantization: str = "none") -> None:
    config = json.loads((ROOT / f"configs/deepspeed/{name}.json").read_text())
    if config["zero_optimization"]["stage"] == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    config_path = out / f"{name}.json"
    out.mkdir(parents=True)
    config_path.write_text(json.dumps(config))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # torchrun sets them for each rank
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "tests/distributed/run_dpo.py"),
               str(config_path), str(out), quantization]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "quantization"), [("zero3_offload", "none"), ("zero2_offload", "nf4")])
def test_two_rank_dpo_matches_single_process(name, quantization, tmp_path):
    """ZeRO-3 with offload on a full-precision base; ZeRO-2 with offload on an NF4 base (QLoRA: the frozen 4-bit
    base replicated on every rank, the adapter's gradients and optimizer state partitioned)."""
    launch_two_ranks(tmp_path / "ranks", name, quantization)
    torch.manual_seed(0)
    model = tiny_model(quantization)
    single = dpo_trainer(model, loop_config(STEPS, MICRO_BATCH * 2, ACCUM), tmp_path / "single")
    expected = run(single)
    model.save_adapter("policy", tmp_path / "single" / "adapter")
    reference = load_file(str(tmp_path / "single" / "adapter" / WEIGHTS))

    reports = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]
    stage = 3 if name.startswith("zero3") else 2
    assert {k: reports[0][k] for k in ("world_size", "zero_stage", "optimizer", "partitioned")} == {
        "world_size": 2, "zero_stage": stage, "optimizer": "DeepSpeedCPUAdam", "partitioned": stage == 3}
    for step in range(STEPS):
        # every rank holds as many pairs, so the global mean loss is the mean of the ranks' means
        loss = sum(r["history"][step]["loss"] for r in reports) / 2
        assert loss == pytest.approx(expected[step]["loss"], rel=1e-5)
        for r in reports:  # DeepSpeed's norm is global: every rank reports the same
            assert r["history"][step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-4)
            assert r["history"][step]["lr"] == pytest.approx(expected[step]["lr"])

    # the adapter saved from ZeRO-3 shards, straight and after a resume, and the checkpoint's trainable tensors
    saved = {
        "straight adapter": load_file(str(tmp_path / "ranks/straight/adapter" / WEIGHTS)),
        "resumed adapter": load_file(str(tmp_path / "ranks/resumed/adapter" / WEIGHTS)),
        "checkpoint": {"base_model.model." + k: v for k, v in load_file(
            str(tmp_path / "ranks/straight/checkpoints/step-000003/trainable.safetensors")).items()},
    }
    for what, tensors in saved.items():
        assert tensors.keys() == reference.keys(), what
        for key, value in tensors.items():
            assert value.shape == reference[key].shape and value.numel() > 0, f"{what}: {key} {value.shape}"
            torch.testing.assert_close(value, reference[key], rtol=0, atol=1e-5, msg=f"{what}: {key}")
